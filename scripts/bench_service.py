"""Benchmark the crowd hot path end to end: HIT cycles per second through gunicorn + PostgreSQL.

    python scripts/bench_service.py --json
    python scripts/bench_service.py --duration 60 --virtual-workers 16 --gunicorn-workers 2 --json

A *cycle* is what a crowd worker does over and over: claim a HIT (``POST /api/v1/work/assignments``,
50 sample questions + 5 hidden gold) and submit its 55 answers in one post
(``POST .../answers``). Every cycle does the real work of issue 4: HITs are built from the best
candidate clusters and reserved against the budget before they are offered, answers are stored
idempotently, quality control judges the assignment, the reservation is spent, the answers are
counted into their clusters and the policy's decisions are taken -- all inside the measured
window (the run starts with no HIT built, so building is paid for while measuring).

What runs where, all on loopback:

* PostgreSQL: :class:`service.devservers.PostgresServer` (throwaway, ``fsync=off`` and
  ``synchronous_commit=off`` like the test suite unless ``--fsync``);
* the web service: gunicorn serving ``service.app:create_app()`` configured by ``MASKMILL_*``
  variables, in the shape docker-compose deploys (``deploy/gunicorn.conf.py``): ``sync``
  workers, one per core plus one, each request taken by a free process (behind nginx in a
  deployment: ``--proxy`` runs it, :class:`service.devservers.NginxServer` with
  ``deploy/nginx.conf``, and the load goes through it). ``--gunicorn-class gthread`` measures
  the shape for gunicorn facing clients directly (2 workers x 2 threads by default: about two
  requests in flight per core measured best on 2 cores);
* Redis (:class:`service.devservers.RedisServer`): each built batch of HITs queues its render
  job in RQ, as in a deployment where job workers render overlays; no job worker runs here;
* the load: another process (``multiprocessing``), one thread per virtual worker, each with a
  keep-alive HTTP/1.1 connection when the server keeps it (``sync`` workers close it after each
  response, as they do with a proxy) (a minimal client, :class:`KeepAlive`, so the load generator
  takes as little as possible of the CPU it shares with the service), answering "yes" to
  everything in 1.5 s per question
  (the seeded gold is all "yes", so every assignment is approved and every cluster is accepted
  after ``N_s`` answers: the common path of a healthy campaign).

The project is seeded directly in SQL (an API key, one class, one tree row and ``--clusters`` root
candidate clusters of 16 to 64 masks, hidden gold items); the campaign and the worker invites are
created through the requester API; workers are marked qualified in SQL (the qualification test is
not part of the cycle). No tree file is written: the load uses only the JSON API, never the overlay
images.

After the load the script checks in the database that no question was served twice, no answer
was counted twice (every cluster's yes/no counts equal its answered questions), every decided
cluster's state is what :func:`service.engine.policy.decide` says for its counts, and the ledger
is consistent and within budget. Then ``pgbench`` (from PostgreSQL's bindir) runs a one-row
``INSERT`` script against the same server, as a yardstick of what this machine's PostgreSQL can do
at all. CPU time is read from ``/proc`` per component (PostgreSQL, gunicorn, load generator), so
the result can be read even on a machine shared with other work (``machine.other_busy_cores``)
or a virtual machine whose host is busy (``machine.steal_cores``: the time the hypervisor gave
this machine's CPUs to others while they had work; on this machine it has ranged from none to
1.3 of the 2 cores within a day, and CPU per cycle with it). ``cpu_bound_cycles_per_s`` is the
rate the measured CPU per cycle would allow on all cores (contention from other work inflates CPU
time too, so it is a bound, not a promise).

``--request-cpu`` adds the web tier's own account (``web_request_cpu``): gunicorn hooks
(``scripts/gunicorn_request_cpu.py``) time each request's thread CPU, so the web share of
``cpu_ms_per_cycle`` splits into claims, submissions, HIT builds and gunicorn's work between
requests -- which a sampling profiler cannot tell here, as it counts waiting on PostgreSQL as busy.

Prints one JSON object (``--json``) or a short human summary.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.devservers import stop_process_group  # noqa: E402 - needs REPO on the path

QUESTIONS_PER_HIT = 50
GOLD_PER_HIT = 5
ANSWER_MS = 1500
REWARD_USD = 0.05
TARGET_CYCLES_PER_S = 300
TARGET_P99_MS = 100


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    virtual_workers: int
    clusters: int
    gunicorn_workers: int
    gunicorn_threads: int
    gunicorn_class: str
    pgbench_seconds: float
    pgbench_clients: int
    fsync: bool
    campaign_params: dict[str, Any]
    statements: int
    as_json: bool
    proxy: bool = False
    request_cpu: bool = False


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument("--virtual-workers", type=int, default=16)
    parser.add_argument(
        "--clusters",
        type=int,
        default=0,
        help="candidate clusters to seed (0: enough for the duration at twice the target rate)",
    )
    parser.add_argument(
        "--gunicorn-class",
        choices=("sync", "gthread"),
        default="sync",
        help="gunicorn worker class (default: sync, the shape behind the proxy)",
    )
    parser.add_argument(
        "--gunicorn-workers", type=int, help="default: cores + 1 (sync), 2 (gthread)"
    )
    parser.add_argument("--gunicorn-threads", type=int, help="default: 1 (sync), 2 (gthread)")
    parser.add_argument("--pgbench-seconds", type=float, default=10.0)
    parser.add_argument("--pgbench-clients", type=int, default=8)
    parser.add_argument(
        "--fsync", action="store_true", help="durable PostgreSQL (fsync, sync commit)"
    )
    parser.add_argument(
        "--campaign-param",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a campaign param, e.g. build_batch_hits=32 (repeatable; default: the service's)",
    )
    parser.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="N",
        help="also report the N statements PostgreSQL spent most time in (pg_stat_statements)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="send the load through nginx running deploy/nginx.conf, as docker-compose deploys it",
    )
    parser.add_argument(
        "--request-cpu",
        action="store_true",
        help="also report the web workers' CPU per claim, submission and HIT build "
        "(scripts/gunicorn_request_cpu.py)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("duration", "pgbench_seconds"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    for name in ("virtual_workers", "gunicorn_workers", "gunicorn_threads", "pgbench_clients"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    sync, cores = args.gunicorn_class == "sync", os.cpu_count() or 1
    if sync and (args.gunicorn_threads or 1) != 1:
        raise SystemExit("--gunicorn-threads applies to gthread workers (sync: one request each)")
    if args.clusters < 0:
        raise SystemExit("--clusters must be >= 0")
    clusters = args.clusters or _clusters_needed(args.duration + args.warmup)
    campaign_params: dict[str, Any] = {}
    for item in args.campaign_param:
        name, sep, raw = item.partition("=")
        try:
            campaign_params[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            sep = ""
        if not sep or not name.strip():
            raise SystemExit(f"--campaign-param expects NAME=JSON, got {item!r}")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        virtual_workers=args.virtual_workers,
        clusters=clusters,
        gunicorn_workers=args.gunicorn_workers or (cores + 1 if sync else 2),
        gunicorn_threads=args.gunicorn_threads or (1 if sync else 2),
        gunicorn_class=args.gunicorn_class,
        pgbench_seconds=args.pgbench_seconds,
        pgbench_clients=args.pgbench_clients,
        fsync=args.fsync,
        campaign_params=campaign_params,
        statements=max(0, args.statements),
        as_json=args.json,
        proxy=args.proxy,
        request_cpu=args.request_cpu,
    )


def _clusters_needed(seconds: float) -> int:
    """Enough clusters that twice the target rate cannot run out (15 questions per cluster)."""
    questions = 2 * TARGET_CYCLES_PER_S * seconds * QUESTIONS_PER_HIT
    return max(20_000, math.ceil(questions / 15))


# ------------------------------------------------------------------------------------ seeding


@dataclass
class Seeded:
    api_key: str
    project_id: int
    tree_id: int
    campaign_id: int = 0
    tokens: list[str] = field(default_factory=list)


def seed_project(database_url: str, clusters: int) -> Seeded:
    """API key, project, one class, a tree row with ``clusters`` root candidates, hidden gold."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from service.auth import create_api_key

    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            key, plaintext = create_api_key(session, "bench")
            project_id = session.execute(
                text(
                    "INSERT INTO projects (api_key_id, name, params) "
                    "VALUES (:k, 'bench', CAST('{}' AS json)) RETURNING id"
                ),
                {"k": key.id},
            ).scalar_one()
            class_id = session.execute(
                text(
                    "INSERT INTO project_classes (project_id, name) VALUES (:p, 'chair') "
                    "RETURNING id"
                ),
                {"p": project_id},
            ).scalar_one()
            image_id = session.execute(
                text(
                    "INSERT INTO images (project_id, file_name, uri, width, height) "
                    "VALUES (:p, 'bench.jpg', 'file:///bench.jpg', 640, 480) RETURNING id"
                ),
                {"p": project_id},
            ).scalar_one()
            round_id = session.execute(
                text(
                    "INSERT INTO rounds (project_id, number, status) VALUES (:p, 1, 'ready') "
                    "RETURNING id"
                ),
                {"p": project_id},
            ).scalar_one()
            # Cluster g covers [lo, lo + size) with sizes 16..64 and descending scores above K_pa:
            # every one is a candidate a human must verify.
            tree_id = session.execute(
                text(
                    "INSERT INTO trees (project_id, round_id, class_id, uri, mask_count) "
                    "VALUES (:p, :r, :c, 'file:///bench-tree.npz', :n) RETURNING id"
                ),
                {"p": project_id, "r": round_id, "c": class_id, "n": clusters * 64},
            ).scalar_one()
            session.execute(
                text(
                    "INSERT INTO clusters (project_id, tree_id, parent_id, node, lo, hi, size, "
                    "score, state, yes_count, no_count) "
                    "SELECT :p, :t, NULL, g, g * 64, g * 64 + 16 + (g % 49), 16 + (g % 49), "
                    "0.98 - 0.25 * g / :n, 'candidate', 0, 0 FROM generate_series(0, :n - 1) g"
                ),
                {"p": project_id, "t": tree_id, "n": clusters},
            )
            session.execute(
                text(
                    "INSERT INTO gold_items (project_id, image_id, class_id, rle, iou, expected, "
                    "for_qualification) SELECT :p, :i, :c, "
                    'CAST(\'{"size": [480, 640], "counts": "0"}\' AS json), 0.9, true, false '
                    "FROM generate_series(1, 200)"
                ),
                {"p": project_id, "i": image_id, "c": class_id},
            )
            session.commit()
        # Statistics for the seeded tables only. ANALYZE on the still-empty crowd tables would
        # record them as empty: PostgreSQL then plans its foreign-key checks on them as
        # sequential scans, and those cached plans make every insert O(table size) until
        # autovacuum analyzes again -- a benchmark artifact, not the service's cost.
        with engine.connect() as conn:
            conn.execute(text("ANALYZE clusters, gold_items, workers, trees"))
            conn.commit()
    finally:
        engine.dispose()
    return Seeded(plaintext, project_id, tree_id)


