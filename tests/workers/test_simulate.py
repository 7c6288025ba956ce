"""Tests of the large-scale simulator (workers.simulate and its sim_* helpers).

Small sizes throughout: the point is the arithmetic and the contracts, not the numbers of the
benchmark (scripts/bench_efficiency.py measures those).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from workers.sim_baselines import (
    BaselineParams,
    _threshold_for_precision,
    run_lsun,
    run_manual,
    run_verify_all,
)
from workers.sim_coco import load_fit_data
from workers.sim_model import (
    ClassMixture,
    MaskSample,
    SimulationModel,
    builtin_model,
    class_rng,
    class_sizes,
    fit_mixture,
    fit_model,
)
from workers.sim_trace import Trace, curve, merge
from workers.sim_workers import (
    Answers,
    CountingOracle,
    WorkerModel,
    draw_answers,
    simulate_crowd,
)
from workers.simulate import METHODS, SimConfig, main, run_simulation

# ------------------------------------------------------------------------------ mixtures, sizes


def _stats(sample: MaskSample) -> dict[str, float]:
    return {
        "s_mean": float(sample.scores.mean()),
        "s_std": float(sample.scores.std()),
        "iou_mean": float(sample.iou.mean()),
        "iou_std": float(sample.iou.std()),
        "correct": float(np.mean(sample.iou >= 0.75)),
        "corr": float(np.corrcoef(sample.scores, sample.iou)[0, 1]),
        "f0_mean": float(sample.features[:, 0].mean()),
        "f0_std": float(sample.features[:, 0].std()),
    }


def test_fit_then_sample_reproduces_the_marginals() -> None:
    source = builtin_model(1, feature_dim=6, seed=3).classes[0].mixture
    data = source.sample(10_000, np.random.default_rng(0))
    rows = np.column_stack([data.features, data.scores, data.iou])
    fitted = fit_mixture(rows, n_components=8, seed=0)
    again = fitted.sample(10_000, np.random.default_rng(1))
    a, b = _stats(data), _stats(again)
    for key in ("s_mean", "s_std", "iou_mean", "iou_std", "correct"):
        assert abs(a[key] - b[key]) < 0.03, (key, a[key], b[key])
    assert abs(a["corr"] - b["corr"]) < 0.08
    assert abs(a["f0_mean"] - b["f0_mean"]) < 0.15 * a["f0_std"]
    assert b["f0_std"] == pytest.approx(a["f0_std"], rel=0.1)


def test_samples_are_clipped_and_seeded() -> None:
    mix = builtin_model(2, feature_dim=4).classes[1].mixture
    s1 = mix.sample(5000, np.random.default_rng(7))
    s2 = mix.sample(5000, np.random.default_rng(7))
    assert np.array_equal(s1.features, s2.features) and np.array_equal(s1.iou, s2.iou)
    assert s1.features.shape == (5000, 4)
    assert s1.iou.min() >= 0.0 and s1.iou.max() <= 1.0
    assert s1.scores.min() > 0.0 and s1.scores.max() < 1.0


def test_builtin_score_predicts_iou_but_not_perfectly() -> None:
    for spec in builtin_model(4).classes:
        s = spec.mixture.sample(20_000, np.random.default_rng(0))
        corr = np.corrcoef(s.scores, s.iou)[0, 1]
        assert 0.3 < corr < 0.95
        assert 0.2 < np.mean(s.iou >= 0.75) < 0.7


def test_mixture_validation_names_the_problem() -> None:
    w, mu, cov = np.array([1.0]), np.zeros((1, 4)), np.eye(4)[None]
    with pytest.raises(ValueError, match="sum to 1"):
        ClassMixture(np.array([0.5]), mu, cov)
    with pytest.raises(ValueError, match="positive definite"):
        ClassMixture(w, mu, -cov)
    with pytest.raises(ValueError, match="shape"):
        ClassMixture(w, np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_mixture(np.full((10, 4), np.nan))


def test_model_round_trips_through_json() -> None:
    model = builtin_model(3, feature_dim=5)
    back = SimulationModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back.feature_dim == 5 and [c.name for c in back.classes] == [
        "class_000",
        "class_001",
        "class_002",
    ]
    np.testing.assert_allclose(back.classes[2].mixture.means, model.classes[2].mixture.means)
    with pytest.raises(ValueError, match="--classes"):
        model.select(4)


def test_class_sizes() -> None:
    uni = class_sizes(1003, 10, "uniform")
    assert uni.sum() == 1003 and uni.max() - uni.min() <= 1
    zipf = class_sizes(1_000_000, 100, "zipf")
    assert zipf.sum() == 1_000_000 and np.all(np.diff(zipf) <= 0)
    assert 80 < zipf[0] / zipf[-1] < 120  # 1/rank over 100 ranks: a 100:1 long tail
    emp = class_sizes(100, 2, "empirical", weights=[3, 1])
    assert emp.tolist() == [75, 25]
    with pytest.raises(ValueError, match="at least one mask per class"):
        class_sizes(5, 10, "uniform")
    with pytest.raises(ValueError, match="one of"):
        class_sizes(100, 2, "pareto")


# ------------------------------------------------------------------------------------ COCO fit


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _write_coco(tmp_path: Path, features: bool | str = False) -> tuple[Path, Path]:
    h = w = 40
    gt = {
        "images": [{"id": 1, "height": h, "width": w}, {"id": 2, "height": h, "width": w}],
        "categories": [{"id": 5, "name": "chair"}, {"id": 7, "name": "bed"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 5,
                "segmentation": _rle(_box(h, w, 0, 10, 0, 10)),
            },
            # a polygon ground truth (20 x 20 square) in image 2
            {
                "id": 2,
                "image_id": 2,
                "category_id": 5,
                "segmentation": [[20, 20, 40, 20, 40, 40, 20, 40]],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 7,
                "segmentation": _rle(_box(h, w, 20, 40, 20, 40)),
            },
            # crowd regions never count as a match
            {
                "id": 4,
                "image_id": 2,
                "category_id": 7,
                "iscrowd": 1,
                "segmentation": _rle(_box(h, w, 0, 40, 0, 40)),
            },
        ],
    }
    preds = [
        # IoU 80/100 = 0.8 with annotation 1
        {
            "image_id": 1,
            "category_id": 5,
            "score": 0.9,
            "segmentation": _rle(_box(h, w, 0, 8, 0, 10)),
        },
        # exact match of annotation 3 (same class), IoU 1
        {
            "image_id": 1,
            "category_id": 7,
            "score": 0.7,
            "segmentation": _rle(_box(h, w, 20, 40, 20, 40)),
        },
        # right place, wrong class: IoU 0 (annotation 1 is a chair)
        {
            "image_id": 1,
            "category_id": 7,
            "score": 0.3,
            "segmentation": _rle(_box(h, w, 0, 10, 0, 10)),
        },
        # only a crowd region of its class in image 2: IoU 0
        {
            "image_id": 2,
            "category_id": 7,
            "score": 0.2,
            "segmentation": _rle(_box(h, w, 0, 40, 0, 40)),
        },
        # half of the polygon square: IoU about 0.5
        {
            "image_id": 2,
            "category_id": 5,
            "score": 0.6,
            "segmentation": _rle(_box(h, w, 20, 30, 20, 40)),
        },
        # an image the ground truth does not list: ignored
        {
            "image_id": 9,
            "category_id": 5,
            "score": 0.5,
            "segmentation": _rle(_box(h, w, 0, 5, 0, 5)),
        },
    ]
    if features:
        for i, p in enumerate(preds):
            if features == "some" and i == 2:
                continue
            p["feature"] = (
                [float(i), float(i % 2), 1.0, -1.0]
                if features != "wide"
                else [float(i + k) for k in range(12)]
            )
    pred_path, gt_path = tmp_path / "preds.json", tmp_path / "gt.json"
    pred_path.write_text(json.dumps(preds))
    gt_path.write_text(json.dumps(gt))
    return pred_path, gt_path


def test_fit_data_from_coco_computes_best_iou_per_class(tmp_path: Path) -> None:
    pred_path, gt_path = _write_coco(tmp_path)
    data = load_fit_data(pred_path, gt_path)
    assert data.feature_source == "box_geometry"
    assert data.names == {5: "chair", 7: "bed"}
    chair, bed = data.per_class[5], data.per_class[7]
    assert chair.shape == (2, 6 + 2) and bed.shape == (3, 8)
    np.testing.assert_allclose(chair[:, -2], [0.9, 0.6])
    assert chair[0, -1] == pytest.approx(0.8)
    assert chair[1, -1] == pytest.approx(0.5, abs=0.06)  # polygon rasterisation is approximate
    np.testing.assert_allclose(bed[:, -1], [1.0, 0.0, 0.0])
    assert any("ignored 1" in note for note in data.notes)
    model = fit_model(data.per_class, data.names, feature_source=data.feature_source)
    assert [c.name for c in model.classes] == ["bed", "chair"]  # by decreasing support


def test_fit_data_uses_prediction_features(tmp_path: Path) -> None:
    data = load_fit_data(*_write_coco(tmp_path, features=True))
    assert data.feature_source == "predictions"
    assert data.per_class[5].shape[1] == 4 + 2
    wide = load_fit_data(*_write_coco(tmp_path, features="wide"), feature_dim=3)
    assert wide.feature_source == "predictions+projection"
    assert wide.per_class[7].shape[1] == 3 + 2
    with pytest.raises(ValueError, match=r"preds\.json.*some predictions but not all"):
        load_fit_data(*_write_coco(tmp_path, features="some"))


def test_fit_data_rejects_bad_files_naming_them(tmp_path: Path) -> None:
    pred_path, gt_path = _write_coco(tmp_path)
    with pytest.raises(ValueError, match=r"missing\.json: file not found"):
        load_fit_data(tmp_path / "missing.json", gt_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_fit_data(pred_path, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(ValueError, match=r"list\.json: malformed prediction"):
        load_fit_data(tmp_path / "list.json", gt_path)


# ---------------------------------------------------------------------------------- the crowd


def test_worker_model_without_blocking_keeps_spammers() -> None:
    model = WorkerModel(n_workers=2000, spammer_share=0.1, gold_blocking=False, stream_hits=40_000)
    crowd = simulate_crowd(model, np.random.default_rng(0))
    stats = crowd.stats()
    assert stats["spammer_share_of_kept_answers"] == pytest.approx(0.1, abs=0.02)
    assert stats["mean_honest_accuracy"] == pytest.approx(0.93, abs=0.01)
    truth = np.random.default_rng(1).random(200_000) < 0.4
    ans = draw_answers(crowd, truth, np.random.default_rng(2))
    assert np.all(ans.attempts == 1)
    # 90% honest at ~0.93, 10% coin flips at 0.5
    assert np.mean(ans.answers == truth) == pytest.approx(0.9 * 0.93 + 0.1 * 0.5, abs=0.01)
    assert np.mean(ans.from_spammer) == pytest.approx(0.1, abs=0.02)


def test_gold_blocking_catches_spammers_at_a_cost() -> None:
    model = WorkerModel(spammer_share=0.1, spammer_mode="always_yes", stream_hits=20_000)
    crowd = simulate_crowd(model, np.random.default_rng(0))
    stats = crowd.stats()
    assert stats["blocked_spammers"] > stats["blocked_honest"] / 5
    assert stats["spammer_share_of_kept_answers"] < 0.02
    truth = np.zeros(100_000, dtype=bool)
    ans = draw_answers(crowd, truth, np.random.default_rng(1))
    assert ans.attempts.min() >= 1 and ans.attempts.mean() > 1.0  # discarded answers re-asked
    # an always-yes spammer answers yes to a wrong mask
    assert np.all(ans.answers[ans.from_spammer])
    assert np.mean(ans.answers) < 0.1


def test_worker_model_validation() -> None:
    with pytest.raises(ValueError, match="spammer_share"):
        WorkerModel(spammer_share=1.5)
    with pytest.raises(ValueError, match="spammer_mode"):
        WorkerModel(spammer_mode="sleepy")
    with pytest.raises(ValueError, match="blocks every worker"):
        simulate_crowd(
            WorkerModel(block_below=1.0, accuracy_mean=0.6, gold_per_hit=60),
            np.random.default_rng(0),
        )


def test_counting_oracle_maps_positions_and_counts_paid_questions() -> None:
    answers = Answers(
        np.array([True, False, True, False]),
        np.array([1, 2, 1, 3], dtype=np.int32),
        np.zeros(4, dtype=bool),
    )
    oracle = CountingOracle(answers, order=np.array([3, 2, 1, 0]))
    assert oracle(np.array([0, 1])).tolist() == [False, True]  # masks 3 and 2
    assert oracle(np.array([0])).tolist() == [False]  # asked again, same answer, paid again
    assert (oracle.asked, oracle.paid) == (3, 3 + 1 + 3)


# ---------------------------------------------------------------------------------- baselines


def _tiny() -> tuple[MaskSample, Answers]:
    sample = MaskSample(
        np.zeros((5, 2)),
        np.array([0.2, 0.9, 0.5, 0.7, 0.4]),
        np.array([0.1, 0.9, 0.8, 0.6, 0.95]),
    )
    answers = Answers(
        np.array([False, True, True, True, False]),
        np.array([1, 1, 2, 1, 1], dtype=np.int32),
        np.zeros(5, dtype=bool),
    )
    return sample, answers


def test_verify_all_asks_every_mask_by_score() -> None:
    sample, answers = _tiny()
    out = run_verify_all(sample, answers, seconds_per_question=2.0, k_iou=0.75)
    assert (out.questions, out.paid_questions, out.accepted) == (5, 6, 3)
    assert out.iou_sum == pytest.approx(0.9 + 0.8 + 0.6)
    assert out.good == 2
    assert out.trace.priority.tolist() == [0.9, 0.7, 0.5, 0.4, 0.2]
    assert out.trace.seconds.sum() == pytest.approx(12.0)


def test_manual_costs_80s_per_mask_at_human_quality() -> None:
    params = BaselineParams(manual_iou_mean=0.83)
    out = run_manual(20_000, np.random.default_rng(0), params, seconds_per_mask=80.0, k_iou=0.75)
    assert out.accepted == out.manual_masks == 20_000 and out.questions == 0
    assert out.trace.seconds.sum() == pytest.approx(20_000 * 80.0)
    assert out.iou_sum / out.accepted == pytest.approx(0.83, abs=0.005)
    assert out.trace.accepted.sum() == 20_000


def test_precision_threshold() -> None:
    prob = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pos = np.array([True, True, True, False, True])
    assert _threshold_for_precision(prob, pos, 0.95, 1) == 0.7
    assert _threshold_for_precision(prob, pos, 0.75, 1) == 0.5  # 4 of 5 = 0.8
    assert _threshold_for_precision(prob, pos, 0.95, 4) == np.inf  # not enough support


def test_lsun_labels_batches_and_auto_labels_the_confident() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    good = rng.random(n) < 0.5
    sample = MaskSample(
        (np.where(good, 2.0, -2.0) + rng.standard_normal(n))[:, None],
        np.clip(0.5 + 0.1 * rng.standard_normal(n), 0.01, 0.99),
        np.where(good, 0.9, 0.3),
    )
    answers = Answers(good.copy(), np.ones(n, dtype=np.int32), np.zeros(n, dtype=bool))
    params = BaselineParams(lsun_batch=200, lsun_rounds=3)
    out = run_lsun(
        sample, answers, np.random.default_rng(1), params, seconds_per_question=1.5, k_iou=0.75
    )
    assert out.questions == out.paid_questions <= 600
    assert out.trace.questions.sum() == out.questions
    assert out.accepted > 0.8 * good.sum()  # most positives labelled automatically
    assert out.good / out.accepted > 0.95  # at the precision the threshold asked for
    assert out.trace.accepted.sum() == out.accepted


# -------------------------------------------------------------------------------------- traces


def test_merge_and_curve_accumulate_in_priority_order() -> None:
    a = Trace(
        np.array([0.9, 0.5]),
        np.array([10.0, 10.0]),
        np.array([1, 1]),
        np.array([5, 0]),
        np.array([4.0, 0.0]),
        np.array([4, 0]),
    )
    b = Trace(
        np.array([0.7]),
        np.array([3600.0]),
        np.array([2]),
        np.array([2]),
        np.array([1.0]),
        np.array([1]),
    )
    merged = merge([a, b])
    assert merged.priority.tolist() == [0.9, 0.7, 0.5]
    c = curve(merged)
    assert c.accepted == [5, 7, 7] and c.questions == [1, 3, 4]
    assert c.mean_iou[-1] == pytest.approx(5.0 / 7)
    assert c.hours[-1] == pytest.approx(3620 / 3600)
    pooled = Trace(*(np.arange(10.0) for _ in range(6))).pooled(3)
    assert pooled.n_events == 3 and pooled.seconds.sum() == 45.0


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run over 20k masks in 3 classes with every method, its JSON and its plot."""
    out = tmp_path_factory.mktemp("sim")
    code = main(
        [
            "--masks", "20000", "--classes", "3", "--seed", "5", "--lsun-batch", "300",
            "--quiet", "--out", str(out / "r.json"), "--plot", str(out / "fig.png"),
        ]
    )  # fmt: skip
    assert code == 0
    return {"report": json.loads((out / "r.json").read_text()), "plot": out / "fig.png"}


