"""Mask R-CNN with a mask-IoU head (Mask Scoring R-CNN) and mask-attention features.

Every predicted mask leaves the detector with the two things the rest of maskmill needs (paper
Sec. 4.1 and DESIGN.md "Workers"):

* a score ``s = predicted mask IoU × class confidence``: the cluster prior and the quantity the
  automatic accept/reject rules threshold;
* a feature ``f``: mask probabilities × RoI features of the mask branch, pooled and optionally
  reduced by a seeded Gaussian random projection; the trees are built on it.

Integration with torchvision, and what is overridden
----------------------------------------------------
The model *is* a ``torchvision.models.detection.MaskRCNN``: backbone, transform, RPN, box head and
mask head are torchvision's own modules, built by torchvision's own constructor, with the same
parameter names (so a plain torchvision Mask R-CNN can load the shared weights, which the benchmark
relies on). Two things are replaced:

``MaskScoringRoIHeads`` (subclass of ``RoIHeads``) overrides only ``forward``. torchvision's
``forward`` computes the mask branch inline and discards the RoI features and the per-class mask
logits, and the IoU head needs both (plus the matched targets during training). The override
re-orchestrates the same building blocks, calling torchvision for everything it already does
(``select_training_samples``, ``fastrcnn_loss``, ``postprocess_detections``, ``maskrcnn_loss``,
the RoI pools and heads) and adds: the IoU head and its loss, the score ``s`` and its threshold,
and the attention features. Keypoint heads are not supported.

``MaskScoringRCNN`` (subclass of ``MaskRCNN``) overrides ``forward`` only to drop detections
whose box, in original image pixels, is smaller than ``min_box_area``; the RoI heads cannot do it
because they only see the resized frame.

Score threshold: torchvision's ``box_score_thresh`` is set to the same ``score_threshold`` as the
final filter on ``s``. Because the IoU prediction is clamped to [0, 1], ``s <= confidence``, so a
box with confidence ``<= threshold`` can never pass; dropping it before the mask branch is exact and
saves the mask and IoU heads the work. The final filter keeps ``s > threshold``.

IoU targets (training): the true IoU, in the network's input frame, between the predicted mask
of the ground-truth class, pasted into the image exactly as inference pastes it
(``paste_masks_in_image``, then ``>= 0.5``), and the full ground-truth mask of the matched
object. Unlike the RoI-frame approximation of the MS R-CNN paper, this also counts the part of the
object outside the proposal box, and it is what the output mask will be judged on. Loss: L2, on
the ground-truth class's output, as in MS R-CNN.

Normalisation: training starts from scratch (no downloads), and with batches of a few images
BatchNorm statistics are noise, so by default (``norm="group"``) the backbone, the FPN and the mask
head use GroupNorm, as is usual for detectors trained from scratch.

CPU sizing: torchvision fixes the FPN at 256 channels, and on a 256 px image the FPN and RPN
convolutions then cost more than the whole ResNet-18; the default ``fpn_channels=128`` (with a
512-wide box head) keeps a from-scratch model trainable on two CPU cores. Set ``fpn_channels=256``,
``box_head_dim=1024`` for torchvision's standard sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_loss,
    paste_masks_in_image,
)
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

BACKBONES: tuple[str, ...] = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn")
NORMS: tuple[str, ...] = ("group", "batch", "frozen")
CHECKPOINT_FORMAT = "maskmill.mask-scoring-rcnn/1"
MASK_THRESHOLD = 0.5  # the binarisation torchvision documents for its masks (mask >= 0.5)
MASK_ROI_SIZE = 14  # torchvision's mask-branch RoIAlign output, which MaskRCNN builds


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints.

    ``num_classes`` counts object classes, background excluded. ``category_ids`` maps model label
    ``k`` (1-based) to the COCO category id ``category_ids[k - 1]``; default ``1..num_classes``.
    Defaults are sized for a CPU and ~256 px images; ``min_box_area`` is the paper's 1000 px for
    real data and should be lowered for small synthetic images.
    """

    num_classes: int
    backbone: str = "resnet18_fpn"
    norm: str = "group"
    min_size: int = 256
    max_size: int = 512
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    fpn_channels: int = 128
    box_head_dim: int = 512
    score_threshold: float = 0.2
    min_box_area: float = 1000.0
    nms_threshold: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 600
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 128
    feature_pool: int = 2
    feature_dim: int | None = 256
    # 64 keeps the detect overhead under 15% on a CPU (measured ~7-9%; 128 measured ~14-20%);
    # MS R-CNN uses 256 (with fc 1024) on GPUs.
    iou_head_channels: int = 64
    iou_head_fc_dim: int = 512
    iou_loss_weight: float = 1.0
    seed: int = 0
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")

        for name in (
            "num_classes", "min_size", "max_size", "detections_per_img", "feature_pool",
            "fpn_channels", "box_head_dim",
            "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test", "box_batch_size_per_image", "iou_head_channels",
            "iou_head_fc_dim",
        ):  # fmt: skip
            positive(name)
        if self.feature_dim is not None:
            positive("feature_dim")
        if self.feature_pool > MASK_ROI_SIZE:
            raise ValueError(
                f"ModelConfig.feature_pool must be <= the RoI size {MASK_ROI_SIZE}, "
                f"got {self.feature_pool}"
            )
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"ModelConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.max_size < self.min_size:
            raise ValueError(
                f"ModelConfig.max_size ({self.max_size}) must be >= min_size ({self.min_size})"
            )
        sizes = tuple(self.anchor_sizes)
        if len(sizes) != 5 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                "ModelConfig.anchor_sizes must be 5 positive integers (one per FPN level), "
                f"got {self.anchor_sizes!r}"
            )
        object.__setattr__(self, "anchor_sizes", sizes)
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(
                f"ModelConfig.score_threshold must be in [0, 1), got {self.score_threshold!r}"
            )
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError(
                f"ModelConfig.nms_threshold must be in (0, 1], got {self.nms_threshold}"
            )
        if self.min_box_area < 0:
            raise ValueError(f"ModelConfig.min_box_area must be >= 0, got {self.min_box_area}")
        if self.iou_loss_weight < 0:
            raise ValueError(
                f"ModelConfig.iou_loss_weight must be >= 0, got {self.iou_loss_weight}"
            )
        if self.category_ids is None:
            object.__setattr__(self, "category_ids", tuple(range(1, self.num_classes + 1)))
        else:
            ids = tuple(int(c) for c in self.category_ids)
            if len(ids) != self.num_classes or len(set(ids)) != len(ids):
                raise ValueError(
                    f"ModelConfig.category_ids must be {self.num_classes} distinct ids "
                    f"(one per class), got {self.category_ids!r}"
                )
            object.__setattr__(self, "category_ids", ids)

    @property
    def raw_feature_dim(self) -> int:
        """Length of the pooled attention feature before the random projection."""
        return self.fpn_channels * self.feature_pool * self.feature_pool

    @property
    def output_feature_dim(self) -> int:
        return self.raw_feature_dim if self.feature_dim is None else self.feature_dim

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        values = dict(data)
        for key in ("anchor_sizes", "category_ids"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# the added heads


class MaskIoUHead(nn.Module):
    """Mask Scoring R-CNN's MaskIoU head: regresses the IoU of a predicted mask with its object.

    Input: the RoI features of the mask branch and the predicted mask probabilities, max-pooled
    to the RoI resolution and concatenated as one more channel. Four 3x3 convolutions (the last
    with stride 2) and two fully connected layers, one output per class; the output of the
    predicted (or, in training, ground-truth) class is returned. ``channels`` and ``fc_dim``
    default below MS R-CNN's 256/1024: at 256 px on a CPU this head otherwise costs as much as
    the mask head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        roi_size: int,
        channels: int = 64,
        fc_dim: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels + 1
        for i in range(4):
            stride = 2 if i == 3 else 1
            layers += [
                nn.Conv2d(c_in, channels, 3, stride=stride, padding=1),
                nn.ReLU(inplace=True),
            ]
            c_in = channels
        self.convs = nn.Sequential(*layers)
        side = (roi_size + 1) // 2
        self.fcs = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, fc_dim),
            nn.ReLU(inplace=True),
            nn.Linear(fc_dim, fc_dim),
            nn.ReLU(inplace=True),
        )
        self.predictor = nn.Linear(fc_dim, num_classes)
        # Convolutions as torchvision's mask head, fully connected layers preserving the
        # variance of their input (fan-in), the regressor near zero as in MS R-CNN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1)
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)

    def forward(
        self, roi_features: torch.Tensor, mask_probs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        pooled = F.adaptive_max_pool2d(mask_probs[:, None], roi_features.shape[-2:])
        x = self.fcs(self.convs(torch.cat([roi_features, pooled], dim=1)))
        out = self.predictor(x)
        return out[torch.arange(out.shape[0], device=out.device), labels]


class MaskAttentionFeatures(nn.Module):
    """Per-mask feature: RoI features weighted by the mask probabilities, average-pooled.

    The RoI features are the mask branch's RoIAlign output (FPN features, ``C x 14 x 14``), the
    paper's "backbone features after RoI align"; the 28 x 28 probabilities are average-pooled to
    14 x 14 to weight them, and the product is average-pooled to ``pool x pool``.

    The paper compares logits, RoI features, MaskIoU features and this "mask attention" feature
    for clustering and finds the last best (Sec. 5.1): weighting by the mask focuses the feature on
    the object's pixels and encodes the mask's shape through the pooled layout.

    The projection matrix (entries N(0, 1/dim), the Johnson–Lindenstrauss scaling that keeps
    Euclidean distances in expectation) is drawn from ``seed`` and stored as a buffer, so a
    checkpoint carries it: features of different rounds of one project stay comparable even if
    torch's random generator changed between versions.
    """

    projection: torch.Tensor | None

    def __init__(self, in_channels: int, pool: int, out_dim: int | None, seed: int) -> None:
        super().__init__()
        self.pool = pool
        raw = in_channels * pool * pool
        if out_dim is None or out_dim == raw:
            self.register_buffer("projection", None)
            self.out_dim = raw
        else:
            generator = torch.Generator().manual_seed(seed)
            matrix = torch.randn(raw, out_dim, generator=generator) / math.sqrt(out_dim)
            self.register_buffer("projection", matrix)
            self.out_dim = out_dim

    def forward(self, roi_features: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
        attention = F.adaptive_avg_pool2d(mask_probs[:, None], roi_features.shape[-2:])
        pooled = F.adaptive_avg_pool2d(roi_features * attention, self.pool).flatten(1)
        if self.projection is None:
            return pooled
        return pooled @ self.projection


@torch.no_grad()
def mask_iou_targets(
    mask_logits: torch.Tensor,
    proposals: Sequence[torch.Tensor],
    gt_masks: Sequence[torch.Tensor],
    matched_idxs: Sequence[torch.Tensor],
    *,
    chunk: int = 32,
) -> torch.Tensor:
    """True IoU of each predicted mask with the ground-truth mask of its matched object.

    ``mask_logits`` is ``[N, M, M]`` (one class per RoI), RoIs concatenated over images in the
    order of ``proposals``; ``gt_masks[i]`` is ``[G_i, H_i, W_i]`` in the same frame as the boxes;
    ``matched_idxs[i]`` indexes into it. The predicted mask is pasted into the image as inference
    does and binarised at 0.5, so the target is the IoU of exactly the mask the detector will
    output. Pasting runs ``chunk`` RoIs at a time to bound memory on large images.
    """
    total = sum(len(p) for p in proposals)
    if mask_logits.shape[0] != total:
        raise ValueError(f"{mask_logits.shape[0]} mask logits for {total} proposals")
    targets = []
    start = 0
    for boxes, masks, idxs in zip(proposals, gt_masks, matched_idxs, strict=True):
        n = boxes.shape[0]
        probs = mask_logits[start : start + n].sigmoid()
        start += n
        height, width = masks.shape[-2:]
        for c in range(0, n, chunk):
            pasted = paste_masks_in_image(
                probs[c : c + chunk, None], boxes[c : c + chunk], (height, width), padding=1
            )[:, 0]
            pred = pasted >= MASK_THRESHOLD
            gt = masks[idxs[c : c + chunk]].bool()
            inter = (pred & gt).flatten(1).sum(1)
            union = pred.flatten(1).sum(1) + gt.flatten(1).sum(1) - inter
            targets.append(inter.float() / union.clamp(min=1).float())
    if not targets:
        return mask_logits.new_zeros((0,))
    return torch.cat(targets).to(mask_logits.dtype)


class MaskScoringRoIHeads(RoIHeads):
    """torchvision's RoI heads plus a mask-IoU head and mask-attention features (see module doc)."""

    def __init__(
        self,
        *args: Any,
        mask_iou_head: MaskIoUHead,
        attention: MaskAttentionFeatures,
        iou_loss_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not self.has_mask():
            raise ValueError("MaskScoringRoIHeads needs the mask branch (pool, head, predictor)")
        if self.has_keypoint():
            raise ValueError("MaskScoringRoIHeads does not support keypoint heads")
        self.mask_iou_head = mask_iou_head
        self.attention = attention
        self.iou_loss_weight = iou_loss_weight

    @classmethod
    def from_roi_heads(
        cls,
        base: RoIHeads,
        *,
        mask_iou_head: MaskIoUHead,
        attention: MaskAttentionFeatures,
        iou_loss_weight: float = 1.0,
    ) -> MaskScoringRoIHeads:
        """Upgrade torchvision-built heads, sharing their modules and settings."""
        return cls(
            box_roi_pool=base.box_roi_pool,
            box_head=base.box_head,
            box_predictor=base.box_predictor,
            fg_iou_thresh=base.proposal_matcher.high_threshold,
            bg_iou_thresh=base.proposal_matcher.low_threshold,
            batch_size_per_image=base.fg_bg_sampler.batch_size_per_image,
            positive_fraction=base.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=base.box_coder.weights,
            score_thresh=base.score_thresh,
            nms_thresh=base.nms_thresh,
            detections_per_img=base.detections_per_img,
            mask_roi_pool=base.mask_roi_pool,
            mask_head=base.mask_head,
            mask_predictor=base.mask_predictor,
            mask_iou_head=mask_iou_head,
            attention=attention,
            iou_loss_weight=iou_loss_weight,
        )

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            class_logits, box_regression = self._box_branch(features, proposals, image_shapes)
            boxes, confidences, labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes
            )
            return self._detections(features, image_shapes, boxes, confidences, labels), {}

        if targets is None:
            raise ValueError("targets are required in training mode")
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise ValueError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise ValueError(f"target labels must be int64, got {t['labels'].dtype}")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        class_logits, box_regression = self._box_branch(features, proposals, image_shapes)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        losses.update(
            self._mask_losses(features, image_shapes, targets, proposals, matched_idxs, labels)
        )
        return [], losses

    def _box_branch(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def _mask_losses(
        self,
        features: dict[str, torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]],
        proposals: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        # Mask and IoU heads train on positive RoIs only, as in torchvision and MS R-CNN.
        positive = [torch.where(lab > 0)[0] for lab in labels]
        rois = [p[i] for p, i in zip(proposals, positive, strict=True)]
        matched = [m[i] for m, i in zip(matched_idxs, positive, strict=True)]
        roi_labels = torch.cat([lab[i] for lab, i in zip(labels, positive, strict=True)])
        roi_features = self.mask_roi_pool(features, rois, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(roi_features))
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        loss_mask = maskrcnn_loss(mask_logits, rois, gt_masks, gt_labels, matched)

        # The IoU head judges the mask; it must not reshape it to be easier to judge: detach.
        index = torch.arange(roi_labels.shape[0], device=roi_labels.device)
        class_logits = mask_logits[index, roi_labels].detach()
        iou_targets = mask_iou_targets(class_logits, rois, gt_masks, matched)
        iou_pred = self.mask_iou_head(roi_features, class_logits.sigmoid(), roi_labels)
        if iou_pred.numel() == 0:
            loss_iou = iou_pred.sum() * 0.0
        else:
            loss_iou = F.mse_loss(iou_pred, iou_targets)
        return {"loss_mask": loss_mask, "loss_mask_iou": self.iou_loss_weight * loss_iou}

    def _detections(
        self,
        features: dict[str, torch.Tensor],
        image_shapes: list[tuple[int, int]],
        boxes: list[torch.Tensor],
        confidences: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> list[dict[str, torch.Tensor]]:
        counts = [b.shape[0] for b in boxes]
        roi_features = self.mask_roi_pool(features, boxes, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(roi_features))
        flat_labels = torch.cat(labels)
        index = torch.arange(flat_labels.shape[0], device=flat_labels.device)
        probs = mask_logits[index, flat_labels].sigmoid()
        mask_iou = self.mask_iou_head(roi_features, probs, flat_labels).clamp(0.0, 1.0)
        feats = self.attention(roi_features, probs)
        scores = mask_iou * torch.cat(confidences)

        result = []
        for b, conf, lab, s, iou, p, f in zip(
            boxes,
            confidences,
            labels,
            scores.split(counts),
            mask_iou.split(counts),
            probs.split(counts),
            feats.split(counts),
            strict=True,
        ):
            keep = torch.where(s > self.score_thresh)[0]
            keep = keep[torch.argsort(s[keep], descending=True, stable=True)]
            result.append(
                {
                    "boxes": b[keep],
                    "labels": lab[keep],
                    "scores": s[keep],
                    "class_conf": conf[keep],
                    "mask_iou": iou[keep],
                    "masks": p[keep][:, None],  # [N, 1, M, M]; transform.postprocess pastes them
                    "features": f[keep],
                }
            )
        return result


# ----------------------------------------------------------------------------------------------
# the model


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _norm_layer(norm: str) -> Any:
    return {"group": _group_norm, "batch": nn.BatchNorm2d, "frozen": misc_nn_ops.FrozenBatchNorm2d}[
        norm
    ]


def _backbone(config: ModelConfig) -> BackboneWithFPN:
    """ResNet + FPN with ``fpn_channels`` outputs (torchvision's helper fixes them at 256)."""
    body = getattr(resnet, config.backbone.removesuffix("_fpn"))(
        weights=None, norm_layer=_norm_layer(config.norm)
    )
    stage2 = body.inplanes // 8  # torchvision's own way to read the stage widths
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage2 * 2**i for i in range(4)],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        # Trained from scratch, the un-normalised FPN and mask head start with exploding
        # activations; GroupNorm there too, as in detectors trained from scratch.
        norm_layer=_group_norm if config.norm == "group" else None,
    )


def _maskrcnn_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Constructor arguments shared by our model and the plain torchvision baseline.

    Heads are passed explicitly because torchvision's defaults assume 256 FPN channels.
    """
    channels = config.fpn_channels
    roi = 7  # torchvision's box RoI size
    classes = config.num_classes + 1
    head_norm = _group_norm if config.norm == "group" else None
    return {
        "num_classes": None,  # given by the predictors below
        "min_size": config.min_size,
        "max_size": config.max_size,
        "rpn_anchor_generator": AnchorGenerator(
            sizes=tuple((s,) for s in config.anchor_sizes),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(config.anchor_sizes),
        ),
        "rpn_pre_nms_top_n_train": config.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": config.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": config.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": config.rpn_post_nms_top_n_test,
        "box_head": TwoMLPHead(channels * roi * roi, config.box_head_dim),
        "box_predictor": FastRCNNPredictor(config.box_head_dim, classes),
        "box_score_thresh": config.score_threshold,
        "box_nms_thresh": config.nms_threshold,
        "box_detections_per_img": config.detections_per_img,
        "box_batch_size_per_image": config.box_batch_size_per_image,
        "mask_head": MaskRCNNHeads(channels, (channels,) * 4, 1, norm_layer=head_norm),
        "mask_predictor": MaskRCNNPredictor(channels, channels, classes),
    }


class MaskScoringRCNN(MaskRCNN):
    """torchvision Mask R-CNN with :class:`MaskScoringRoIHeads` and a box-area filter.

    In eval mode each detection dict has ``boxes`` (xyxy, original pixels), ``labels``,
    ``scores`` (= ``mask_iou * class_conf``), ``class_conf``, ``mask_iou``, ``masks``
    (probabilities ``[N, 1, H, W]``) and ``features`` (``[N, feature dim]``), sorted by score.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(_backbone(config), **_maskrcnn_kwargs(config))
        base = self.roi_heads
        in_channels = self.backbone.out_channels
        roi_size = int(base.mask_roi_pool.output_size[0])
        self.roi_heads = MaskScoringRoIHeads.from_roi_heads(
            base,
            mask_iou_head=MaskIoUHead(
                in_channels,
                config.num_classes + 1,
                roi_size,
                channels=config.iou_head_channels,
                fc_dim=config.iou_head_fc_dim,
            ),
            attention=MaskAttentionFeatures(
                in_channels, config.feature_pool, config.feature_dim, config.seed
            ),
            iou_loss_weight=config.iou_loss_weight,
        )
        self.config = config

    def forward(  # type: ignore[override]
        self,
        images: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses in training mode; in eval mode, detections without the too-small boxes."""
        output = super().forward(images, targets)
        if self.training:
            return output
        return [self._drop_small(d) for d in output]

    def _drop_small(self, detections: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        boxes = detections["boxes"]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = area >= self.config.min_box_area
        return {k: v[keep] for k, v in detections.items()}


def build_model(config: ModelConfig) -> MaskScoringRCNN:
    """Build the detector with weights drawn from ``config.seed`` (same config → same weights).

    Built on the CPU in train mode; move it with ``.to(default_device())``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MaskScoringRCNN(config)


def build_torchvision_model(config: ModelConfig) -> MaskRCNN:
    """The plain torchvision Mask R-CNN with the same backbone and settings (the baseline).

    Its state dict is ours minus the IoU head and the projection, so
    ``plain.load_state_dict(ours.state_dict(), strict=False)`` shares every common weight.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MaskRCNN(_backbone(config), **_maskrcnn_kwargs(config))


# ----------------------------------------------------------------------------------------------
# data


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts}
        if isinstance(counts, str):
            rle["counts"] = counts.encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation of size {mask.shape} in an image of {(height, width)}")
    return mask


def image_to_tensor(image: Any) -> torch.Tensor:
    """A float ``[3, H, W]`` tensor in [0, 1] from a PIL image, an ``H x W x 3`` uint8 array or a
    ``[3, H, W]`` tensor (uint8, or float already in [0, 1])."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"array images must be H x W x 3 uint8, got {image.shape} {image.dtype}"
            )
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be [3, H, W], got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise ValueError(f"tensor images must be uint8 or floating point, got {image.dtype}")
        return image
    raise ValueError(f"unsupported image type {type(image).__name__}")


class CocoInstanceDataset(torch.utils.data.Dataset):
    """Images and instance masks of a COCO file, as torchvision detection targets.

    Model labels are 1-based positions in ``category_ids`` (default: the file's category ids,
    sorted); annotations of other categories, crowd annotations and empty boxes are skipped.
    Items are ``(image [3, H, W] float, {"boxes", "labels", "masks", "image_id"})``.
    """

    def __init__(
        self,
        coco_json: str | Path,
        images_dir: str | Path,
        *,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        path = Path(coco_json)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read COCO file {path}: {exc}") from exc
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise ValueError(f"{path} is not a COCO file: needs 'images' and 'categories'")
        self.images_dir = Path(images_dir)
        self.images: list[dict[str, Any]] = list(data["images"])
        for im in self.images:
            missing = {"id", "file_name", "width", "height"} - set(im)
            if missing:
                raise ValueError(f"{path}: image entry {im.get('id')} lacks {sorted(missing)}")
        file_ids = sorted(int(c["id"]) for c in data["categories"])
        self.category_ids: tuple[int, ...] = tuple(
            file_ids if category_ids is None else (int(c) for c in category_ids)
        )
        if not self.category_ids:
            raise ValueError(f"{path}: no categories")
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        known_images = {int(im["id"]) for im in self.images}
        self._annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in known_images}
        for ann in data.get("annotations", []):
            image_id = int(ann["image_id"])
            if image_id not in known_images:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')} names unknown image {image_id}"
                )
            if ann.get("iscrowd", 0) or int(ann["category_id"]) not in label_of:
                continue
            _, _, w, h = ann["bbox"]
            if w < 1 or h < 1:
                continue
            self._annotations[image_id].append(ann)
        self._label_of = label_of

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        height, width = int(info["height"]), int(info["width"])
        with Image.open(self.images_dir / info["file_name"]) as pil:
            image = image_to_tensor(pil)
        if tuple(image.shape[1:]) != (height, width):
            raise ValueError(
                f"image {info['file_name']} is {tuple(image.shape[1:])}, "
                f"the COCO file says {(height, width)}"
            )
        anns = self._annotations[int(info["id"])]
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        labels = np.zeros((len(anns),), dtype=np.int64)
        for k, ann in enumerate(anns):
            masks[k] = _decode_segmentation(ann["segmentation"], height, width)
            x, y, w, h = ann["bbox"]
            boxes[k] = (x, y, x + w, y + h)
            labels[k] = self._label_of[int(ann["category_id"])]
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
            "image_id": torch.tensor(int(info["id"])),
        }
        return image, target