def _http(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = b"" if body is None else json.dumps(body).encode()
        conn.request(
            method,
            path,
            body=payload,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def seed_through_api(port: int, database_url: str, seeded: Seeded, options: Options) -> None:
    """The campaign and the worker invites, through the requester API; then qualify the workers."""
    from sqlalchemy import create_engine, text

    auth = {"Authorization": f"Bearer {seeded.api_key}"}
    params = dict(options.campaign_params)
    status, campaign = _http(
        port,
        "POST",
        f"/api/v1/projects/{seeded.project_id}/campaigns",
        {
            "budget_usd": 1_000_000,
            "backend": "local",
            "reward_per_hit_usd": REWARD_USD,
            "questions_per_hit": QUESTIONS_PER_HIT,
            "gold_per_hit": GOLD_PER_HIT,
            "params": params,
        },
        auth,
    )
    if status != 201:
        raise RuntimeError(f"creating the campaign failed: {status} {campaign}")
    seeded.campaign_id = campaign["id"]
    worker_ids = []
    for _ in range(options.virtual_workers):
        status, invite = _http(
            port, "POST", f"/api/v1/projects/{seeded.project_id}/workers", {}, auth
        )
        if status != 201:
            raise RuntimeError(f"inviting a worker failed: {status} {invite}")
        seeded.tokens.append(invite["token"])
        worker_ids.append(invite["worker_id"])
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE workers SET qualified = true, qualified_at = now() WHERE id = ANY(:ids)"
                ),
                {"ids": worker_ids},
            )
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------- processes


