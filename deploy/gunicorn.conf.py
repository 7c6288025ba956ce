"""gunicorn settings for the web service: `gunicorn -c deploy/gunicorn.conf.py 'service.app:create_app()'`.

Threads, not processes only: most of a request is waiting on PostgreSQL, and threads share one
connection pool per process.
"""

import multiprocessing
import os

bind = os.environ.get("MASKMILL_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
threads = int(os.environ.get("MASKMILL_THREADS", "4"))
worker_class = "gthread"
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
# Recycle workers now and then so slow leaks cannot accumulate.
max_requests = 20000
max_requests_jitter = 2000
