"""Mask Scoring R-CNN: IoU targets, training, filters, features, checkpoints, evaluation.

Everything runs on a tiny configuration (64 px images, narrow heads) so the module stays within a
few tens of seconds on two CPU cores. Where a test needs detections from an untrained network it
sets the class bias so that one class dominates every box and centres the IoU head's output: the
pipeline is then exercised exactly as with a trained model, with predictable numbers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from workers import model as mm
from workers import synthetic

SIZE = 64


@pytest.fixture(autouse=True)
def _threads_and_seed() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides: object) -> mm.ModelConfig:
    values: dict[str, object] = {
        "num_classes": 3,
        "min_size": SIZE,
        "max_size": SIZE,
        "anchor_sizes": (8, 16, 32, 64, 128),
        "fpn_channels": 32,
        "box_head_dim": 64,
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 32,
        "iou_head_channels": 16,
        "iou_head_fc_dim": 32,
        "feature_pool": 2,
        "feature_dim": 24,
        "min_box_area": 0.0,
        "detections_per_img": 50,
        "seed": 1,
    }
    values.update(overrides)
    return mm.ModelConfig(**values)  # type: ignore[arg-type]


def make_confident(model: nn.Module) -> None:
    """Class 1 wins every box (confidence ~0.98); IoU predictions scatter around 0.5."""
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.zero_()
        cls.bias.zero_()
        cls.bias[1] = 6.0
        model.roi_heads.mask_iou_head.predictor.bias.fill_(0.5)
        model.roi_heads.mask_iou_head.predictor.weight.mul_(20.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("data")
    classes = ["disc", "square", "triangle"]
    train = synthetic.generate(out, 6, seed=4, image_size=SIZE, classes=classes)
    return train, out / "images"


@pytest.fixture(scope="module")
def dataset(data: tuple[Path, Path]) -> mm.CocoInstanceDataset:
    return mm.CocoInstanceDataset(*data)


@pytest.fixture(scope="module")
def images(dataset: mm.CocoInstanceDataset) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(3)]


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _reference_ious(
    logits: torch.Tensor,
    boxes: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    matched: list[torch.Tensor],
) -> np.ndarray:
    """IoU per RoI by pycocotools, on the mask as inference pastes it into the image."""
    out, start = [], 0
    for b, gts, idx in zip(boxes, gt_masks, matched, strict=True):
        h, w = gts.shape[-2:]
        for k in range(b.shape[0]):
            prob = logits[start + k].sigmoid()[None, None]
            pred = paste_masks_in_image(prob, b[k : k + 1], (h, w), padding=1)[0, 0] >= 0.5
            gt = gts[idx[k]].numpy().astype(bool)
            out.append(mask_utils.iou([_rle(pred.numpy())], [_rle(gt)], [0])[0, 0])
        start += b.shape[0]
    return np.array(out)


# ------------------------------------------------------------------------------------------
# configuration and construction


def test_config_validates_and_round_trips() -> None:
    config = tiny_config(category_ids=(7, 3, 9))
    assert mm.ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.output_feature_dim == 24 and config.raw_feature_dim == 32 * 4
    assert mm.ModelConfig(num_classes=2).category_ids == (1, 2)
    with pytest.raises(ValueError, match="backbone"):
        tiny_config(backbone="vgg")
    with pytest.raises(ValueError, match="anchor_sizes"):
        tiny_config(anchor_sizes=(8, 16))
    with pytest.raises(ValueError, match="category_ids"):
        tiny_config(category_ids=(1, 2))
    with pytest.raises(ValueError, match="score_threshold"):
        tiny_config(score_threshold=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_config(num_classes=0)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        mm.ModelConfig.from_dict({"num_classes": 2, "colour": "red"})


def test_build_is_seeded_and_shares_weights_with_torchvision() -> None:
    config = tiny_config()
    a, b = mm.build_model(config), mm.build_model(config)
    c = mm.build_model(dataclasses.replace(config, seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    plain = mm.build_torchvision_model(config)
    result = plain.load_state_dict(sa, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys
    assert all(
        k.startswith(("roi_heads.mask_iou_head.", "roi_heads.attention."))
        for k in result.unexpected_keys
    )


# ------------------------------------------------------------------------------------------
# IoU targets


def test_mask_iou_targets_are_true_ious() -> None:
    height, width = 48, 64
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((yy - 24) ** 2 + (xx - 40) ** 2 < 15**2).to(torch.uint8)
    rect = torch.zeros(height, width, dtype=torch.uint8)
    rect[5:30, 8:36] = 1
    gt = [torch.stack([rect, disc]), torch.stack([disc])]
    boxes = [
        torch.tensor([[8.0, 5.0, 36.0, 30.0], [25.0, 9.0, 55.0, 39.0], [0.0, 0.0, 30.0, 40.0]]),
        torch.tensor([[20.0, 5.0, 60.0, 45.0], [26.0, 10.0, 54.0, 38.0]]),
    ]
    matched = [torch.tensor([0, 1, 0]), torch.tensor([0, 0])]
    logits = torch.randn(5, 28, 28, generator=torch.Generator().manual_seed(3)) * 3.0
    logits[0] = 20.0  # the whole box: the rectangle's own box -> IoU close to 1
    logits[4] = -20.0  # an empty mask -> IoU 0

    targets = mm.mask_iou_targets(logits, boxes, gt, matched)
    expected = _reference_ious(logits, boxes, gt, matched)
    np.testing.assert_allclose(targets.numpy(), expected, atol=1e-6)
    assert targets[0] > 0.9 and targets[4] == 0.0
    assert 0.0 < targets[1] < 0.9 and 0.0 < targets[3] < 0.9
    # Chunked pasting is an implementation detail: same numbers.
    torch.testing.assert_close(mm.mask_iou_targets(logits, boxes, gt, matched, chunk=2), targets)


def test_mask_iou_target_is_one_for_a_mask_equal_to_its_object() -> None:
    box = torch.tensor([[10.0, 12.0, 50.0, 40.0]])
    logits = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(5)) * 4.0
    pasted = paste_masks_in_image(logits.sigmoid()[:, None], box, (64, 64), padding=1)[0, 0]
    object_mask = (pasted >= 0.5).to(torch.uint8)[None]
    targets = mm.mask_iou_targets(logits, [box], [object_mask], [torch.tensor([0])])
    assert targets.tolist() == [1.0]


def test_training_regresses_the_true_iou(
    dataset: mm.CocoInstanceDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IoU loss of a real training step is the L2 distance to pycocotools IoUs."""
    model = mm.build_model(tiny_config(iou_loss_weight=2.0))
    calls: list[tuple[tuple, torch.Tensor]] = []
    real = mm.mask_iou_targets

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append((args, out))
        return out

    predictions: list[torch.Tensor] = []
    monkeypatch.setattr(mm, "mask_iou_targets", recording)
    model.roi_heads.mask_iou_head.register_forward_hook(
        lambda _m, _i, out: predictions.append(out.detach())
    )
    batch = [dataset[0], dataset[1]]
    losses = model([im for im, _ in batch], [t for _, t in batch])

    assert len(calls) == 1 and len(predictions) == 1
    (logits, rois, gt_masks, matched), targets = calls[0]
    assert targets.shape[0] == predictions[0].shape[0] > 0
    expected = _reference_ious(logits, rois, gt_masks, matched)
    np.testing.assert_allclose(targets.numpy(), expected, atol=1e-6)
    assert targets.max() > 0.0  # positive RoIs overlap their objects
    mse = float(((predictions[0] - targets) ** 2).mean())
    assert losses["loss_mask_iou"].item() == pytest.approx(2.0 * mse, rel=1e-5)


