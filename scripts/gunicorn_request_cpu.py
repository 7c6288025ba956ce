"""gunicorn hooks that record the CPU each web request costs (``bench_service.py --request-cpu``).

    gunicorn -c scripts/gunicorn_request_cpu.py ...   (with BENCH_REQUEST_CPU_DIR set)

Why: ``/proc`` says how much CPU gunicorn used in all, not what for. A sampling profiler cannot
say either on this machine: py-spy counts a worker waiting on PostgreSQL's socket as busy. Here
each request's thread CPU time (``time.thread_time``: user and kernel, never waiting) is summed
by kind -- a claim, a submission, anything else -- and so is the HIT building a claim starts
after its response (``service.api.work.refill``, run while the response is closed, inside the
request). Sums are kept per second of ``time.monotonic()`` (one clock for every process), so
the benchmark adds up the seconds of its measured window only. Each worker writes its sums to
``$BENCH_REQUEST_CPU_DIR/<pid>.json`` when it exits. Works for ``sync`` and ``gthread`` workers
(a request's hooks run in the thread that serves it).

Costs two clock reads per request and per build.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Any

_DIR = os.environ.get("BENCH_REQUEST_CPU_DIR", "")
#: second -> kind -> [count, CPU seconds]
_SUMS: dict[int, dict[str, list[float]]] = {}
_LOCK = threading.Lock()
_REQUEST = threading.local()


def _add(kind: str, cpu: float) -> None:
    with _LOCK:
        bucket = _SUMS.setdefault(int(time.monotonic()), {}).setdefault(kind, [0, 0.0])
        bucket[0] += 1
        bucket[1] += cpu


_PATHS: dict[str, Any] = {}


def _kind(path: str) -> str:
    """The request's kind, by the paths the service's hot lane serves (set in :func:`post_fork`)."""
    if path == _PATHS["claim"]:
        return "claim"
    if _PATHS["submit"].fullmatch(path):
        return "submit"
    return "other"


def post_fork(server: Any, worker: Any) -> None:
    # In the worker, not at import: gunicorn's master loads this file as its config.
    from service.api import hotlane, work

    _PATHS.update(claim=hotlane.CLAIM_PATH, submit=hotlane.SUBMIT_PATH)

    build = work.refill

    @functools.wraps(build)
    def timed_refill(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return build(*args, **kwargs)
        finally:
            _add("build", time.thread_time() - started)

    work.refill = timed_refill


def pre_request(worker: Any, req: Any) -> None:
    _REQUEST.started = time.thread_time()


def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
    started = getattr(_REQUEST, "started", None)
    if started is not None:
        _add(_kind(req.path), time.thread_time() - started)
        _REQUEST.started = None


def worker_exit(server: Any, worker: Any) -> None:
    if _DIR:
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        with _LOCK, open(path, "w") as out:
            json.dump({str(second): kinds for second, kinds in _SUMS.items()}, out)