def start_gunicorn(
    database_url: str,
    workdir: Path,
    options: Options,
    redis_url: str = "",
    code_dir: Path = REPO,
) -> tuple[subprocess.Popen, int]:
    """gunicorn serving the service found in ``code_dir`` (its working directory, first on its
    import path: ``scripts/bench_compare.py`` serves another checkout the same way)."""
    from service.devservers import free_port, service_environment

    port = free_port()
    # Jobs (each HIT batch's render job) go to RQ, as in a deployment: rendering is the job
    # workers' CPU, not the web tier's. No worker runs here; the queue just fills.
    env = service_environment(database_url, workdir, port, MASKMILL_REDIS_URL=redis_url)
    hooks: list[str] = []
    if options.request_cpu:
        (workdir / REQUEST_CPU_DIR).mkdir(exist_ok=True)
        env["BENCH_REQUEST_CPU_DIR"] = str(workdir / REQUEST_CPU_DIR)
        hooks = ["--config", str(REPO / "scripts" / "gunicorn_request_cpu.py")]
    process = launch_gunicorn(
        [
            *hooks,
            "--workers",
            str(options.gunicorn_workers),
            "--threads",
            str(options.gunicorn_threads),
            "--worker-class",
            options.gunicorn_class,
            "--bind",
            f"127.0.0.1:{port}",
            "--keep-alive",
            "75",
            "--log-level",
            "warning",
            # gunicorn >= 25.1 otherwise binds ~/.gunicorn/gunicorn.ctl, shared by every gunicorn
            # of this user: bench_compare's two stacks, and tests running alongside.
            "--control-socket",
            str(workdir / "gunicorn.ctl"),
            "service.app:create_app()",
        ],
        port,
        workdir,
        env,
        cwd=code_dir,
    )
    return process, port


