"""Tests of the pages, the overlays and the browser flow, plus the rows they share.

:func:`seed_project` writes a small, complete project straight into the database and storage: PNG
images under the image root, one class tree (a real tree file written with the treefile API) with a
candidate root cluster, hidden gold and a qualification pool, and an API key. Each test module has
its own database, so each seeds its own project.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from pycocotools import mask as mask_utils
from sqlalchemy.orm import Session

from service.auth import create_api_key
from service.engine.tree import build_tree
from service.engine.treefile import TreeFile, write_tree_file
from service.models import (
    Backend,
    Cluster,
    ClusterState,
    GoldItem,
    Image,
    Project,
    ProjectClass,
    Round,
    RoundStatus,
    Tree,
    Worker,
)
from service.settings import Settings
from service.storage import Storage

IMAGE_SIZE = (160, 120)  # width, height


def rect_rle(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = IMAGE_SIZE) -> dict:
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def write_png(path: Path, index: int, size: tuple[int, int] = IMAGE_SIZE) -> None:
    """A picture with a box on a plain background (distinct colours per image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(index)
    picture = PILImage.new("RGB", size, tuple(int(v) for v in rng.integers(90, 200, 3)))
    ImageDraw.Draw(picture).rectangle((40, 30, 100, 80), fill=(30, 60, 160))
    picture.save(path)


@dataclass
class Seeded:
    project_id: int
    class_id: int
    headers: dict[str, str]
    image_ids: list[int]
    tree_id: int
    tree_key: str
    cluster_id: int
    mask_count: int
    gold_ids: list[int] = field(default_factory=list)
    qualification_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def seed_project(
    session: Session,
    storage: Storage,
    settings: Settings,
    *,
    masks: int = 24,
    gold: int = 6,
    qualification: int = 10,
    class_name: str = "box",
) -> Seeded:
    """A ready-to-verify project; everything committed."""
    key, plaintext = create_api_key(session, "pages-tests")
    project = Project(name="pages", api_key_id=key.id, params={})
    project.classes = [ProjectClass(name=class_name)]
    session.add(project)
    session.flush()
    class_id = project.classes[0].id

    image_rows = []
    for index in range(4):
        path = Path(settings.image_root) / f"p{project.id}" / f"img{index}.png"
        write_png(path, index)
        image_rows.append(
            Image(
                project_id=project.id,
                file_name=f"img{index}.png",
                uri=f"file://{path.resolve()}",
                width=IMAGE_SIZE[0],
                height=IMAGE_SIZE[1],
            )
        )
    session.add_all(image_rows)
    session.flush()
    image_ids = [row.id for row in image_rows]

    # Masks: boxes around the drawn box, a few pixels off each, on the four images in turn.
    rng = np.random.default_rng(1)
    jitter = rng.integers(-6, 7, size=(masks, 4))
    rles = [rect_rle(40 + a, 30 + b, 101 + c, 81 + d) for a, b, c, d in jitter.tolist()]
    mask_images = np.array([image_ids[i % len(image_ids)] for i in range(masks)], dtype=np.int64)
    scores = np.round(rng.uniform(0.75, 0.99, masks), 4)
    features = jitter.astype(np.float32)
    tree_file = TreeFile.from_tree(
        build_tree(features, scores),
        rles=rles,
        image_ids=mask_images,
        mask_ids=np.arange(masks, dtype=np.int64),
        scores=scores,
        class_id=class_id,
        class_name=class_name,
        features=features,
    )
    tree_key = f"projects/{project.id}/rounds/1/trees/class-{class_id}.npz"
    with storage.open_write(tree_key) as handle:
        write_tree_file(handle, tree_file)
    round_row = Round(project_id=project.id, number=1, status=RoundStatus.READY)
    session.add(round_row)
    session.flush()
    tree_row = Tree(
        project_id=project.id,
        round_id=round_row.id,
        class_id=class_id,
        uri=storage.uri(tree_key),
        mask_count=masks,
    )
    session.add(tree_row)
    session.flush()
    root = Cluster(
        project_id=project.id,
        tree_id=tree_row.id,
        node=2 * masks - 2,
        lo=0,
        hi=masks,
        size=masks,
        score=float(scores.mean()),
        state=ClusterState.CANDIDATE,
        yes_count=0,
        no_count=0,
    )
    session.add(root)

    def gold_item(index: int, for_qualification: bool) -> GoldItem:
        good = index % 2 == 0
        rle = rect_rle(40, 30, 101, 81) if good else rect_rle(5, 5, 45, 40)
        return GoldItem(
            project_id=project.id,
            image_id=image_ids[index % len(image_ids)],
            class_id=class_id,
            rle=rle,
            iou=1.0 if good else 0.0,
            expected=good,
            for_qualification=for_qualification,
        )

    gold_rows = [gold_item(i, False) for i in range(gold)]
    qualification_rows = [gold_item(i, True) for i in range(qualification)]
    session.add_all(gold_rows + qualification_rows)
    session.commit()
    return Seeded(
        project_id=project.id,
        class_id=class_id,
        headers={"Authorization": f"Bearer {plaintext}"},
        image_ids=image_ids,
        tree_id=tree_row.id,
        tree_key=tree_key,
        cluster_id=root.id,
        mask_count=masks,
        gold_ids=[row.id for row in gold_rows],
        qualification_ids=[row.id for row in qualification_rows],
    )


def add_worker(
    session: Session, project_id: int, *, qualified: bool = False, blocked_reason: str | None = None
) -> tuple[Worker, str]:
    """A local worker row and its plaintext invite token (as the invite endpoint would make)."""
    token = secrets.token_urlsafe(24)
    worker = Worker(
        backend=Backend.LOCAL,
        external_id=secrets.token_hex(8),
        project_id=project_id,
        token_hash=hashlib.sha256(token.encode()).hexdigest(),
        qualified=qualified,
        blocked=blocked_reason is not None,
        blocked_reason=blocked_reason,
    )
    session.add(worker)
    session.commit()
    return worker, token
