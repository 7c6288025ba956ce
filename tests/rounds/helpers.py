"""Shared by the round tests: a tiny detector configuration and a project built through the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SIZE = 64
CLASSES = ["disc", "square"]
#: A detector small enough to train a few steps in seconds. ``score_threshold`` 0 lets an
#: untrained model's boxes through, so detect and cluster have masks to work on.
TINY_MODEL: dict[str, Any] = {
    "min_size": SIZE,
    "max_size": SIZE,
    "anchor_sizes": [4, 8, 16, 32, 64],
    "fpn_channels": 16,
    "box_head_dim": 32,
    "box_batch_size_per_image": 16,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "detections_per_img": 6,
    "score_threshold": 0.0,
    "min_box_area": 0.0,
    "iou_head_channels": 8,
    "iou_head_fc_dim": 16,
    "feature_dim": 8,
}


def make_project(
    client, headers, files: dict[str, Path], *, splits=("seed", "heldout", "pool"), gt=True
) -> int:
    """A project with the synthetic images registered and (optionally) its ground truth."""
    created = client.post(
        "/api/v1/projects",
        json={"name": "rounds", "classes": CLASSES, "params": {"n_s": 3, "k_pa": 0.0}},
        headers=headers,
    )
    pid = created.get_json()["id"]
    entries = [
        {
            "file_name": image["file_name"],
            "uri": f"syn/images/{image['file_name']}",
            "width": image["width"],
            "height": image["height"],
        }
        for split in splits
        for image in json.loads(files[split].read_text())["images"]
    ]
    assert (
        client.post(
            f"/api/v1/projects/{pid}/images", json={"images": entries}, headers=headers
        ).status_code
        == 201
    )
    if gt:
        for split in ("seed", "heldout"):
            if split in splits:
                response = client.post(
                    f"/api/v1/projects/{pid}/ground-truth?split={split}",
                    json=json.loads(files[split].read_text()),
                    headers=headers,
                )
                assert response.status_code == 201, response.get_json()
    return pid


def project_with_round(
    app, files: dict[str, Path], key_name: str, status: Any, *, splits=("seed", "pool")
) -> tuple[int, int, dict[str, str]]:
    """A new requester key, a project built through the API (:func:`make_project`) and its round
    1 stored in ``status``: ``(project id, round id, the key's headers)``."""
    from service.db import get_database
    from service.models import Round
    from tests.helpers import new_key

    with get_database(app).session() as session:
        _, headers = new_key(session, key_name)
        pid = make_project(app.test_client(), headers, files, splits=splits)
        rnd = Round(project_id=pid, number=1, status=status)
        session.add(rnd)
        session.commit()
        return pid, rnd.id, headers


def start_round(client, headers, pid: int, **extra: Any) -> dict:
    body = {"detect": True, "steps": 2, "checkpoint_every": 1, "model": TINY_MODEL, **extra}
    response = client.post(f"/api/v1/projects/{pid}/rounds", json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def round_status(client, headers, pid: int, number: int) -> dict:
    response = client.get(f"/api/v1/projects/{pid}/rounds/{number}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()
