"""The ``maskmill`` command line: database migrations, API keys, the web server, job workers, and the
offline tools (simulation, synthetic data).

Heavy imports (gunicorn, rq, the simulator, torch) happen inside the command that needs them, so
``maskmill --help`` is instant and the web service never imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click

from service.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    settings.ensure_local_dirs()
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """maskmill: build instance-segmentation datasets by crowd verification of mask clusters.

    Configuration comes from MASKMILL_* environment variables (see the README); with none set,
    everything runs embedded: SQLite and files under ./var, jobs in-process.
    """


# ------------------------------------------------------------------------------------ db


@main.group()
def db() -> None:
    """Create or migrate the database schema (run `maskmill db upgrade` on every deploy)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to reach.")
def db_upgrade(revision: str) -> None:
    """Bring the database at MASKMILL_DATABASE_URL up to the latest schema (safe to repeat)."""
    from service import migrate

    settings = _settings()
    try:
        migrate.upgrade(settings.database_url, revision)
    except Exception as exc:  # surface driver/connection errors as one readable line
        raise click.ClickException(f"database upgrade failed: {exc}") from None
    click.echo(f"database at revision {migrate.current(settings.database_url)}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Roll the schema back to REVISION ('base' drops everything; data is lost)."""
    from service import migrate

    settings = _settings()
    try:
        migrate.downgrade(settings.database_url, revision)
    except Exception as exc:
        raise click.ClickException(f"database downgrade failed: {exc}") from None
    click.echo(f"database at revision {migrate.current(settings.database_url) or 'base'}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision the database is at."""
    from service import migrate

    settings = _settings()
    try:
        click.echo(migrate.current(settings.database_url) or "base (empty database)")
    except Exception as exc:
        raise click.ClickException(f"cannot read the database: {exc}") from None


# ------------------------------------------------------------------------------ API keys


@main.command("create-key")
@click.option("--name", required=True, help="Who or what the key is for, e.g. 'alice laptop'.")
def create_key(name: str) -> None:
    """Create a requester API key and print it once (only its hash is stored).

    Send it as `Authorization: Bearer <key>`; a key sees only the projects it created.
    """
    from service.auth import create_api_key
    from service.db import Database

    settings = _settings()
    database = Database(settings.database_url)
    try:
        with database.session() as session:
            _, plaintext = create_api_key(session, name)
            session.commit()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(
            f"could not store the key ({type(exc).__name__}); run `maskmill db upgrade` first?"
        ) from None
    finally:
        database.dispose()
    click.echo(plaintext)


# --------------------------------------------------------------------------------- serve


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn processes.")
@click.option("--threads", default=4, show_default=True, type=int, help="Threads per process.")
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Run the web service (REST API, HIT page, dashboard) under gunicorn."""
    settings = _settings()
    from gunicorn.app.wsgiapp import run

    from service.db import check_connection_budget

    try:
        problem = check_connection_budget(settings.database_url, workers, threads)
    except Exception as exc:  # unreachable now: the service reports it on its first request
        problem = f"could not check it ({type(exc).__name__}: {exc})"
    if problem:
        click.echo(f"warning: PostgreSQL connection budget: {problem}", err=True)

    sys.argv = [
        "gunicorn",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--worker-class",
        "gthread",
        "--access-logfile",
        "-",
        "service.app:create_app()",
    ]
    run()


# -------------------------------------------------------------------------------- worker


@main.command()
@click.option(
    "--queues",
    default="gpu,cpu,mturk",
    show_default=True,
    help="Comma-separated RQ queues to take jobs from, highest priority first.",
)
@click.option("--burst", is_flag=True, help="Exit when the queues are empty instead of waiting.")
def worker(queues: str, burst: bool) -> None:
    """Run a background job worker (RQ) on MASKMILL_REDIS_URL.

    Without Redis (the embedded default) jobs run inside the web process and no worker is needed.
    """
    settings = _settings()
    if not settings.redis_url:
        raise click.ClickException(
            "MASKMILL_REDIS_URL is not set: jobs run in-process, there is nothing for a worker to do"
        )
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise click.ClickException("--queues names no queue")
    import redis
    from rq import Queue, Worker

    connection = redis.Redis.from_url(settings.redis_url)
    try:
        connection.ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis at {settings.redis_url}: {exc}") from None
    # Redis holds only the transport: whatever PostgreSQL still says is queued but Redis lost
    # (a flush, a restart without persistence) is dispatched again before work starts.
    for job_id in _reconcile(settings):
        click.echo(f"re-dispatched job {job_id} (queued in the database, missing from Redis)")
    rq_worker = Worker(
        [Queue(name, connection=connection) for name in names], connection=connection
    )
    rq_worker.work(burst=burst)


def _reconcile(settings: Settings) -> list[str]:
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import Database
    from service.jobs import reconcile

    database = Database(settings.database_url)
    try:
        with database.session() as session:
            return reconcile(session, settings)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"cannot read the jobs table ({type(exc).__name__}: {exc.args[0] if exc.args else ''}); "
            "is MASKMILL_DATABASE_URL right, and did `maskmill db upgrade` run?"
        ) from None
    finally:
        database.dispose()


@main.group()
def jobs() -> None:
    """Background jobs."""


@jobs.command("reconcile")
def jobs_reconcile() -> None:
    """Dispatch again every job the database says is queued but Redis does not hold (after a
    Redis flush or restart; `maskmill worker` also does this when it starts)."""
    settings = _settings()
    if not settings.redis_url:
        raise click.ClickException(
            "MASKMILL_REDIS_URL is not set: jobs run in-process, there is nothing to reconcile"
        )
    redone = _reconcile(settings)
    for job_id in redone:
        click.echo(f"re-dispatched job {job_id}")
    click.echo(f"{len(redone)} job(s) re-dispatched")


# ------------------------------------------------------------------------- offline tools


def _delegate(module: str, args: tuple[str, ...]) -> None:
    """Hand the remaining arguments to a tool's own argparse ``main`` (its --help is the doc)."""
    import importlib

    entry: Callable[[list[str]], int] = importlib.import_module(module).main
    code = entry(list(args))
    if code:
        sys.exit(code)


_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@main.command(context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate(args: tuple[str, ...]) -> None:
    """Simulate a large campaign (the paper's Sec. 5.2) and its baselines; `simulate --help`."""
    _delegate("workers.simulate", args)


@main.command(context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def synth(args: tuple[str, ...]) -> None:
    """Generate a synthetic instance-segmentation dataset (images + COCO); `synth --help`."""
    _delegate("workers.synthetic", args)


@main.command("seed-select", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def seed_select(args: tuple[str, ...]) -> None:
    """Order unlabelled images farthest-first so hand-annotated seeds cover the pool; `--help`."""
    _delegate("workers.seed_select", args)


if __name__ == "__main__":  # pragma: no cover - `python -m service.cli`
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