def collate_detection(batch: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Detection batches are lists: images differ in size and targets in length."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A loader with a seeded shuffle, so training runs are reproducible."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=collate_detection,
    )


# ----------------------------------------------------------------------------------------------
# training and checkpoints


def make_optimizer(
    model: nn.Module, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """SGD with momentum, as torchvision's detection recipes use."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def train_steps(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
    optimizer: torch.optim.Optimizer,
    n: int,
    *,
    start_step: int = 0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 10.0,
) -> list[dict[str, float]]:
    """Run ``n`` optimisation steps, cycling through ``loader``; return each step's losses.

    ``start_step`` is the global step count so far (from a checkpoint): the linear learning-rate
    warm-up over the first ``warmup_steps`` steps then continues where it stopped. Training from
    scratch with SGD diverges without a warm-up or gradient clipping, hence both.
    """
    if n < 0 or start_step < 0 or warmup_steps < 0:
        raise ValueError(
            f"n, start_step and warmup_steps must be >= 0, got {n, start_step, warmup_steps}"
        )
    device = _model_device(model)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    model.train()
    history: list[dict[str, float]] = []
    batches = iter(loader)
    for i in range(n):
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            try:
                images, targets = next(batches)
            except StopIteration:
                raise ValueError("the loader yields no batches") from None
        step = start_step + i
        factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        losses = model([im.to(device) for im in images], [_to_device(t, device) for t in targets])
        total = sum(losses.values())
        if not torch.isfinite(total):
            values = {k: v.item() for k, v in losses.items()}
            raise FloatingPointError(f"non-finite loss at step {step}: {values}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        history.append({"loss": total.item(), **{k: v.item() for k, v in losses.items()}})
    return history


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    config: ModelConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model, optimizer state, step and config; atomically (a crash leaves the old file).

    ``extra`` holds plain values (numbers, strings, lists, dicts) the writer needs back, e.g. how
    a training run was initialised and its loss so far, so that a resumed or re-run job reports
    what the interrupted one did instead of losing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on ``device``) and what resuming needs."""

    model: MaskScoringRCNN
    config: ModelConfig
    step: int
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)

    def make_optimizer(self, **kwargs: Any) -> torch.optim.Optimizer:
        """An optimizer for ``model`` restored to the saved state (learning rate included)."""
        optimizer = make_optimizer(self.model, **kwargs)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer


_REQUIRED_KEYS = ("config", "step", "model")


def _state_problem(expected: dict[str, torch.Tensor], state: Any) -> str | None:
    """What keeps ``state`` from loading into a model whose state is ``expected``, in a line
    (``load_state_dict`` would say it in a page), or None."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "its 'model' entry is not a dictionary of tensors"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        k for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k!r} is {list(state[k].shape)} "
            f"where {list(expected[k].shape)} is needed"
        )
    return "; ".join(parts) or None


def load_checkpoint(
    path: str | Path, *, device: torch.device | str | None = None, name: str | None = None
) -> Checkpoint:
    """Rebuild the model from a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)``: a checkpoint is data, it never runs code. Checkpoints
    may come from a requester, so every way a file can fail to be one ends in a ``ValueError``
    that says which file and why, never in a pickling or tensor-shape error from deep in torch.
    ``name`` is how errors call the file (default: its path; a job that downloaded it to a
    temporary file names what the requester gave instead).
    """
    path = Path(path)
    label = name if name is not None else str(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {label} does not exist")
    expected = f"a maskmill checkpoint ({CHECKPOINT_FORMAT}, as a training round writes it)"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for foreign files
        raise ValueError(
            f"{label} is not {expected}: torch.load cannot read it as plain data (it is damaged, "
            "not a torch file, or holds pickled Python objects, which are never loaded; "
            f"{type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{label} is not {expected}")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing or not isinstance(payload["config"], dict):
        raise ValueError(f"{label} is a damaged maskmill checkpoint: missing or bad {missing}")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label} has an invalid model configuration: {exc}") from exc
    model = build_model(config)
    problem = _state_problem(model.state_dict(), payload["model"])
    if problem:
        raise ValueError(f"{label}: its weights do not fit its own configuration ({problem})")
    model.load_state_dict(payload["model"])
    model.to(default_device() if device is None else torch.device(device))
    model.eval()
    extra = payload.get("extra")
    return Checkpoint(
        model=model,
        config=config,
        step=int(payload["step"]),
        optimizer_state=payload.get("optimizer"),
        extra=dict(extra) if isinstance(extra, dict) else {},
    )


# ----------------------------------------------------------------------------------------------
# inference and evaluation


def predict(
    model: MaskScoringRCNN,
    images: Sequence[Any],
    *,
    batch_size: int = 4,
) -> list[dict[str, np.ndarray]]:
    """Detect on images (PIL, ``H x W x 3`` uint8 arrays or ``[3, H, W]`` tensors).

    One dict per image with numpy arrays: ``boxes`` ``[N, 4]`` xyxy, ``labels`` (model labels,
    1-based), ``scores`` (= ``mask_iou * class_conf``), ``mask_iou``, ``class_conf``, ``masks``
    (bool ``[N, H, W]``, probability >= 0.5) and ``features`` ``[N, D]``; sorted by score, all
    with score > ``score_threshold`` and box area >= ``min_box_area``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    results: list[dict[str, np.ndarray]] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = [
                    image_to_tensor(im).to(device) for im in images[start : start + batch_size]
                ]
                for det in model(batch):
                    results.append(
                        {
                            "boxes": det["boxes"].float().cpu().numpy(),
                            "labels": det["labels"].cpu().numpy().astype(np.int64),
                            "scores": det["scores"].float().cpu().numpy(),
                            "mask_iou": det["mask_iou"].float().cpu().numpy(),
                            "class_conf": det["class_conf"].float().cpu().numpy(),
                            "masks": (det["masks"][:, 0] >= MASK_THRESHOLD).cpu().numpy(),
                            "features": det["features"].float().cpu().numpy(),
                        }
                    )
    finally:
        model.train(was_training)
    return results