def test_end_to_end_report_schema_and_plot(small_run: dict[str, Any]) -> None:
    report = small_run["report"]
    assert set(report) >= {"config", "model", "crowd", "methods", "checks", "classes", "curves"}
    assert set(report["methods"]) == set(METHODS)
    for name, m in report["methods"].items():
        for key in ("questions", "masks_accepted", "mean_iou", "hours", "usd", "share_iou_ge_k"):
            assert key in m, (name, key)
        assert report["curves"][name]["hours"], name
    assert sum(report["model"]["class_sizes"]) == 20_000 and len(report["classes"]) == 3
    assert small_run["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_engine_beats_manual_and_curtailment_is_exact(
    small_run: dict[str, Any],
) -> None:
    m, checks = small_run["report"]["methods"], small_run["report"]["checks"]
    assert m["manual"]["masks_accepted"] == 20_000
    assert m["manual"]["hours"] == pytest.approx(20_000 * 80 / 3600)
    assert m["verify_all"]["questions"] == 20_000
    for v in ("paper", "curtailed", "sequential"):
        assert m[v]["masks_accepted"] > 0
        assert m[v]["hours"] * 20 < m["manual"]["hours"]
        assert m[v]["speedup_vs_manual"] > 20
        assert m[v]["mean_iou"] > 0.75
    assert checks["curtailed_same_decisions"] is True
    assert m["curtailed"]["masks_accepted"] == m["paper"]["masks_accepted"]
    assert m["curtailed"]["mean_iou"] == pytest.approx(m["paper"]["mean_iou"])
    assert m["curtailed"]["questions"] < m["paper"]["questions"]
    # hours are the paid questions plus one gold question per ten, at 1.5 s
    paper = m["paper"]
    hits = math.ceil(paper["paid_questions"] / 50)
    assert paper["hours"] == pytest.approx((paper["paid_questions"] + 5 * hits) * 1.5 / 3600)