def launch_gunicorn(
    args: list[str],
    port: int,
    workdir: Path,
    env: dict[str, str],
    *,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.Popen:
    """This environment's gunicorn with ``args``, in a session of its own (stopped with
    ``stop_process_group``), its log in ``workdir/gunicorn.log``; returned once ``/healthz`` on
    ``port`` answers 200. Raises with the log's end if it exits, or after ``timeout`` seconds."""
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), *args],
        cwd=None if cwd is None else str(cwd),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "gunicorn.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {(workdir / 'gunicorn.log').read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            if _http(port, "GET", "/healthz")[0] == 200:
                return process
        time.sleep(0.2)
    stop_process_group(process)
    raise RuntimeError("gunicorn did not answer /healthz in time")


#: Where each web worker leaves its request CPU sums (``--request-cpu``), inside the run's workdir.
REQUEST_CPU_DIR = "request-cpu"


def request_cpu(workdir: Path, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """What ``scripts/gunicorn_request_cpu.py`` recorded in the measured windows, whole seconds
    only: mean CPU per claim (building excluded) and per submission, CPU per HIT build, the
    builds' CPU spread over the HIT cycles, and all requests' CPU per cycle (the rest of the web
    tier's CPU is gunicorn's own, between requests: accepting, parsing, closing)."""
    seconds = {s for start, end in windows for s in range(math.ceil(start), math.floor(end))}
    totals: dict[str, list[float]] = {}
    for path in sorted((workdir / REQUEST_CPU_DIR).glob("*.json")):
        for second, kinds in json.loads(path.read_text()).items():
            if int(second) in seconds:
                for kind, (count, cpu) in kinds.items():
                    total = totals.setdefault(kind, [0, 0.0])
                    total[0] += count
                    total[1] += cpu

    def mean_ms(kind: str) -> float | None:
        count, cpu = totals.get(kind, (0, 0.0))
        return round(1000 * cpu / count, 3) if count else None

    claims, claim_cpu = totals.get("claim", (0, 0.0))
    builds, build_cpu = totals.get("build", (0, 0.0))

    def per_claim_ms(cpu: float) -> float | None:  # claims stand for the cycles
        return round(1000 * cpu / claims, 3) if claims else None

    # Builds run inside claims (while the response closes): counted once, in "claim".
    in_requests = sum(cpu for kind, (_, cpu) in totals.items() if kind != "build")
    return {
        "seconds": len(seconds),
        "claims": int(claims),
        "ms_per_claim_without_build": per_claim_ms(claim_cpu - build_cpu),
        "ms_per_submit": mean_ms("submit"),
        "builds": int(builds),
        "ms_per_build": mean_ms("build"),
        "build_ms_per_cycle": per_claim_ms(build_cpu),
        "in_requests_ms_per_cycle": per_claim_ms(in_requests),
        "other_requests": int(totals.get("other", (0, 0.0))[0]),
    }


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, float]]:
    """``pid -> (parent pid, CPU seconds)`` of every process; CPU includes reaped children."""
    out = {}
    ticks = _clock_ticks()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the name: state, ppid, ..., utime (12th), stime, cutime, cstime.
        cpu = sum(int(v) for v in fields[11:15]) / ticks
        out[int(entry)] = (int(fields[1]), cpu)
    return out


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each root process and all its descendants (PostgreSQL's backends run in
    sessions of their own, so process groups would miss them)."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, root in roots.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                total += stats[pid][1]
            todo.extend(children.get(pid, ()))
        out[name] = total
    return out


@dataclass(frozen=True)
class MachineTime:
    """CPU seconds all cores spent busy, and the seconds the hypervisor ran something else while
    this machine's virtual CPUs wanted to run (steal): on a shared host the second moves the
    benchmark's figures as much as anything in the code, so reports show it apart."""

    busy: float
    steal: float

    def __sub__(self, other: MachineTime) -> MachineTime:
        return MachineTime(self.busy - other.busy, self.steal - other.steal)


