"""Benchmark the cluster-tree builders against scipy on synthetic masks.

    python scripts/bench_tree.py --n 20000 --dim 257 --json
    python scripts/bench_tree.py --n 1000000 --dim 257 --scalable --json

Prints one JSON object. Every measured builder runs in its own child process (spawned, so the
peak RSS of one never includes another's), which generates the same seeded data, then times the
build; ``peak_rss_mib`` is the child's ``ru_maxrss`` (data included), ``data_rss_mib`` its RSS
just before building. scipy gets the same distance as the exact builder: ``pdist`` of the
features and of the scores, each divided by its numpy std and summed -- the z-scored distance
shifted exactly as ``service.engine.tree`` documents, so merge heights are directly
comparable -- then ``scipy.cluster.hierarchy.linkage(method="complete")``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any

import numpy as np

#: Above this many masks scipy (three float64 condensed vectors) or the exact builder (one,
#: in place) would not fit the ~8 GB a benchmark may use on the shared machine.
SCIPY_MAX_N = 25_000
EXACT_MAX_N = 44_000


def synthetic(n: int, dim: int, seed: int, components: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A seeded Gaussian mixture in ``dim`` dims (float32) and scores in [0, 1].

    Components have random spreads and sizes, and each has its own mean score, as masks of
    one kind of object tend to be uniformly good or bad. Generated in chunks (bounded
    temporaries even for 10^6 x 257).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(components, dim)).astype(np.float32) * 3.0
    spread = rng.uniform(0.5, 1.5, components).astype(np.float32)
    weights = rng.dirichlet(np.full(components, 2.0))
    quality = rng.beta(2.0, 2.0, components)
    label = rng.choice(components, size=n, p=weights)
    features = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        part = label[start : start + 65_536]
        noise = rng.standard_normal((part.shape[0], dim), dtype=np.float32)
        noise *= spread[part, None]
        noise += centers[part]
        features[start : start + 65_536] = noise
    scores = np.clip(rng.normal(quality[label], 0.08), 0.0, 1.0)
    return features, scores


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _scipy_linkage(features: np.ndarray, scores: np.ndarray, weight: float) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    d = pdist(features, "euclidean")
    std = d.std()
    if std > 0:
        d /= std
    else:
        d.fill(0.0)
    ds = pdist(scores[:, None], "cityblock")
    std = ds.std()
    if std > 0:
        ds *= weight / std
        d += ds
    del ds
    return linkage(d, method="complete")


def _child(builder: str, args: dict[str, Any], conn: Any) -> None:
    """Generate the data, run one builder, send back timing, memory and merge heights."""
    try:
        from service.engine.tree import build_tree

        features, scores = synthetic(args["n"], args["dim"], args["seed"])
        data_rss = _rss_mib()
        start = time.perf_counter()
        result: dict[str, Any] = {}
        if builder == "scipy":
            z = _scipy_linkage(features, scores, args["score_weight"])
            heights = np.sort(z[:, 2])
        else:
            limit = max(args["n"], 2) if builder == "exact" else args["exact_limit"]
            tree = build_tree(
                features,
                scores,
                score_weight=args["score_weight"],
                exact_limit=limit,
                seed=args["seed"],
                threads=args["threads"],
            )
            heights = np.sort(tree.linkage[:, 2])
            result["params"] = {
                k: v for k, v in tree.params.items() if k not in ("scales", "score_weight")
            }
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["data_rss_mib"] = round(data_rss, 1)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        conn.send((result, heights if builder != "scalable" else None))
    except Exception as exc:  # report, do not hang the parent
        conn.send(({"error": f"{type(exc).__name__}: {exc}"}, None))
    finally:
        conn.close()


def measure(builder: str, args: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(builder, args, child))
    proc.start()
    child.close()
    try:
        result, heights = parent.recv()
    except EOFError:
        result, heights = {"error": "child process died (out of memory?)"}, None
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"child exited with code {proc.exitcode}"
    return result, heights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of masks")
    parser.add_argument("--dim", type=int, required=True, help="feature dimension")
    parser.add_argument("--scalable", action="store_true", help="also run the scalable builder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-weight", type=float, default=1.0)
    parser.add_argument("--exact-limit", type=int, default=None, help="scalable: exact limit")
    parser.add_argument("--threads", type=int, default=None, help="builder threads")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    ns = parser.parse_args(argv)
    if ns.n < 2 or ns.dim < 0:
        parser.error("--n must be >= 2 and --dim >= 0")

    from service.engine.tree import DEFAULT_EXACT_LIMIT, default_threads

    args = {
        "n": ns.n,
        "dim": ns.dim,
        "seed": ns.seed,
        "score_weight": ns.score_weight,
        "exact_limit": ns.exact_limit or DEFAULT_EXACT_LIMIT,
        "threads": ns.threads,
    }
    report: dict[str, Any] = {
        "n": ns.n,
        "dim": ns.dim,
        "seed": ns.seed,
        "score_weight": ns.score_weight,
        "threads": ns.threads or default_threads(),
        "cpus": os.cpu_count(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    heights: dict[str, np.ndarray] = {}
    for builder, limit in (("exact", EXACT_MAX_N), ("scipy", SCIPY_MAX_N)):
        if ns.n > limit:
            report[builder] = {"skipped": f"n > {limit}: O(n^2) memory beyond this machine's share"}
            continue
        report[builder], h = measure(builder, args)
        if h is not None:
            heights[builder] = h
    if "exact" in heights and "scipy" in heights:
        diff = np.abs(heights["exact"] - heights["scipy"])
        report["exact_vs_scipy_speedup"] = round(
            report["scipy"]["seconds"] / report["exact"]["seconds"], 2
        )
        report["heights_equal_scipy"] = bool(
            np.allclose(heights["exact"], heights["scipy"], rtol=1e-7, atol=1e-9)
        )
        report["max_abs_height_diff"] = float(diff.max()) if diff.size else 0.0
    if ns.scalable:
        if ns.n <= args["exact_limit"]:
            report["scalable"] = {"skipped": f"n <= exact limit {args['exact_limit']}"}
        else:
            report["scalable"], _ = measure("scalable", args)
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
