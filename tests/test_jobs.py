"""Jobs: deterministic ids refuse duplicates, failures are recorded with their error, transient
failures are retried, and the same jobs run through RQ on a real Redis with a real worker."""

from __future__ import annotations

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue, SimpleWorker

from service import jobs
from service.jobs import DuplicateJobError, InProcessRunner, enqueue, execute, reconcile
from service.models import Job, JobStatus

CALLS: dict[str, int] = {}


def echo(ctx, *, value: int) -> dict:
    ctx.progress(0.5, "halfway", value=value)
    return {"value": value * 2}


def broken(ctx) -> None:
    raise ValueError("bad input file row 3")


def flaky(ctx, *, key: str, failures: int) -> dict:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= failures:
        raise jobs.TransientJobError("database busy")
    return {"calls": CALLS[key]}


def redis_blip(ctx, *, key: str) -> dict:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] == 1:
        raise RedisConnectionError("Error 111 connecting to localhost:6379. Connection refused.")
    return {"calls": CALLS[key]}


FINAL: dict[str, list[bool]] = {}


def always_busy(ctx, *, key: str) -> None:
    """Fails transiently every time, noting whether each attempt knew it was the last."""
    FINAL.setdefault(key, []).append(ctx.final_attempt)
    raise jobs.TransientJobError("database busy")


@pytest.fixture(autouse=True)
def allow_test_jobs(monkeypatch):
    monkeypatch.setattr(jobs, "_ALLOWED_PREFIXES", ("workers.", "service.", "tests."))


@pytest.fixture()
def fast_settings(settings):
    return settings.replace(job_retry_delays=(0, 0))


def _status(db, job_id) -> Job:
    db.expire_all()
    return db.get(Job, job_id)


def test_unknown_function_refused(db, fast_settings):
    with pytest.raises(ValueError, match="does not exist"):
        enqueue(db, fast_settings, "tests.test_jobs.nothing", job_id="x1")
    with pytest.raises(ValueError, match="outside"):
        enqueue(db, fast_settings, "os.system", job_id="x2")
    with pytest.raises(ValueError, match="queue"):
        enqueue(db, fast_settings, "tests.test_jobs.echo", job_id="x3", queue="fast", value=1)


def test_in_process_job_runs_and_reports(db, fast_settings):
    job = enqueue(db, fast_settings, "tests.test_jobs.echo", job_id="echo-1", value=21)
    runner = jobs.dispatcher_for(fast_settings)
    assert isinstance(runner, InProcessRunner)
    runner.wait(job.id, timeout=30)
    done = _status(db, "echo-1")
    assert done.status is JobStatus.FINISHED
    assert done.progress["result"] == {"value": 42}
    assert done.attempts == 1


