"""Compare the crowd hot path of this checkout with another one, in alternating time slices.

    git worktree add /tmp/baseline <rev>
    python scripts/bench_compare.py /tmp/baseline --json

Why: on this machine the same code measures 114-236 HIT cycles/s from one hour to the next (the
host's own load moves it), so two runs of ``scripts/bench_service.py`` minutes apart cannot show a
change of a few percent. Here both versions run side by side, each a whole stack of its own
(PostgreSQL, Redis, gunicorn serving its checkout's ``service`` package, a campaign seeded the same
way), and the load of ``bench_service`` (same virtual workers, same cycle) goes to one of them at a
time, in short slices ordered baseline, current, current, baseline, ... (so a drift that is
linear over two slices cancels out). The idle stack costs next to nothing while the other one
runs. Each slice gives a cycles/s and a CPU per cycle (PostgreSQL + gunicorn + Redis + the load
process, from ``/proc``); each pair of neighbouring slices a ratio, current / baseline. The ratios'
median and spread are the result: ``cycles_per_s_ratio`` above 1 and ``cpu_per_cycle_ratio``
below 1 mean this checkout is faster.

Both checkouts must share the schema of the tables seeded in SQL (projects, trees, clusters, gold
items, workers): each database is migrated by its own checkout, the seed is written by this one.
The database checks of ``bench_service`` (no question served twice, no answer counted twice,
decisions as the engine's, ledger) run on this checkout's stack only; errors seen by the load are
reported for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_service as bench  # noqa: E402

LABELS = ("baseline", "current")


@dataclass
class Stack:
    """One version's servers and campaign."""

    label: str
    code_dir: Path
    postgres: Any = None
    redis: Any = None
    gunicorn: subprocess.Popen | None = None
    port: int = 0
    url: str = ""
    seeded: Any = None
    slices: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    workdir: Path | None = None
    #: The measured slices' windows (``time.monotonic()``), for ``--request-cpu``.
    windows: list[tuple[float, float]] = field(default_factory=list)
    web: dict[str, Any] | None = None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, bench.Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--pairs", type=int, default=8, help="baseline/current slice pairs")
    parser.add_argument("--slice", type=float, default=8.0, help="measured seconds per slice")
    parser.add_argument(
        "--settle", type=float, default=1.5, help="unmeasured seconds at the start of a slice"
    )
    parser.add_argument("--virtual-workers", type=int, default=16)
    parser.add_argument("--gunicorn-class", choices=("sync", "gthread"), default="sync")
    parser.add_argument(
        "--request-cpu",
        action="store_true",
        help="also compare the web workers' CPU per claim, submission and HIT build "
        "(bench_service.py --request-cpu), summed over each stack's measured slices",
    )
    parser.add_argument(
        "--quiet-steal",
        type=float,
        default=0.05,
        help="also summarise the pairs where neither slice lost more than this many cores to "
        "the host (steal)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.quiet_steal < 0:
        parser.error("--quiet-steal must be >= 0")
    baseline = args.baseline.resolve()
    if not (baseline / "service" / "__init__.py").is_file():
        raise SystemExit(f"{args.baseline}: not a maskmill checkout (no service/__init__.py)")
    if baseline == REPO:
        raise SystemExit(f"{args.baseline}: that is this checkout; compare with another one")
    if args.pairs < 1 or args.slice <= 0 or args.settle < 0 or args.virtual_workers < 1:
        raise SystemExit("--pairs and --virtual-workers must be >= 1, --slice > 0, --settle >= 0")
    args.baseline = baseline
    seconds = 2 * args.pairs * (args.slice + args.settle) + 10
    options = bench.parse_args(
        [
            "--duration", str(seconds),
            "--virtual-workers", str(args.virtual_workers),
            "--gunicorn-class", args.gunicorn_class,
            *(["--request-cpu"] if args.request_cpu else []),
        ]
    )  # fmt: skip
    return args, options


def _migrate(code_dir: Path, url: str) -> None:
    """Each database gets its own checkout's migrations (in a process importing that code)."""
    script = "import sys; from service import migrate; migrate.upgrade(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, '.'); {script}", url],
        cwd=code_dir,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrating with {code_dir} failed: {done.stderr[-2000:]}")