def to_coco_results(
    predictions: Sequence[dict[str, np.ndarray]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    *,
    with_features: bool = True,
) -> list[dict[str, Any]]:
    """COCO results (``image_id, category_id, segmentation`` RLE, ``bbox``, ``score``, plus
    ``mask_iou``, ``class_conf`` and ``feature``): the format ``POST .../predictions`` takes."""
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    out: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        masks = pred["masks"]
        if masks.shape[0] == 0:
            continue
        labels = pred["labels"]
        if labels.min() < 1 or labels.max() > len(category_ids):
            raise ValueError(f"labels {labels.tolist()} outside 1..{len(category_ids)}")
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for k, rle in enumerate(rles):
            x0, y0, x1, y1 = (float(v) for v in pred["boxes"][k])
            item: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(labels[k]) - 1]),
                "segmentation": {
                    "size": list(rle["size"]),
                    "counts": rle["counts"].decode("ascii"),
                },
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": float(pred["scores"][k]),
                "mask_iou": float(pred["mask_iou"][k]),
                "class_conf": float(pred["class_conf"][k]),
            }
            if with_features:
                item["feature"] = [float(v) for v in pred["features"][k]]
            out.append(item)
    return out


def evaluate_mask_ap(
    model: MaskScoringRCNN,
    coco_gt_path: str | Path,
    images_dir: str | Path,
    *,
    batch_size: int = 4,
) -> float:
    """COCO mask AP (IoU 0.50:0.95) of the model's filtered output on a held-out COCO file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress
    with quiet:
        gt = COCO(str(coco_gt_path))
    if not gt.dataset.get("annotations"):
        raise ValueError(
            f"{coco_gt_path} has no annotations: evaluate against the ground-truth file"
        )
    image_ids = sorted(gt.getImgIds())
    results: list[dict[str, Any]] = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start : start + batch_size]
        images = []
        for info in gt.loadImgs(ids):
            with Image.open(Path(images_dir) / info["file_name"]) as pil:
                images.append(image_to_tensor(pil))
        preds = predict(model, images, batch_size=batch_size)
        results += to_coco_results(preds, ids, model.config.category_ids, with_features=False)
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])