def test_duplicate_enqueue_refused(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.echo", job_id="dup-1", value=1)
    jobs.dispatcher_for(fast_settings).wait("dup-1", timeout=30)
    with pytest.raises(DuplicateJobError):
        enqueue(db, fast_settings, "tests.test_jobs.echo", job_id="dup-1", value=1)


def test_failure_is_recorded_not_retried(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.broken", job_id="broken-1")
    jobs.dispatcher_for(fast_settings).wait("broken-1", timeout=30)
    failed = _status(db, "broken-1")
    assert failed.status is JobStatus.FAILED
    assert failed.error == "ValueError: bad input file row 3"
    assert failed.attempts == 1
    # a failed job may be enqueued again (the user's retry)
    enqueue(db, fast_settings, "tests.test_jobs.broken", job_id="broken-1")
    jobs.dispatcher_for(fast_settings).wait("broken-1", timeout=30)
    assert _status(db, "broken-1").attempts == 2


def test_transient_failure_retried_in_process(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.flaky", job_id="flaky-1", key="a", failures=2)
    jobs.dispatcher_for(fast_settings).wait("flaky-1", timeout=30)
    job = _status(db, "flaky-1")
    assert job.status is JobStatus.FINISHED and job.attempts == 3


def test_a_redis_blip_is_transient(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.redis_blip", job_id="blip-1", key="blip")
    jobs.dispatcher_for(fast_settings).wait("blip-1", timeout=30)
    job = _status(db, "blip-1")
    assert job.status is JobStatus.FINISHED, job.error
    assert job.attempts == 2


def test_transient_failure_exhausts_retries(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.flaky", job_id="flaky-2", key="b", failures=9)
    jobs.dispatcher_for(fast_settings).wait("flaky-2", timeout=30)
    job = _status(db, "flaky-2")
    assert job.status is JobStatus.FAILED and job.attempts == 3
    assert "database busy" in job.error


@pytest.fixture()
def rq_settings(fast_settings, redis_server):
    connection = Redis.from_url(redis_server.url)
    connection.flushall()
    yield fast_settings.replace(redis_url=redis_server.url)
    connection.close()


def _work(rq_settings) -> None:
    connection = Redis.from_url(rq_settings.redis_url)
    queues = [Queue(name, connection=connection) for name in jobs.QUEUES]
    # SimpleWorker runs jobs in this process, so the monkeypatched allow-list applies.
    SimpleWorker(queues, connection=connection).work(burst=True)
    connection.close()


def test_rq_job_runs_on_real_redis(db, rq_settings, monkeypatch):
    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    enqueue(db, rq_settings, "tests.test_jobs.echo", job_id="rq-echo", queue="gpu", value=5)
    assert _status(db, "rq-echo").status is JobStatus.QUEUED
    _work(rq_settings)
    job = _status(db, "rq-echo")
    assert job.status is JobStatus.FINISHED and job.progress["result"] == {"value": 10}


def test_rq_dispatcher_is_shared_and_keeps_its_connection(
    db, rq_settings, redis_server, monkeypatch
):
    """Every dispatch of a process goes through one Redis connection pool (a new client per
    dispatch paid a connection and handshake per built batch of HITs)."""
    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    dispatcher = jobs.dispatcher_for(rq_settings)
    assert jobs.dispatcher_for(rq_settings.replace()) is dispatcher
    observer = Redis.from_url(redis_server.url)
    before = observer.info("stats")["total_connections_received"]
    for n in range(5):
        enqueue(db, rq_settings, "tests.test_jobs.echo", job_id=f"rq-shared-{n}", value=n)
    after = observer.info("stats")["total_connections_received"]
    observer.close()
    assert after - before <= 1  # at most the pool's first connection, then reused
    assert Queue("cpu", connection=dispatcher.connection).count == 5
    _work(rq_settings)
    assert all(_status(db, f"rq-shared-{n}").status is JobStatus.FINISHED for n in range(5))


def test_rq_transient_failure_retried_then_reported(db, rq_settings, monkeypatch):
    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    enqueue(db, rq_settings, "tests.test_jobs.flaky", job_id="rq-flaky", key="c", failures=9)
    _work(rq_settings)
    job = _status(db, "rq-flaky")
    assert job.status is JobStatus.FAILED
    assert job.attempts == 3  # the first try and two retries
    assert "database busy" in job.error


def test_a_job_knows_its_last_attempt_in_process(db, fast_settings):
    enqueue(db, fast_settings, "tests.test_jobs.always_busy", job_id="final-1", key="in-process")
    jobs.dispatcher_for(fast_settings).wait("final-1", timeout=30)
    assert FINAL["in-process"] == [False, False, True]
    assert _status(db, "final-1").status is JobStatus.FAILED


def test_a_job_knows_its_last_attempt_as_rq_counts_it(db, rq_settings, monkeypatch):
    """RQ's retries were fixed when the job was enqueued (the app's two delays); the worker's
    own settings say four. The job must go by RQ's count: a round whose last attempt failed is
    marked failed, not left waiting for a retry that never comes."""
    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    monkeypatch.setenv("MASKMILL_JOB_RETRY_DELAYS", "0,0,0,0")  # the worker process's settings
    enqueue(db, rq_settings, "tests.test_jobs.always_busy", job_id="final-rq", key="rq")
    _work(rq_settings)
    assert FINAL["rq"] == [False, False, True]
    assert _status(db, "final-rq").status is JobStatus.FAILED


def test_reconcile_requeues_after_redis_flush(db, rq_settings, monkeypatch):
    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    enqueue(db, rq_settings, "tests.test_jobs.echo", job_id="rq-lost", value=7)
    Redis.from_url(rq_settings.redis_url).flushall()  # the queue is gone, the row is not
    assert reconcile(db, rq_settings) == ["rq-lost"]
    _work(rq_settings)
    assert _status(db, "rq-lost").status is JobStatus.FINISHED


def test_execute_unknown_job(fast_settings):
    with pytest.raises(ValueError, match="no job"):
        execute("never-enqueued", settings=fast_settings, in_process=True)


def test_cli_reconcile_and_worker_start_redispatch_lost_jobs(db, rq_settings, monkeypatch):
    from click.testing import CliRunner

    from service.cli import main

    monkeypatch.setenv("MASKMILL_DATABASE_URL", rq_settings.database_url)
    monkeypatch.setenv("MASKMILL_REDIS_URL", rq_settings.redis_url)
    monkeypatch.setenv("MASKMILL_STORAGE_URL", rq_settings.storage_url)
    enqueue(db, rq_settings, "tests.test_jobs.echo", job_id="cli-lost", value=3)
    redis = Redis.from_url(rq_settings.redis_url)
    redis.flushall()
    result = CliRunner().invoke(main, ["jobs", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "re-dispatched job cli-lost" in result.output
    assert "1 job(s) re-dispatched" in result.output
    again = CliRunner().invoke(main, ["jobs", "reconcile"])  # now Redis holds it: nothing to do
    assert "0 job(s) re-dispatched" in again.output
    redis.flushall()
    # `maskmill worker` reconciles before it starts working, so it runs the lost job itself.
    worked = CliRunner().invoke(main, ["worker", "--burst", "--queues", ",".join(jobs.QUEUES)])
    assert worked.exit_code == 0, worked.output
    assert "re-dispatched job cli-lost" in worked.output
    assert _status(db, "cli-lost").status is JobStatus.FINISHED
