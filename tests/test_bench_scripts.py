"""The service benchmarks still run end to end (tiny sizes: this checks the scripts and what they
verify, not the speed -- the figures come from full runs, quoted in the README)."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run(script: str, *args: str, timeout: float = 240) -> dict:
    done = _script(script, "--json", *args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _script_module(name: str):
    """A script under ``scripts/`` imported as a module (they import each other by name, so the
    folder is on the path only while it loads)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


def _refusal(script: str, *args: str, timeout: float = 120) -> str:
    """The standard error of a run that must fail."""
    done = _script(script, *args, timeout=timeout)
    assert done.returncode != 0
    return done.stderr


@pytest.mark.parametrize(
    ("worker_class", "proxy"), [("sync", False), ("gthread", False), ("sync", True)]
)
def test_bench_service_runs_and_checks_the_database(worker_class, proxy):
    """Both server shapes: sync workers close the connection after every response (the load's
    client reconnects), gthread workers keep it alive; and the deployed shape, sync workers
    behind nginx, whose CPU is then counted too. Each reports its requests' CPU by kind."""
    report = _run(
        "bench_service.py",
        *(["--proxy"] if proxy else []),
        "--gunicorn-class", worker_class,
        "--duration", "3",
        "--warmup", "1",
        "--virtual-workers", "3",
        "--clusters", "3000",
        "--pgbench-seconds", "1",
        "--pgbench-clients", "2",
        "--statements", "3",
        "--request-cpu",
    )  # fmt: skip
    assert report["cycles_measured"] > 0 and report["hit_cycles_per_s"] > 0
    assert report["errors"] == []
    assert report["duplicates"]["questions_served_twice"] == 0
    assert report["duplicates"]["answers_counted_twice"] == 0
    assert report["ledger"]["within_budget"] and report["ledger"]["consistent"]
    assert report["database"]["decisions_mismatch"] == 0
    assert report["pgbench"]["insert_tps"] > 0
    assert (report["cpu_ms_per_cycle"].get("nginx", 0) > 0) is proxy
    assert len(report["postgres_statements"]) == 3
    assert set(report["cpu_ms_per_cycle"]) >= {"postgres", "gunicorn", "redis", "load", "total"}
    assert report["config"]["gunicorn"].endswith(f"({worker_class})")
    # The web workers' own account of their CPU (gunicorn hooks, written as they exit).
    web = report["web_request_cpu"]
    assert web["claims"] > 0 and web["ms_per_submit"] > 0
    assert 0 < web["ms_per_claim_without_build"] < web["in_requests_ms_per_cycle"]


def test_bench_answer_storage_runs():
    report = _run("bench_answer_storage.py", "--hits", "30", "--warmup", "5")
    assert report["submissions_timed"] == 25
    assert report["median_ms"]["rows_and_close_questions"] > 0
    assert report["median_ms"]["one_array_row"] > 0


def test_bench_question_indexes_runs():
    report = _run(
        "bench_question_indexes.py", "--prefill", "1760", "--batches", "3", "--hits", "2"
    )  # fmt: skip
    assert report["questions_per_batch"] == 110
    # Rows: the id schemes, rows against arrays, then the four steps.
    assert report["stored_at_end"] == 1760 + 110 * 3 * (2 + 1 + 4)
    # The arrays went into the HITs the service's statement inserts: 2 per batch, 3 batches.
    assert report["hits_stored"] == 2 * 3
    assert set(report["rows_or_arrays_ms_per_batch"]) == {"rows", "arrays_of_hits"}
    assert [step["indexes"] for step in report["steps"]] == [
        "all indexes",
        "without unique public_id",
        "and without cluster_id",
        "and without (hit_id, position)",
    ]
    assert set(report["public_ids_ms_per_batch"]) == {"random", "service"}