def start_stack(stack: Stack, options: bench.Options, workdir: Path) -> None:
    from service.devservers import PostgresServer, RedisServer

    stack.postgres = PostgresServer().start()
    stack.redis = RedisServer().start()
    stack.url = stack.postgres.create_database("bench")
    _migrate(stack.code_dir, stack.url)
    stack.seeded = bench.seed_project(stack.url, options.clusters)
    stack.workdir = workdir / stack.label
    stack.workdir.mkdir()
    stack.gunicorn, stack.port = bench.start_gunicorn(
        stack.url, stack.workdir, options, stack.redis.url, code_dir=stack.code_dir
    )
    bench.seed_through_api(stack.port, stack.url, stack.seeded, options)


def stop_stack(stack: Stack) -> None:
    if stack.gunicorn is not None:
        bench.stop_process_group(stack.gunicorn)
    for server in (stack.redis, stack.postgres):
        if server is not None:
            server.stop()


def run_slice(stack: Stack, seconds: float, settle: float, *, measured: bool = True) -> None:
    """Load one stack for ``settle + seconds``; record the measured part's rate and CPU."""
    start = time.monotonic()
    window = (start + settle, start + settle + seconds)
    servers = {
        "postgres": stack.postgres.process.pid,
        "gunicorn": stack.gunicorn.pid,
        "redis": stack.redis.process.pid,
    }
    load, cpu, machine = bench.load_and_measure(stack.port, stack.seeded.tokens, window, servers)
    stack.errors.extend(load.errors)
    if not measured:
        return
    result = bench.summarize(load, window, cpu, machine)
    stack.windows.append(window)
    stack.slices.append(
        {
            "cycles_per_s": result["cycles_per_s"],
            "cpu_ms_per_cycle": result["cpu_ms_per_cycle"]["total"],
            "other_busy_cores": result["other_busy_cores"],
            "steal_cores": result["steal_cores"],
        }
    )
    stack.latencies.extend(
        s for c in load.cycles if window[0] <= c[0] < window[1] for s in (c[1], c[2])
    )


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def compare(stacks: dict[str, Stack], quiet_steal: float = 0.05) -> dict[str, Any]:
    base, cur = stacks["baseline"].slices, stacks["current"].slices
    # A slice without a cycle has no CPU per cycle (None): its pair says nothing.
    pairs = [
        (b, c)
        for b, c in zip(base, cur, strict=True)
        if b["cpu_ms_per_cycle"] and c["cpu_ms_per_cycle"]
    ]
    report: dict[str, Any] = {}
    for label, stack in stacks.items():
        rates = [s["cycles_per_s"] for s in stack.slices]
        cpus = [s["cpu_ms_per_cycle"] for s in stack.slices if s["cpu_ms_per_cycle"]]
        report[label] = {
            "code": str(stack.code_dir),
            "cycles_per_s": _spread(rates),
            "cpu_ms_per_cycle": _spread(cpus),
            "request_ms": bench._ms(stack.latencies),
            "errors": stack.errors[:10],
        }
    report["cycles_per_s_ratio"] = _spread(
        [c["cycles_per_s"] / b["cycles_per_s"] for b, c in pairs]
    )
    report["cpu_per_cycle_ratio"] = _spread(
        [c["cpu_ms_per_cycle"] / b["cpu_ms_per_cycle"] for b, c in pairs]
    )
    report["pairs"] = len(pairs)
    # The host's bursts of steal (another tenant taking a core) hit one slice of a pair and not
    # the other, and swing that pair's ratio by tens of percent: the pairs where neither slice
    # lost more than ``quiet_steal`` cores are summarised apart, as the less noisy estimate.
    quiet = [
        (b, c)
        for b, c in pairs
        if max(b["steal_cores"] or 0.0, c["steal_cores"] or 0.0) <= quiet_steal
    ]
    report["quiet_pairs"] = {
        "max_steal_cores": quiet_steal,
        "pairs": len(quiet),
        "cycles_per_s_ratio": _spread([c["cycles_per_s"] / b["cycles_per_s"] for b, c in quiet]),
        "cpu_per_cycle_ratio": _spread(
            [c["cpu_ms_per_cycle"] / b["cpu_ms_per_cycle"] for b, c in quiet]
        ),
    }
    # In slice order: a trend (e.g. one stack slowing as its tables grow) shows here, not in
    # the medians.
    report["pair_ratios"] = [
        {
            "cycles_per_s": round(c["cycles_per_s"] / b["cycles_per_s"], 3),
            "cpu_per_cycle": round(c["cpu_ms_per_cycle"] / b["cpu_ms_per_cycle"], 3),
            "steal_cores": [b["steal_cores"], c["steal_cores"]],
        }
        for b, c in pairs
    ]
    report["other_busy_cores"] = _spread([s["other_busy_cores"] for s in base + cur])
    report["steal_cores"] = _spread([s["steal_cores"] for s in base + cur])
    return report


