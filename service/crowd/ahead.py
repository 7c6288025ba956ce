"""Build HITs ahead of demand on a background thread of the web process.

A claim that leaves a campaign's pool of open HITs low asks for the next batch to be built. The
build takes tens of milliseconds of database work; run in the request's own thread after the
response (``call_on_close``), it held the worker's keep-alive connection, so that worker's next
request (its submission) waited for the whole build: the slowest requests of the hot path. Here
one daemon thread per process builds, one campaign at a time, and a campaign asked for again while
it is queued is queued once.

Nothing is lost if the thread dies with its process: a build is one transaction, and a claim that
finds no open HIT builds on demand.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Build = Callable[[int], None]


class AheadBuilder:
    """A queue of campaign ids and the thread that builds their next batch."""

    def __init__(self, build: Build) -> None:
        self._build = build
        self._pending: list[int] = []
        self._queued: set[int] = set()
        self._busy = False
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def request(self, campaign_id: int) -> None:
        """Queue a build for ``campaign_id`` (once, however often it is asked for)."""
        with self._lock:
            self._ensure_thread()
            if campaign_id not in self._queued:
                self._queued.add(campaign_id)
                self._pending.append(campaign_id)
                self._lock.notify()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or building; ``False`` if ``timeout`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _ensure_thread(self) -> None:
        # Threads do not survive fork: a gunicorn worker forked after the first request (or a
        # pre-loaded app) starts its own.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._pending, self._queued, self._busy = [], set(), False
        self._thread = threading.Thread(target=self._run, name="maskmill-build-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._pending))
                campaign_id = self._pending.pop(0)
                self._queued.discard(campaign_id)
                self._busy = True
            try:
                self._build(campaign_id)
            except Exception:  # claims build on demand if this fails; keep the thread alive
                log.exception("building HITs ahead for campaign %s failed", campaign_id)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()