def test_bench_compare_serves_each_checkout_its_own_code(tmp_path):
    """Two stacks, each gunicorn importing its own checkout: a baseline whose claims fail shows
    its errors, while this checkout's stack runs clean and passes the database checks."""
    baseline = tmp_path / "baseline"
    for part in ("service", "templates"):
        shutil.copytree(REPO / part, baseline / part, ignore=shutil.ignore_patterns("__pycache__"))
    work = baseline / "service" / "api" / "work.py"
    route = "def claim_assignment():\n"
    assert route in work.read_text()
    work.write_text(
        work.read_text().replace(route, route + '    raise RuntimeError("baseline fault")\n', 1)
    )
    report = _run(
        "bench_compare.py", str(baseline),
        "--pairs", "1", "--slice", "2", "--settle", "0.5", "--virtual-workers", "2",
        "--request-cpu",
    )  # fmt: skip
    assert any("claim 500" in error for error in report["baseline"]["errors"])
    # Each stack's web CPU by request kind: the baseline only ever failed its claims.
    web = report["web_request_cpu"]
    assert web["current"]["claims"] > 0 and web["current"]["ms_per_submit"] > 0
    assert web["baseline"]["claims"] > 0 and web["baseline"]["ms_per_submit"] is None
    assert report["web_request_cpu_ratio"]["ms_per_submit"] is None
    assert report["baseline"]["cycles_per_s"]["max"] == 0
    assert report["current"]["errors"] == []
    assert report["current"]["cycles_per_s"]["min"] > 0
    assert report["pairs"] == 0 and report["cycles_per_s_ratio"] is None
    assert report["pair_ratios"] == []
    checks = report["current_checks"]
    assert checks["answers_counted_twice"] == checks["hits_over_assigned"] == 0
    assert checks["decisions_mismatch"] == 0 and checks["ledger"]["within_budget"]


@pytest.mark.parametrize(
    ("baseline", "message"),
    [(".", "that is this checkout"), ("tests", "not a maskmill checkout")],
)
def test_bench_compare_refuses_a_wrong_baseline(baseline, message):
    assert message in _refusal("bench_compare.py", str(REPO / baseline), timeout=60)


def test_bench_request_overhead_runs():
    report = _run("bench_request_overhead.py", "--rounds", "1", "--calls", "20")
    assert set(report["flask"]) == {"cookie_sessions", "no_cookie_sessions"}
    assert set(report["claim"]) == {"autocommit", "held_autocommit", "pipelined_commit"}
    assert set(report["read"]) == {"read_pipelined", "read_plain"}
    assert set(report["set_local"]) == {"with_set_local", "without_set_local"}
    assert set(report["submit"]) == {"session", "pool_connection", "held_driver"}
    for part in ("claim", "read", "set_local", "submit"):
        for figures in report[part].values():
            assert figures["python_us"] > 0 and figures["postgres_us"] >= 0


def test_bench_cycle_cpu_runs_its_variants_alternately():
    report = _run(
        "bench_cycle_cpu.py",
        *("--cycles", "4", "--rounds", "2", "--warmup", "1", "--repeat", "2"),
        *("--variant", "ff50=ALTER TABLE clusters SET (fillfactor = 50)"),
        *("--variant", "migrated="),
    )
    assert report["config"]["sql"] == {
        "ff50": ["ALTER TABLE clusters SET (fillfactor = 50)"],
        "migrated": [],
    }
    for variant in report["variants"].values():
        assert len(variant["rounds"]) == 4  # 2 rounds x 2 runs
        assert variant["python_ms_per_cycle"] > 0
        # PostgreSQL's CPU comes from /proc in clock ticks (10 ms): a round of a few cycles may
        # read 0, so only the whole run's is sure to show.
        assert variant["postgres_ms_per_cycle"] >= 0 and variant["postgres_per_python"] >= 0
        assert len(variant["hot_update_share"]) == 2
        # Each cycle counted answers into clusters and completed a HIT (its questions' statuses
        # are arrays of its row, migration 0006): both tables were updated in every run.
        for run in variant["hot_update_share"]:
            assert set(run) == {"hits", "assignments", "clusters", "workers", "campaigns"}
            assert 0 < run["clusters"] <= 1 and run["hits"] is not None
    assert sum(pg for v in report["variants"].values() for _, pg in v["rounds"]) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "no equals sign"], "--variant must be NAME=SQL"),
        (["--variant", "a=", "--variant", "a=SELECT 1"], "variant names must differ"),
        (["--variant", "bad=ALTER TABLE nowhere SET (fillfactor = 50)"], "variant SQL"),
    ],
)
def test_bench_cycle_cpu_refuses_bad_variants(args, message):
    stderr = _refusal("bench_cycle_cpu.py", "--cycles", "1", *args)
    assert message in stderr and "Traceback" not in stderr


