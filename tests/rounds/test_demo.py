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

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from workers.demo import USELESS_MODEL_SHARE

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
    quality = summary["quality"]
    assert quality["correct_masks"] + quality["wrong_masks"] == quality["accepted_masks"]
    speed = summary["speedup_vs_manual"]
    assert speed["manual_seconds_per_mask"] == 80
    assert speed["masks_counted"] == quality["correct_masks"]  # wrong masks save no drawing
    assert speed["manual_hours"] == pytest.approx(quality["correct_masks"] * 80 / 3600, abs=1e-3)


def test_summary_says_when_the_model_had_nothing_right_to_accept(demo):
    """Each round reports how many detected masks were correct; a round whose model produced
    (almost) none, and any wrong accepted mask, is stated in the printed notes."""
    summary = json.loads((demo["out"] / "summary.json").read_text())
    notes = summary["caveats"]
    for entry in summary["rounds"]:
        detected = entry["detected"]
        assert detected["masks"] == entry["masks_detected"]
        assert 0 <= detected["correct"] <= detected["masks"]
        barely = detected["correct_share"] < USELESS_MODEL_SHARE
        stated = any(n.startswith(f"round {entry['number']}: the model is barely") for n in notes)
        assert barely == stated, (entry, notes)
    wrong = summary["quality"]["wrong_masks"]
    assert any(f"{wrong} of " in n and "accepted masks are wrong" in n for n in notes) == (
        wrong > 0
    )
    for note in notes:
        assert f"note: {note}" in demo["run"].stdout


def test_summary_quality_matches_an_independent_check(demo):
    """Match every exported mask to the synthetic truth by file name and class name (not through
    the demo's own code) and compare with the summary's quality numbers."""
    summary = json.loads((demo["out"] / "summary.json").read_text())
    export = json.loads(Path(summary["files"]["export"]).read_text())
    truth_file = json.loads((demo["out"] / "images" / "synthetic" / "pool_gt.json").read_text())
    names = {c["id"]: c["name"] for c in truth_file["categories"]}
    files = {i["id"]: i["file_name"] for i in truth_file["images"]}
    truth: dict[tuple[str, str], list] = {}
    for ann in truth_file["annotations"]:
        truth.setdefault((files[ann["image_id"]], names[ann["category_id"]]), []).append(
            ann["segmentation"]
        )
    exported_files = {i["id"]: i["file_name"] for i in export["images"]}
    exported_names = {c["id"]: c["name"] for c in export["categories"]}
    ious = []
    for ann in export["annotations"]:
        key = (exported_files[ann["image_id"]], exported_names[ann["category_id"]])
        candidates = truth.get(key, [])
        ious.append(
            float(np.max(mask_utils.iou([ann["segmentation"]], candidates, [0] * len(candidates))))
            if candidates
            else 0.0
        )
    quality = summary["quality"]
    k = quality["k_iou"]
    assert quality["correct_masks"] == sum(iou >= k for iou in ious)
    if ious:
        assert quality["mean_iou"] == pytest.approx(float(np.mean(ious)), abs=1e-3)


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
