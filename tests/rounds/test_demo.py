"""The demo in its reduced CI form: ``python -m workers.demo --quick --no-serve`` end to end.

It runs as a subprocess, as ``scripts/demo`` runs it (its own process, server thread and job
thread), and is checked through what it leaves behind: the exit code, ``summary.json``, the COCO
export (loaded by pycocotools) and the PNG plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MASKMILL_")}
    completed = subprocess.run(
        [sys.executable, "-m", "workers.demo", "--quick", "--no-serve", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    return {"out": out, "run": completed}


def test_demo_exits_cleanly(demo):
    run = demo["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "summary" in run.stdout and "speed-up vs manual polygons" in run.stdout


def test_summary_is_consistent(demo):
    summary = json.loads((demo["out"] / "summary.json").read_text())
    assert summary["mode"] == "quick"
    assert [r["number"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert entry["ap"] is not None and 0.0 <= entry["ap"] <= 1.0
        assert entry["masks_detected"] > 0
        campaign = entry["campaign"]
        assert campaign["spent_usd"] <= campaign["budget_usd"]
        assert campaign["status"] in ("finished", "exhausted", "running")
    assert summary["rounds"][0]["train_init"] == "scratch"
    assert summary["rounds"][1]["train_init"] == "round 1"  # the retrained model
    assert summary["questions"]["sample_answered"] > 0
    assert summary["questions"]["all_answers"] >= summary["questions"]["sample_answered"]
    assert summary["cost_usd"] == pytest.approx(
        sum(r["campaign"]["spent_usd"] for r in summary["rounds"]), abs=0.011
    )
    assert summary["workers"] == {
        "honest": 3,
        "spammers": 2,
        "spammers_blocked": summary["workers"]["spammers_blocked"],
        "honest_blocked": 0,
    }
    speed = summary["speedup_vs_manual"]
    assert speed["manual_seconds_per_mask"] == 80
    assert speed["manual_hours"] == pytest.approx(summary["accepted_masks"] * 80 / 3600, abs=1e-3)


def test_export_loads_and_matches_the_summary(demo):
    summary = json.loads((demo["out"] / "summary.json").read_text())
    export = Path(summary["files"]["export"])
    coco = COCO(str(export))
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) == summary["accepted_masks"] == summary["quality"]["accepted_masks"]
    for annotation in annotations:
        mask = coco.annToMask(annotation)
        image = coco.imgs[annotation["image_id"]]
        assert mask.shape == (image["height"], image["width"]) and mask.any()
    if annotations:
        assert 0.0 <= summary["quality"]["mean_iou"] <= 1.0


def test_plot_is_a_png(demo):
    summary = json.loads((demo["out"] / "summary.json").read_text())
    with Image.open(summary["files"]["plot"]) as picture:
        assert picture.format == "PNG" and picture.size[0] > 400