def test_bench_compare_reports_each_pairs_ratios_in_slice_order():
    bench_compare = _script_module("bench_compare")

    def stack(label, rates, cpus, steal):
        made = bench_compare.Stack(label, REPO)
        made.slices = [
            {"cycles_per_s": r, "cpu_ms_per_cycle": c, "other_busy_cores": 0.0, "steal_cores": s}
            for r, c, s in zip(rates, cpus, steal, strict=True)
        ]
        return made

    report = bench_compare.compare(
        {
            "baseline": stack(
                "baseline", [100, 100, 200, 100], [10.0, 10.0, 5.0, 8.0], [0.0, 0.5, 0.1, 0.0]
            ),
            # The second slice completed no cycle: its pair is left out.
            "current": stack(
                "current", [110, 0, 150, 125], [9.0, None, 6.0, 6.0], [0.2, 0.9, 0.3, 0.04]
            ),
        },
        quiet_steal=0.2,
    )
    assert report["pairs"] == 3
    # Steal is the machine's, whatever the slice did: every slice counts.
    assert report["steal_cores"] == {"median": 0.15, "min": 0.0, "max": 0.9}
    assert report["pair_ratios"] == [
        {"cycles_per_s": 1.1, "cpu_per_cycle": 0.9, "steal_cores": [0.0, 0.2]},
        {"cycles_per_s": 0.75, "cpu_per_cycle": 1.2, "steal_cores": [0.1, 0.3]},
        {"cycles_per_s": 1.25, "cpu_per_cycle": 0.75, "steal_cores": [0.0, 0.04]},
    ]
    # The pair with a slice over 0.2 cores of steal is left out of the quiet summary.
    assert report["quiet_pairs"] == {
        "max_steal_cores": 0.2,
        "pairs": 2,
        "cycles_per_s_ratio": {"median": 1.175, "min": 1.1, "max": 1.25},
        "cpu_per_cycle_ratio": {"median": 0.825, "min": 0.75, "max": 0.9},
    }


def test_bench_service_reads_busy_and_steal_time_apart():
    bench_service = _script_module("bench_service")
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    line = "cpu  5622744 1206633 1126595 4982268 70597 0 185238 542969 0 0\n"
    time = bench_service.parse_proc_stat(line, 100)
    assert time.busy == pytest.approx((5622744 + 1206633 + 1126595 + 185238) / 100)
    assert time.steal == pytest.approx(5429.69)
    later = bench_service.parse_proc_stat("cpu 10 0 5 100 0 0 1 40 0 0", 10)
    delta = later - bench_service.MachineTime(1.0, 1.0)
    assert (delta.busy, delta.steal) == (pytest.approx(0.6), pytest.approx(3.0))
    for bad in ("cpu0 1 2 3 4 5 6 7 8", "cpu 1 2 3", ""):
        with pytest.raises(ValueError, match="aggregate cpu line"):
            bench_service.parse_proc_stat(bad, 100)