# ------------------------------------------------------------------------------------------
# training


def test_a_few_steps_lower_the_loss(dataset: mm.CocoInstanceDataset) -> None:
    batch = ([dataset[0][0], dataset[1][0]], [dataset[0][1], dataset[1][1]])
    model = mm.build_model(tiny_config())

    def loss() -> float:
        torch.manual_seed(123)  # same proposal sampling for both measurements
        with torch.no_grad():
            return sum(model(*batch).values()).item()

    before = loss()
    optimizer = mm.make_optimizer(model, lr=0.02)
    history = mm.train_steps(model, [batch], optimizer, 10)
    after = loss()
    assert len(history) == 10 and set(history[0]) >= {"loss", "loss_mask", "loss_mask_iou"}
    assert after < 0.8 * before, (before, after)


def test_train_steps_rejects_bad_input(dataset: mm.CocoInstanceDataset) -> None:
    model = mm.build_model(tiny_config())
    optimizer = mm.make_optimizer(model)
    with pytest.raises(ValueError, match="no batches"):
        mm.train_steps(model, [], optimizer, 1)
    with pytest.raises(ValueError, match=">= 0"):
        mm.train_steps(model, [], optimizer, -1)


# ------------------------------------------------------------------------------------------
# inference


def test_predict_shapes_scores_and_filters(images: list[torch.Tensor]) -> None:
    loose = mm.build_model(tiny_config(score_threshold=0.0, min_box_area=0.0))
    make_confident(loose)
    everything = mm.predict(loose, images)
    assert all(len(p["scores"]) > 5 for p in everything)

    scores = np.concatenate([p["scores"] for p in everything])
    areas = np.concatenate(
        [(p["boxes"][:, 2] - p["boxes"][:, 0]) * (p["boxes"][:, 3] - p["boxes"][:, 1])
         for p in everything]
    )  # fmt: skip
    threshold, min_area = float(np.median(scores)), float(np.median(areas))
    strict = mm.build_model(tiny_config(score_threshold=threshold, min_box_area=min_area))
    strict.load_state_dict(loose.state_dict())
    kept = mm.predict(strict, images)

    for p, full in zip(kept, everything, strict=True):
        n = len(p["scores"])
        assert p["boxes"].shape == (n, 4) and p["labels"].shape == (n,)
        assert p["masks"].shape == (n, SIZE, SIZE) and p["masks"].dtype == bool
        assert p["features"].shape == (n, 24) and p["features"].dtype == np.float32
        np.testing.assert_allclose(p["scores"], p["mask_iou"] * p["class_conf"], rtol=1e-6)
        assert np.all(np.diff(p["scores"]) <= 0), "sorted by score"
        assert np.all((p["mask_iou"] >= 0) & (p["mask_iou"] <= 1))
        area = (p["boxes"][:, 2] - p["boxes"][:, 0]) * (p["boxes"][:, 3] - p["boxes"][:, 1])
        assert np.all(p["scores"] > threshold) and np.all(area >= min_area)
        # Exactly the loose detections that pass both filters: nothing else was lost.
        full_area = (full["boxes"][:, 2] - full["boxes"][:, 0]) * (
            full["boxes"][:, 3] - full["boxes"][:, 1]
        )
        passing = (full["scores"] > threshold) & (full_area >= min_area)
        np.testing.assert_allclose(p["scores"], full["scores"][passing], rtol=1e-6)
        np.testing.assert_allclose(p["boxes"], full["boxes"][passing], rtol=1e-6)
        np.testing.assert_allclose(p["features"], full["features"][passing], rtol=1e-5)
    assert 0 < sum(len(p["scores"]) for p in kept) < len(scores)