def test_simulation_is_deterministic_under_a_seed() -> None:
    def run(seed: int) -> dict[str, Any]:
        config = SimConfig(masks=3000, seed=seed, variants=("paper", "curtailed"))
        report = run_simulation(builtin_model(2), config).to_dict()
        for m in report["methods"].values():
            m.pop("seconds_wall")
        return {k: report[k] for k in ("methods", "classes", "curves", "crowd", "checks")}

    first = run(3)
    assert first == run(3)
    assert first["methods"] != run(4)["methods"]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_bad_files_exit_2_with_a_message_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_path, gt_path = _write_coco(tmp_path)
    missing = tmp_path / "nope.json"
    assert main(["--fit-predictions", str(missing), "--fit-ground-truth", str(gt_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "broken.json"
    bad.write_text("[1, 2")
    assert main(["--fit-predictions", str(pred_path), "--fit-ground-truth", str(bad)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert main(["--model", str(bad)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert main(["--fit-predictions", str(pred_path)]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["--variants", "fastest"]) == 2
    assert "fastest" in capsys.readouterr().err


def test_cli_fits_saves_and_reloads_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred_path, gt_path = _write_coco(tmp_path)
    saved = tmp_path / "model.json"
    args = ["--masks", "400", "--variants", "paper", "--baselines", "verify_all", "--quiet"]
    fit = ["--fit-predictions", str(pred_path), "--fit-ground-truth", str(gt_path)]
    assert main([*args, *fit, "--save-model", str(saved), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["feature_source"] == "box_geometry"
    assert [c["name"] for c in report["classes"]] == ["bed", "chair"]
    assert main([*args, "--model", str(saved), "--sizes", "empirical"]) == 0
    table = capsys.readouterr().out
    assert "paper" in table and "verify_all" in table


def test_class_rng_streams_are_independent_of_class_count() -> None:
    a = builtin_model(2).classes[1].mixture.sample(100, class_rng(0, 1, 1))
    b = builtin_model(5).classes[1].mixture.sample(100, class_rng(0, 1, 1))
    assert np.array_equal(a.iou, b.iou)