def test_bench_floor_serves_both_storages_and_counts_every_answer_back():
    """The stack's floor: raw WSGI on gunicorn, the service's load process; a run whose stored
    answers do not match the acknowledged ones would report a problem (and exit non-zero)."""
    report = _run("bench_floor.py", "--duration", "2", "--warmup", "1", "--virtual-workers", "3")
    assert set(report["medians"]) == {"rows", "arrays"}
    assert [run["storage"] for run in report["runs"]] == ["rows", "arrays"]
    for run in report["runs"]:
        assert run["problems"] == []
        assert run["cycles"] > 0
        # Warm-up cycles are stored too: at least the measured ones, 55 answers each.
        assert run["answers_stored"] >= 55 * run["cycles"]
        assert set(run["cpu_ms_per_cycle"]) == {"postgres", "gunicorn", "load", "total"}
    for medians in report["medians"].values():
        assert medians["hit_cycles_per_s"] > 0 and medians["cpu_ms_per_cycle"]["total"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration must be positive"),
        (["--virtual-workers", "0"], "--virtual-workers must be at least 1"),
        (["--storage", "columns"], "invalid choice: 'columns'"),
    ],
)
def test_bench_floor_refuses_bad_arguments(args, message):
    stderr = _refusal("bench_floor.py", *args)
    assert message in stderr and "Traceback" not in stderr


def test_bench_floor_app_answers_a_malformed_submission_with_400():
    """The floor app parses before it touches the database: a bad body costs no connection."""
    bench_floor = _script_module("bench_floor")
    statuses = []
    for body in (b"not json", b'{"answers": [{"value": true}]}', b"[]"):
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/v1/work/assignments/7/answers",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        out = bench_floor.app(environ, lambda status, headers: statuses.append(status))
        assert json.loads(b"".join(out))["error"]["code"] == "bad_request"
    assert statuses == ["400 BAD REQUEST"] * 3


def test_bench_floor_against_the_service_pairs_each_repeat():
    report = _run(
        "bench_floor.py",
        *("--duration", "2", "--warmup", "1", "--virtual-workers", "3"),
        *("--storage", "rows", "--repeat", "2", "--service"),
    )
    assert report["service"]["runs"] == 2 and report["service"]["hit_cycles_per_s"] > 0
    over = report["service_over_floor"]
    assert over["floor_storage"] == "rows" and len(over["pairs"]) == 2
    assert over["cpu_ms_per_cycle"]["total"] > 0
    budget = report["budget"]
    assert budget["target_cycles_per_s"] == 300
    assert budget["left_for_maskmill_ms"] == pytest.approx(
        budget["ms_per_cycle"] - budget["floor_ms_per_cycle"], abs=0.02
    )


def test_bench_floor_service_figures_are_per_pair_medians():
    """Ratios and differences are taken pair by pair (the machine drifts between pairs), then
    their medians: not the ratio of the medians."""
    bench_floor = _script_module("bench_floor")

    def cpu(total):
        return {"postgres": total / 2, "gunicorn": total / 4, "load": total / 4, "total": total}

    floors = [
        {"storage": "rows", "cycles_per_s": rate, "cpu_ms_per_cycle": cpu(total)}
        for rate, total in ((500.0, 4.0), (250.0, 8.0), (400.0, 5.0))
    ]
    services = [
        {
            "hit_cycles_per_s": rate,
            "latency_ms": {"request": {"p99": p99}},
            "cpu_ms_per_cycle": cpu(total),
        }
        for rate, total, p99 in ((200.0, 10.0, 50.0), (50.0, 40.0, 300.0), (100.0, 20.0, 80.0))
    ]
    args = bench_floor.parse_args(["--storage", "rows"])
    report = bench_floor.against_service(floors, services, args)
    over = report["service_over_floor"]
    assert over["pairs"] == [0.4, 0.2, 0.25]
    assert over["hit_cycles_per_s"] == 0.25
    assert over["cpu_ms_per_cycle"]["total"] == 4.0  # 2.5, 5.0, 4.0
    assert report["maskmill_ms_per_cycle"]["total"] == 15.0  # 6, 32, 15
    assert report["service"]["hit_cycles_per_s"] == 100.0
    assert report["service"]["p99_request_ms"] == 80.0
    cores = os.cpu_count() or 1
    assert report["budget"]["ms_per_cycle"] == round(cores * 1000 / 300, 2)
    assert report["budget"]["floor_ms_per_cycle"] == 5.0