def test_detections_are_torchvisions_plus_scores(images: list[torch.Tensor]) -> None:
    """Boxes, classes, confidences and masks are plain Mask R-CNN's: the head only adds."""
    config = tiny_config()
    ours = mm.build_model(config)
    make_confident(ours)
    plain = mm.build_torchvision_model(config)
    plain.load_state_dict(ours.state_dict(), strict=False)
    ours.eval()
    plain.eval()
    with torch.no_grad():
        mine, base = ours(images), plain(images)
    matched = 0
    for m, b in zip(mine, base, strict=True):
        for k in range(m["boxes"].shape[0]):
            same = torch.where((b["boxes"] == m["boxes"][k]).all(dim=1))[0]
            assert len(same) == 1
            j = int(same[0])
            assert b["labels"][j] == m["labels"][k]
            assert b["scores"][j] == m["class_conf"][k]
            torch.testing.assert_close(b["masks"][j], m["masks"][k])
            matched += 1
    assert matched > 0


def test_features_are_a_seeded_projection_of_mask_attention() -> None:
    roi = torch.randn(5, 8, 14, 14, generator=torch.Generator().manual_seed(0))
    probs = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(1))
    raw = mm.MaskAttentionFeatures(8, 2, None, seed=0)
    a = mm.MaskAttentionFeatures(8, 2, 6, seed=0)
    b = mm.MaskAttentionFeatures(8, 2, 6, seed=0)
    c = mm.MaskAttentionFeatures(8, 2, 6, seed=1)
    pooled = raw(roi, probs)
    weights = torch.nn.functional.avg_pool2d(probs[:, None], 2)
    expected = torch.nn.functional.avg_pool2d(roi * weights, 7).flatten(1)
    torch.testing.assert_close(pooled, expected)
    assert pooled.shape == (5, 32)
    torch.testing.assert_close(a(roi, probs), pooled @ a.projection)
    torch.testing.assert_close(a(roi, probs), b(roi, probs))
    assert not torch.allclose(a(roi, probs), c(roi, probs))
    assert "projection" in a.state_dict() and "projection" not in raw.state_dict()


