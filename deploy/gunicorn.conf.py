"""gunicorn settings for the web service: `gunicorn -c deploy/gunicorn.conf.py 'service.app:create_app()'`.

Two shapes, chosen by ``MASKMILL_WORKER_CLASS``:

* ``gthread`` (default, for gunicorn facing clients directly): a few threads per process, which
  survive slow clients and share one connection pool per process.
* ``sync`` (behind a buffering proxy such as deploy/nginx.conf, as docker-compose runs it): one
  request per process, and each request goes to whichever process is free. On the crowd hot path
  this halves the slowest requests' latency at the same throughput (scripts/bench_service.py,
  2 cores: p99 about 75 ms against 120-180 ms for 2 x 2 gthread): threads of one process queue
  for its GIL and requests queue behind the keep-alive connection's process, where a free sync
  process would have taken them. Without a buffering proxy, a slow client would hold a sync
  process for as long as it takes to send its request, so it is not the default.
"""

import multiprocessing
import os

bind = os.environ.get("MASKMILL_BIND", "0.0.0.0:8000")
worker_class = os.environ.get("MASKMILL_WORKER_CLASS", "gthread")
if worker_class not in ("gthread", "sync"):
    raise SystemExit(f"MASKMILL_WORKER_CLASS must be gthread or sync, not {worker_class!r}")
_cores = multiprocessing.cpu_count()
# sync: a process per core plus one to run while another waits on PostgreSQL (more measured
# worse on 2 cores with PostgreSQL on the same machine: row-lock queues, not throughput).
workers = int(os.environ.get("WEB_CONCURRENCY", _cores + 1 if worker_class == "sync" else _cores))
threads = int(os.environ.get("MASKMILL_THREADS", "1" if worker_class == "sync" else "4"))
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
# Recycle workers now and then so slow leaks cannot accumulate.
max_requests = 20000
max_requests_jitter = 2000


def on_starting(server):
    """Warn, before any worker starts, when PostgreSQL cannot take every connection this shape
    may open (``service.db.check_connection_budget``). A warning, not a refusal: the service
    runs until a burst needs the last connections."""
    from service.db import check_connection_budget
    from service.settings import Settings

    try:
        url = Settings.from_env().database_url
        problem = check_connection_budget(url, server.cfg.workers, server.cfg.threads)
    except Exception as exc:  # the service reports its own settings and database errors
        server.log.warning("could not check the PostgreSQL connection budget: %s", exc)
        return
    if problem:
        server.log.warning("connection budget: %s", problem)