#: What ``--request-cpu`` compares, per stack and as current / baseline.
_WEB_MEASURES = (
    "ms_per_claim_without_build",
    "ms_per_submit",
    "ms_per_build",
    "build_ms_per_cycle",
    "in_requests_ms_per_cycle",
)


def compare_request_cpu(stacks: dict[str, Stack]) -> dict[str, Any]:
    """Each stack's web CPU by request kind over its measured slices, and current / baseline."""
    web = {
        label: bench.request_cpu(stack.workdir, stack.windows) for label, stack in stacks.items()
    }
    ratios = {}
    for measure in _WEB_MEASURES:
        base, cur = web["baseline"][measure], web["current"][measure]
        ratios[measure] = round(cur / base, 3) if base and cur is not None else None
    return {"web_request_cpu": web, "web_request_cpu_ratio": ratios}


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    stacks = {
        "baseline": Stack("baseline", args.baseline),
        "current": Stack("current", REPO),
    }
    with bench.scratch_dir("maskmill-compare-", "comparison") as workdir:
        try:
            for stack in stacks.values():
                start_stack(stack, options, workdir)
            for stack in stacks.values():  # builds, prepared statements, caches: not measured
                run_slice(stack, args.slice, args.settle, measured=False)
            for i in range(args.pairs):
                order = LABELS if i % 2 == 0 else LABELS[::-1]
                for label in order:
                    run_slice(stacks[label], args.slice, args.settle)
            current = stacks["current"]
            checks = bench.check_database(
                current.url, current.seeded.campaign_id, current.seeded.tree_id
            )
            report = compare(stacks, args.quiet_steal)
            report["current_checks"] = {
                "answers_counted_twice": checks["answers_over_quota"]
                + checks["miscounted_clusters"],
                "hits_over_assigned": checks["hits_over_assigned"],
                "decisions_mismatch": checks["decisions_mismatch"],
                "ledger": checks["ledger"],
            }
            report["config"] = {
                "pairs": args.pairs,
                "slice_s": args.slice,
                "settle_s": args.settle,
                "quiet_steal_cores": args.quiet_steal,
                "virtual_workers": options.virtual_workers,
                "gunicorn": f"{options.gunicorn_workers} x {options.gunicorn_threads} ({options.gunicorn_class})",
            }
        finally:
            for stack in stacks.values():
                stop_stack(stack)
        if options.request_cpu:  # the web workers wrote their sums as they exited
            report.update(compare_request_cpu(stacks))
    if args.json:
        print(json.dumps(report, indent=2))
    elif report["pairs"] == 0:
        print("no slice pair completed a cycle on both stacks; see the errors with --json")
    else:
        ratio, cpu = report["cycles_per_s_ratio"], report["cpu_per_cycle_ratio"]
        print(
            f"current / baseline over {report['pairs']} slice pairs: cycles/s x{ratio['median']} "
            f"({ratio['min']}-{ratio['max']}), CPU per cycle x{cpu['median']} "
            f"({cpu['min']}-{cpu['max']}); baseline {report['baseline']['cycles_per_s']['median']}"
            f" cycles/s, current {report['current']['cycles_per_s']['median']} cycles/s"
        )
        quiet = report["quiet_pairs"]
        if quiet["pairs"]:
            print(
                f"{quiet['pairs']} pairs with at most {quiet['max_steal_cores']} cores of steal:"
                f" cycles/s x{quiet['cycles_per_s_ratio']['median']}, CPU per cycle"
                f" x{quiet['cpu_per_cycle_ratio']['median']}"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