def test_predict_rejects_bad_images() -> None:
    model = mm.build_model(tiny_config())
    with pytest.raises(ValueError, match="H x W x 3"):
        mm.predict(model, [np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        mm.predict(model, [torch.zeros(1, 8, 8)])


# ------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_and_resume(tmp_path: Path, dataset: mm.CocoInstanceDataset) -> None:
    batches = [([dataset[i][0]], [dataset[i][1]]) for i in range(2)]
    config = tiny_config()
    model = mm.build_model(config)
    optimizer = mm.make_optimizer(model, lr=0.01)
    mm.train_steps(model, batches, optimizer, 2, warmup_steps=4)
    path = mm.save_checkpoint(tmp_path / "m.pt", model, optimizer, 2, config)

    loaded = mm.load_checkpoint(path, device="cpu")
    assert loaded.step == 2 and loaded.config == config
    make_confident(model)
    make_confident(loaded.model)
    images = [dataset[3][0], dataset[4][0]]
    for a, b in zip(mm.predict(model, images), mm.predict(loaded.model, images), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key

    # Resuming continues the run exactly: same weights as training on without stopping.
    model = mm.load_checkpoint(path, device="cpu").model
    optimizer = mm.make_optimizer(model, lr=0.01)
    optimizer.load_state_dict(loaded.optimizer_state)  # type: ignore[arg-type]
    resumed = mm.load_checkpoint(path, device="cpu")
    resumed_optimizer = resumed.make_optimizer(lr=0.5)  # the saved state wins over the argument
    torch.manual_seed(9)
    mm.train_steps(model, batches, optimizer, 1, start_step=2, warmup_steps=4)
    torch.manual_seed(9)
    mm.train_steps(resumed.model, batches, resumed_optimizer, 1, start_step=2, warmup_steps=4)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 3 / 4)
    for (name, p), q in zip(model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_load_checkpoint_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        mm.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a maskmill checkpoint"):
        mm.load_checkpoint(tmp_path / "other.pt")


def test_load_checkpoint_explains_every_kind_of_bad_file(tmp_path: Path) -> None:
    """A requester's file fails with a ValueError naming it (as the caller calls it) and the
    reason, never with a pickling or state-dict error from inside torch."""
    config = tiny_config()
    path = mm.save_checkpoint(
        tmp_path / "ok.pt", mm.build_model(config), None, 3, config, extra={"init": "scratch"}
    )
    assert mm.load_checkpoint(path, device="cpu").extra == {"init": "scratch"}
    payload = torch.load(path, weights_only=True)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"half a file")
    with pytest.raises(ValueError, match=r"^'mine\.pt' is not a maskmill .*torch\.load cannot"):
        mm.load_checkpoint(bad, name="'mine.pt'")
    torch.save({**payload, "config": {**payload["config"], "colour": "red"}}, bad)
    with pytest.raises(ValueError, match="invalid model configuration: unknown ModelConfig"):
        mm.load_checkpoint(bad)
    del payload["model"]["roi_heads.attention.projection"]
    weights = payload["model"]
    weights["backbone.body.conv1.weight"] = weights["backbone.body.conv1.weight"][:1]
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="do not fit") as failure:
        mm.load_checkpoint(bad)
    message = str(failure.value)
    assert "1 tensors missing, e.g. 'roi_heads.attention.projection'" in message
    assert "'backbone.body.conv1.weight' is [1, 3, 7, 7] where [64, 3, 7, 7]" in message
    torch.save({**payload, "model": [1, 2]}, bad)
    with pytest.raises(ValueError, match="not a dictionary of tensors"):
        mm.load_checkpoint(bad)


# ------------------------------------------------------------------------------------------
# data and evaluation


def test_dataset_targets_follow_the_coco_file(data: tuple[Path, Path]) -> None:
    coco = json.loads(data[0].read_text())
    ds = mm.CocoInstanceDataset(*data, category_ids=[3, 1])  # square dropped, order remapped
    image, target = ds[0]
    assert image.shape == (3, SIZE, SIZE) and image.min() >= 0.0 and image.max() <= 1.0
    anns = [
        a for a in coco["annotations"]
        if a["image_id"] == coco["images"][0]["id"] and a["category_id"] in (1, 3)
    ]  # fmt: skip
    assert target["boxes"].shape == (len(anns), 4) and target["masks"].shape[0] == len(anns)
    for k, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        assert target["boxes"][k].tolist() == [x, y, x + w, y + h]
        assert target["labels"][k] == (1 if ann["category_id"] == 3 else 2)
        assert int(target["masks"][k].sum()) == ann["area"]
    with pytest.raises(ValueError, match="cannot read COCO file"):
        mm.CocoInstanceDataset(data[0].parent / "nope.json", data[1])


class _Oracle(nn.Module):
    """Stands in for the detector in ``evaluate_mask_ap``: returns given detections in order."""

    def __init__(self, detections: list[dict[str, torch.Tensor]], config: mm.ModelConfig) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # predict() reads the device from it
        self.queue = list(detections)
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.queue.pop(0) for _ in images]