def parse_proc_stat(line: str, ticks: int) -> MachineTime:
    """The aggregate ``cpu`` line of ``/proc/stat`` (user nice system idle iowait irq softirq
    steal ...; clock ticks) as busy seconds, steal excluded, and steal seconds."""
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not the aggregate cpu line of /proc/stat: {line!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return MachineTime((user + nice + system + irq + softirq) / ticks, steal / ticks)


def machine_time() -> MachineTime:
    """Busy and steal seconds of all cores since boot (from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        return parse_proc_stat(f.readline(), _clock_ticks())


# ------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    cycles: list[tuple[float, float, float, int]]  # (end, claim s, submit s, answers accepted)
    no_work: int
    errors: list[str]
    served_twice: int
    resumed: int
    acknowledged_duplicates: int


class KeepAlive:
    """A minimal HTTP/1.1 keep-alive client for the load process.

    ``http.client`` parses every response's headers with the ``email`` package, which would make
    the load generator itself one of the biggest consumers of the two cores it shares with the
    service; this sends pre-built request bytes and reads only the status line and
    ``Content-Length`` (the service always sends one). Not a general HTTP client.
    """

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.sock = None
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.buffer = b""

    def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{self.head}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(request + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._read()
        head = self.buffer[:end].decode("latin-1")
        status = int(head.split(" ", 2)[1])
        match = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if match is None:
            raise RuntimeError(f"response without Content-Length: {head[:200]}")
        size = end + 4 + int(match.group(1))
        while len(self.buffer) < size:
            self._read()
        body, self.buffer = self.buffer[end + 4 : size], self.buffer[size:]
        if re.search(r"(?im)^connection:\s*close", head):
            self.close()
        return status, body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buffer = b""


@dataclass
class _Tally:
    """What the virtual workers of the load process record, shared under one lock."""

    cycles: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    served: set = field(default_factory=set)
    assignments: set = field(default_factory=set)
    counters: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _virtual_worker(port: int, token: str, stop_at: float, tally: _Tally) -> None:
    try:
        _cycles(port, token, stop_at, tally)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # reported, not raised
        tally.errors.append(f"virtual worker stopped: {type(exc).__name__}: {exc}")


def _cycles(port: int, token: str, stop_at: float, tally: _Tally) -> None:
    """Claim a HIT, answer all of it, again, until ``stop_at``; one keep-alive connection."""
    client = KeepAlive(port, {"X-Worker-Token": token, "Content-Type": "application/json"})
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        status, raw = client.post("/api/v1/work/assignments")
        t1 = time.perf_counter()
        if status == 409 and b"no_work" in raw:
            with tally.lock:
                tally.counters["no_work"] += 1
            time.sleep(0.01)
            continue
        if status != 200:
            tally.errors.append(f"claim {status}: {raw[:200]!r}")
            time.sleep(0.05)
            continue
        hit = json.loads(raw)
        ids = [q["id"] for q in hit["questions"]]
        with tally.lock:
            if hit["assignment_id"] in tally.assignments:
                tally.counters["resumed"] += 1
            else:
                tally.assignments.add(hit["assignment_id"])
                for qid in ids:
                    if qid in tally.served:
                        tally.counters["served_twice"] += 1
                    tally.served.add(qid)
        body = json.dumps(
            {"answers": [{"question_id": qid, "value": True, "ms": ANSWER_MS} for qid in ids]}
        ).encode()
        status, raw = client.post(f"/api/v1/work/assignments/{hit['assignment_id']}/answers", body)
        t2 = time.perf_counter()
        if status != 200:
            tally.errors.append(f"submit {status}: {raw[:200]!r}")
            continue
        ack = json.loads(raw)
        if ack["duplicates"]:
            with tally.lock:
                tally.counters["acknowledged_duplicates"] += ack["duplicates"]
        # perf_counter and monotonic are the same clock on Linux (CLOCK_MONOTONIC).
        tally.cycles.append((t2, t1 - t0, t2 - t1, ack["accepted"]))
    client.close()


def run_load(port: int, tokens: list[str], stop_at: float, out: mp.Queue) -> None:
    """The load process: one thread per virtual worker until ``stop_at`` (a monotonic time)."""
    tally = _Tally()
    threads = [
        threading.Thread(target=_virtual_worker, args=(port, t, stop_at, tally), daemon=True)
        for t in tokens
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(
        LoadResult(
            tally.cycles,
            tally.counters["no_work"],
            tally.errors[:20]
            + ([f"... {len(tally.errors) - 20} more"] if len(tally.errors) > 20 else []),
            tally.counters["served_twice"],
            tally.counters["resumed"],
            tally.counters["acknowledged_duplicates"],
        )
    )


def load_and_measure(
    port: int,
    tokens: list[str],
    window: tuple[float, float],
    servers: dict[str, int],
    at_start: Callable[[], None] | None = None,
) -> tuple[LoadResult, dict[str, float], MachineTime]:
    """Run the load process until ``window`` ends (monotonic times); return what it recorded,
    the CPU seconds each server (root pid, with its descendants) and the load process spent
    inside the window, and the whole machine's busy and steal seconds there. ``at_start`` runs
    just before the window opens (e.g. to reset PostgreSQL's statement statistics)."""
    queue: mp.Queue = mp.get_context("fork").Queue()
    loader = mp.get_context("fork").Process(
        target=run_load, args=(port, tokens, window[1], queue), daemon=True
    )
    loader.start()
    roots = {**servers, "load": loader.pid}
    time.sleep(max(0.0, window[0] - time.monotonic()))
    if at_start is not None:
        at_start()
    cpu0, machine0 = tree_cpu(roots), machine_time()
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu1, machine1 = tree_cpu(roots), machine_time()
    load: LoadResult = queue.get(timeout=120)
    loader.join(timeout=30)
    return load, {k: cpu1[k] - cpu0[k] for k in cpu1}, machine1 - machine0


# ----------------------------------------------------------------------------------- checks


def check_database(database_url: str, campaign_id: int, tree_id: int) -> dict[str, Any]:
    """Duplicates, counting, decisions and money, read back from the database after the load."""
    from sqlalchemy import create_engine, text

    from service.engine.policy import Action, PolicyParams, decide

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            one = (
                conn.execute(
                    text(
                        """
                    SELECT
                      (SELECT coalesce(sum(cardinality(s.answer_positions)), 0)
                        FROM assignments s JOIN hits h ON h.id = s.hit_id
                        WHERE h.campaign_id = :c) AS answers,
                      (SELECT count(*) FROM (
                         SELECT s.hit_id, t.q FROM assignments s JOIN hits h ON h.id = s.hit_id
                           CROSS JOIN LATERAL unnest(s.answer_positions,
                                                     s.answer_discard_reasons) AS t(q, r)
                         WHERE h.campaign_id = :c AND t.r IS NULL
                         GROUP BY s.hit_id, t.q, h.max_assignments
                         HAVING count(*) > h.max_assignments) d) AS answers_over_quota,
                      (SELECT count(*) FROM (
                         SELECT s.hit_id FROM assignments s JOIN hits h ON h.id = s.hit_id
                         WHERE h.campaign_id = :c AND s.status <> 'expired'
                         GROUP BY s.hit_id, h.max_assignments
                         HAVING count(*) > h.max_assignments) d) AS hits_over_assigned,
                      (SELECT count(*) FROM assignments s JOIN hits h ON h.id = s.hit_id
                        WHERE h.campaign_id = :c AND s.status = 'approved') AS approved,
                      (SELECT count(*) FROM assignments s JOIN hits h ON h.id = s.hit_id
                        WHERE h.campaign_id = :c AND s.status = 'rejected') AS rejected,
                      (SELECT count(*) FROM hits WHERE campaign_id = :c) AS hits_built,
                      (SELECT count(*) FROM hits WHERE campaign_id = :c AND status = 'open')
                        AS hits_open
                    """
                    ),
                    {"c": campaign_id},
                )
                .mappings()
                .one()
            )
            # Counted once: a cluster's yes/no are exactly its answered sample questions' labels
            # (flat tree: nothing is inherited from a parent).
            miscounted = conn.execute(
                text(
                    """
                    SELECT count(*) FROM clusters c LEFT JOIN (
                        SELECT h.question_cluster_ids[a.p + 1] AS cluster_id,
                               count(*) FILTER (WHERE a.v) AS yes,
                               count(*) FILTER (WHERE NOT a.v) AS no
                        FROM assignments s JOIN hits h ON h.id = s.hit_id
                        CROSS JOIN LATERAL unnest(s.answer_positions, s.answer_values,
                                                  s.answer_discard_reasons) AS a(p, v, r)
                        WHERE h.question_tree_ids[a.p + 1] = :t
                          AND h.question_statuses[a.p + 1] = 'answered' AND a.r IS NULL
                        GROUP BY 1) x ON x.cluster_id = c.id
                    WHERE c.tree_id = :t
                      AND (c.yes_count <> coalesce(x.yes, 0) OR c.no_count <> coalesce(x.no, 0))
                    """
                ),
                {"t": tree_id},
            ).scalar_one()
            states = conn.execute(
                text(
                    "SELECT state, score, size, yes_count, no_count, count(*) FROM clusters "
                    "WHERE tree_id = :t AND yes_count + no_count > 0 "
                    "GROUP BY state, score, size, yes_count, no_count"
                ),
                {"t": tree_id},
            ).all()
            money = conn.execute(
                text(
                    """
                    SELECT c.budget_micros, c.reserved_micros, c.spent_micros, c.status,
                      coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'reserve'), 0),
                      coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'release'), 0),
                      coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'spend'), 0)
                    FROM campaigns c LEFT JOIN ledger_entries l ON l.campaign_id = c.id
                    WHERE c.id = :c GROUP BY c.id
                    """
                ),
                {"c": campaign_id},
            ).one()
            project_params = conn.execute(
                text(
                    "SELECT p.params FROM projects p JOIN campaigns c ON c.project_id = p.id "
                    "WHERE c.id = :c"
                ),
                {"c": campaign_id},
            ).scalar_one()
    finally:
        engine.dispose()
    policy = PolicyParams.from_dict(project_params or {})
    expected_state = {
        Action.ACCEPT: "accepted",
        Action.REJECT: "rejected",
        Action.SPLIT: "split",
    }
    mismatched = decided = 0
    for state, score, size, yes, no, n in states:
        decision = decide(float(score), int(size), int(yes), int(no), policy)
        want = expected_state.get(decision.action)
        if want is None:  # still asking: the cluster must be undecided
            ok = state in ("candidate", "active")
        else:
            ok = state == want
            decided += n if ok else 0
        mismatched += 0 if ok else n
    budget, reserved, spent, status, reserve, release, spend = money
    return {
        "answers_stored": int(one["answers"]),
        "answers_over_quota": int(one["answers_over_quota"]),
        "hits_over_assigned": int(one["hits_over_assigned"]),
        "miscounted_clusters": int(miscounted),
        "clusters_decided": decided,
        "decisions_mismatch": mismatched,
        "assignments": {"approved": int(one["approved"]), "rejected": int(one["rejected"])},
        "hits": {"built": int(one["hits_built"]), "open_at_end": int(one["hits_open"])},
        "ledger": {
            "budget_usd": budget / 1e6,
            "reserved_usd": reserved / 1e6,
            "spent_usd": spent / 1e6,
            "campaign_status": status,
            "within_budget": reserved + spent <= budget,
            "consistent": reserve - release == reserved + spent and spend == spent,
        },
    }


# ---------------------------------------------------------------------------------- pgbench


def run_pgbench(server: Any, dbname: str, seconds: float, clients: int) -> dict[str, Any]:
    """One-row INSERT transactions into a scratch table, ``clients`` connections."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server.url(dbname))
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE bench_scratch (id bigserial PRIMARY KEY, v integer NOT NULL, "
                    "at timestamptz NOT NULL DEFAULT now())"
                )
            )
    finally:
        engine.dispose()
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write("\\set v random(1, 1000000)\nINSERT INTO bench_scratch (v) VALUES (:v);\n")
    try:
        result = subprocess.run(
            [
                str(server.bindir / "pgbench"),
                "--no-vacuum",
                "--file",
                script.name,
                "--client",
                str(clients),
                "--jobs",
                str(min(clients, os.cpu_count() or 1)),
                "--time",
                str(max(1, round(seconds))),
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--username",
                server.user,
                dbname,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script.name)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output: {result.stdout[-1000:]}")
    return {"insert_tps": round(float(match.group(1)), 1), "clients": clients, "seconds": seconds}


# ----------------------------------------------------------------------------------- report


def reset_statements(database_url: str) -> None:
    """Start pg_stat_statements' counts afresh (at the start of the measured window)."""
    with _psycopg(database_url) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")


def top_statements(database_url: str, limit: int, cycles: int) -> list[dict[str, Any]]:
    """The statements PostgreSQL spent most execution time in since the reset, per HIT cycle."""
    with _psycopg(database_url) as conn:
        rows = conn.execute(
            "SELECT calls, total_exec_time, total_plan_time, rows, query"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT %s",
            (limit,),
        ).fetchall()
    per = max(cycles, 1)
    return [
        {
            "ms_per_cycle": round(total / per, 3),
            "plan_ms_per_cycle": round(plan / per, 3),
            "calls_per_cycle": round(calls / per, 3),
            "rows_per_call": round(n / max(calls, 1), 1),
            "query": " ".join(query.split())[:160],
        }
        for calls, total, plan, n, query in rows
    ]


def _psycopg(database_url: str):
    import psycopg

    return psycopg.connect(
        database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(1000 * percentile(values, 50), 1),
        "p99": round(1000 * percentile(values, 99), 1),
        "max": round(1000 * max(values), 1),
    }


def summarize(
    load: LoadResult, window: tuple[float, float], cpu: dict[str, float], machine: MachineTime
) -> dict[str, Any]:
    start, end = window
    span = end - start
    measured = [c for c in load.cycles if start <= c[0] < end]
    n = len(measured)
    claims = [c[1] for c in measured]
    submits = [c[2] for c in measured]
    ours = sum(cpu.values())
    return {
        "cycles": n,
        "cycles_per_s": round(n / span, 1),
        "answers_per_s": round(sum(c[3] for c in measured) / span, 1),
        "latency_ms": {
            "request": _ms(claims + submits),
            "cycle": _ms([c[1] + c[2] for c in measured]),
            "claim": _ms(claims),
            "submit": _ms(submits),
        },
        "cpu_ms_per_cycle": {
            **{k: round(1000 * v / n, 2) if n else None for k, v in cpu.items()},
            "total": round(1000 * ours / n, 2) if n else None,
        },
        # What the CPU spent per cycle would allow if this run had every core to itself.
        "cpu_bound_cycles_per_s": round(n * (os.cpu_count() or 1) / ours, 1) if ours else None,
        "cpu_cores_used": {k: round(v / span, 2) for k, v in cpu.items()},
        "other_busy_cores": round(max(0.0, machine.busy - ours) / span, 2),
        "steal_cores": round(max(0.0, machine.steal) / span, 2),
    }


# ------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def scratch_dir(prefix: str, what: str) -> Iterator[Path]:
    """A working directory (gunicorn's log, storage) removed after a run that succeeded and kept
    after one that failed, whose message says where it is."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    except BaseException:
        print(f"{what} failed; gunicorn logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    from service import migrate
    from service.devservers import NginxServer, PostgresServer, RedisServer

    settings = (
        {
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track_planning": "on",
        }
        if options.statements
        else {}
    )
    server = PostgresServer(fsync=options.fsync, settings=settings).start()
    redis_server = None
    nginx = None
    gunicorn: subprocess.Popen | None = None
    with scratch_dir("maskmill-bench-", "benchmark") as workdir:
        try:
            redis_server = RedisServer().start()
            url = server.create_database("bench")
            migrate.upgrade(url)
            seeded = seed_project(url, options.clusters)
            gunicorn, port = start_gunicorn(url, workdir, options, redis_server.url)
            seed_through_api(port, url, seeded, options)
            servers = {
                "postgres": server.process.pid,
                "gunicorn": gunicorn.pid,
                "redis": redis_server.process.pid,
            }
            load_port = port
            if options.proxy:
                config = (REPO / "deploy" / "nginx.conf").read_text()
                nginx = NginxServer(config, f"127.0.0.1:{port}").start()
                servers["nginx"] = nginx.process.pid
                load_port = nginx.port

            loadavg_before = os.getloadavg()
            begin = time.monotonic()
            window = (begin + options.warmup, begin + options.warmup + options.duration)
            load, cpu, machine = load_and_measure(
                load_port,
                seeded.tokens,
                window,
                servers,
                at_start=(lambda: reset_statements(url)) if options.statements else None,
            )
            loadavg_after = os.getloadavg()
            stop_process_group(gunicorn)  # its workers write their request CPU as they exit
            gunicorn = None

            result = summarize(load, window, cpu, machine)
            statements = (
                top_statements(url, options.statements, result["cycles"])
                if options.statements
                else None
            )
            web = request_cpu(workdir, [window]) if options.request_cpu else None
            checks = check_database(url, seeded.campaign_id, seeded.tree_id)
            pgbench = run_pgbench(server, "bench", options.pgbench_seconds, options.pgbench_clients)
            duplicates = {
                "questions_served_twice": load.served_twice + checks["hits_over_assigned"],
                "answers_counted_twice": checks["answers_over_quota"]
                + checks["miscounted_clusters"],
                "acknowledged_as_duplicate": load.acknowledged_duplicates,
            }
            report = {
                "benchmark": "crowd HIT cycle (claim 50+5 questions, submit 55 answers)",
                "hit_cycles_per_s": result["cycles_per_s"],
                "answers_per_s": result["answers_per_s"],
                "latency_ms": result["latency_ms"],
                "duplicates": duplicates,
                "ledger": checks["ledger"],
                "pgbench": pgbench,
                "target": {
                    "hit_cycles_per_s": TARGET_CYCLES_PER_S,
                    "p99_request_ms": TARGET_P99_MS,
                    "met": bool(
                        result["cycles_per_s"] >= TARGET_CYCLES_PER_S
                        and (result["latency_ms"]["request"]["p99"] or math.inf) < TARGET_P99_MS
                        and not any(
                            duplicates[k]
                            for k in ("questions_served_twice", "answers_counted_twice")
                        )
                    ),
                },
                "cycles_measured": result["cycles"],
                "no_work_answers": load.no_work,
                "errors": load.errors,
                "resumed_claims": load.resumed,
                "database": {
                    k: checks[k]
                    for k in (
                        "answers_stored",
                        "clusters_decided",
                        "decisions_mismatch",
                        "assignments",
                        "hits",
                    )
                },
                "cpu_ms_per_cycle": result["cpu_ms_per_cycle"],
                **({"postgres_statements": statements} if statements is not None else {}),
                **({"web_request_cpu": web} if web is not None else {}),
                "cpu_cores_used": result["cpu_cores_used"],
                "cpu_bound_cycles_per_s": result["cpu_bound_cycles_per_s"],
                "machine": {
                    "cpus": os.cpu_count(),
                    "loadavg_before": [round(v, 2) for v in loadavg_before],
                    "loadavg_after": [round(v, 2) for v in loadavg_after],
                    "other_busy_cores": result["other_busy_cores"],
                    "steal_cores": result["steal_cores"],
                },
                "config": {
                    "duration_s": options.duration,
                    "warmup_s": options.warmup,
                    "virtual_workers": options.virtual_workers,
                    "clusters": options.clusters,
                    "gunicorn": f"{options.gunicorn_workers} workers x {options.gunicorn_threads} threads ({options.gunicorn_class})",
                    "postgres_fsync": options.fsync,
                    "campaign_params": options.campaign_params,
                    "proxy": "nginx (deploy/nginx.conf)" if options.proxy else None,
                },
            }
        finally:
            if nginx is not None:
                nginx.stop()
            if gunicorn is not None:
                stop_process_group(gunicorn)
            if redis_server is not None:
                redis_server.stop()
            server.stop()
    if options.as_json:
        print(json.dumps(report, indent=2))
    else:
        lat = report["latency_ms"]
        print(
            f"{report['hit_cycles_per_s']} HIT cycles/s, {report['answers_per_s']} answers/s, "
            f"request p50 {lat['request']['p50']} ms p99 {lat['request']['p99']} ms, "
            f"duplicates {report['duplicates']}, pgbench insert {pgbench['insert_tps']} tps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
