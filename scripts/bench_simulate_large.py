"""A 10M-mask, 100-class simulated campaign end to end on this machine: wall time and peak RSS.

    nice .venv/bin/python scripts/bench_simulate_large.py            # 10M masks, 100 classes
    .venv/bin/python scripts/bench_simulate_large.py --masks 200000 --classes 10   # a dry run

Class sizes follow the long tail (``zipf``), so the largest class holds ~1.9M masks and goes
through the scalable tree builder; memory stays per class (see ``workers.simulate``). Prints one
JSON object: wall time, peak RSS, the per-method summary, the checks, and timing per stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from workers.sim_model import builtin_model
from workers.simulate import (
    BASELINES,
    ENGINE_VARIANTS,
    SimConfig,
    parse_choices,
    plot_report,
    run_simulation,
)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", type=int, default=10_000_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--sizes", choices=("uniform", "zipf"), default="zipf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-limit", type=int, default=20_000)
    p.add_argument("--variants", type=parse_choices(ENGINE_VARIANTS), default=ENGINE_VARIANTS)
    p.add_argument("--baselines", type=parse_choices(BASELINES), default=BASELINES)
    p.add_argument("--out", help="also write the full simulation report (JSON) here")
    p.add_argument("--plot", help="write the Fig. 8-style PNG here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        config = SimConfig(
            masks=args.masks,
            sizes=args.sizes,
            seed=args.seed,
            exact_limit=args.exact_limit,
            variants=args.variants,
            baselines=args.baselines,
        )
        model = builtin_model(args.classes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def show(done: int, total: int, name: str) -> None:
        print(
            f"[{done}/{total}] {name} {time.perf_counter() - t0:.0f} s, "
            f"peak RSS {_peak_rss_mb():.0f} MB",
            file=sys.stderr,
            flush=True,
        )

    report = run_simulation(model, config, progress=show)
    wall = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report.to_dict(), fh, indent=1)
    if args.plot:
        plot_report(report, args.plot)
    sizes = report.model["class_sizes"]
    result: dict[str, Any] = {
        "masks": args.masks,
        "classes": args.classes,
        "sizes": args.sizes,
        "largest_class": max(sizes),
        "smallest_class": min(sizes),
        "wall_seconds": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "methods": {
            name: {
                k: m[k]
                for k in (
                    "questions",
                    "masks_accepted",
                    "mean_iou",
                    "share_iou_ge_k",
                    "hours",
                    "usd",
                    "speedup_vs_manual",
                    "seconds_wall",
                )
            }
            for name, m in report.methods.items()
        },
        "checks": report.checks,
        "timing": report.timing,
        "crowd": report.crowd,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