def _oracle_detections(
    dataset: mm.CocoInstanceDataset, transform: object = None
) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        masks = t["masks"].float()
        if transform is not None:
            masks = transform(masks)  # type: ignore[operator]
        n = masks.shape[0]
        out.append(
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.full((n,), 0.9),
                "mask_iou": torch.full((n,), 0.9),
                "class_conf": torch.ones(n),
                "masks": masks[:, None],
                "features": torch.zeros(n, 4),
            }
        )
    return out


def test_evaluate_mask_ap_scores_perfect_and_degraded_masks(
    data: tuple[Path, Path], dataset: mm.CocoInstanceDataset
) -> None:
    config = tiny_config(category_ids=dataset.category_ids)
    perfect = _Oracle(_oracle_detections(dataset), config)
    assert mm.evaluate_mask_ap(perfect, *data) == pytest.approx(1.0)  # type: ignore[arg-type]
    shifted = _Oracle(_oracle_detections(dataset, lambda m: m.roll(4, dims=-1)), config)
    ap = mm.evaluate_mask_ap(shifted, *data)  # type: ignore[arg-type]
    assert 0.0 <= ap < 0.9


def test_coco_results_round_trip(images: list[torch.Tensor]) -> None:
    config = tiny_config(category_ids=(10, 20, 30))
    model = mm.build_model(config)
    make_confident(model)
    preds = mm.predict(model, images)
    results = mm.to_coco_results(preds, [5, 6, 7], config.category_ids)
    assert len(results) == sum(len(p["scores"]) for p in preds) > 0
    first = results[0]
    assert first["image_id"] == 5 and first["category_id"] == 10  # label 1 -> first id
    assert len(first["feature"]) == 24 and first["score"] == pytest.approx(preds[0]["scores"][0])
    rle = {**first["segmentation"], "counts": first["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), preds[0]["masks"][0])
    with pytest.raises(ValueError, match="image ids"):
        mm.to_coco_results(preds, [5], config.category_ids)
