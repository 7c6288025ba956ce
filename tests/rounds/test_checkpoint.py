"""``POST /rounds`` with ``checkpoint``: a requester's own weights instead of training.

The service checks where the file is (an object of the project in storage, or a file under the
image root) and that it exists; anything else is a 422 naming the field, with nothing enqueued.
The train stage judges the content: a usable checkpoint becomes the round's model (its labels
mapped onto the project's classes) and detection runs with it; anything else fails the round with
an error that says what is wrong with the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from service import jobs
from service.db import get_database
from service.models import Job, Round
from service.storage import open_storage
from tests.helpers import new_key
from tests.rounds.helpers import TINY_MODEL, make_project, round_status
from workers import model as mm
from workers import train as train_job


@pytest.fixture(scope="module")
def requester(local_app) -> dict[str, str]:
    with get_database(local_app).session() as session:
        _, headers = new_key(session, "checkpoint")
    return headers


def save_tiny_checkpoint(path: Path, category_ids: tuple[int, ...]) -> Path:
    """A maskmill checkpoint trained elsewhere: its category ids are not the project's."""
    config = mm.ModelConfig.from_dict(
        {**TINY_MODEL, "num_classes": len(category_ids), "category_ids": list(category_ids)}
    )
    return mm.save_checkpoint(path, mm.build_model(config), None, 7, config)


def post_round(client, headers, pid: int, body: dict[str, Any]):
    return client.post(f"/api/v1/projects/{pid}/rounds", json=body, headers=headers)


def _detect_with_given_weights(
    app, headers, pid: int, image_root: str, name: str, category_ids: tuple[int, ...]
) -> dict[str, Any]:
    """Round 1 of ``pid`` started from a checkpoint saved as ``models/<name>`` under the image
    root: its status once trained, detected and clustered (asserted ready)."""
    root = Path(image_root)
    (root / "models").mkdir(exist_ok=True)
    save_tiny_checkpoint(root / "models" / name, category_ids)
    client = app.test_client()
    response = post_round(client, headers, pid, {"detect": True, "checkpoint": f"models/{name}"})
    assert response.status_code == 202, response.get_json()
    _wait_round(app, pid, 1, ("round", "train", "detect", "cluster"))
    ready = round_status(client, headers, pid, 1)
    assert ready["status"] == "ready", ready
    return ready


def _wait_round(app, pid: int, number: int, stages: tuple[str, ...]) -> None:
    """Wait for the stages in pipeline order (each is dispatched by the one before it)."""
    runner = jobs.dispatcher_for(app.extensions["maskmill.settings"])
    for stage in stages:
        shard = "-s0" if stage == "detect" else ""
        runner.wait(f"{stage}-p{pid}-r{number}{shard}", timeout=120)


def test_bad_checkpoints_are_refused_and_nothing_is_enqueued(
    local_app, synthetic_data, fast, requester
):
    client = local_app.test_client()
    pid = make_project(client, requester, synthetic_data, splits=("seed", "pool"))
    other = make_project(client, requester, synthetic_data, splits=("seed", "pool"))
    root = Path(fast.image_root)
    (root / "models").mkdir(exist_ok=True)
    storage = open_storage(fast.storage_url)
    storage.put_bytes(f"projects/{other}/rounds/1/model.pt", b"another project's weights")
    outside = root.parent / "outside.pt"
    outside.write_bytes(b"weights outside the image root")

    for body, named in [
        ({"detect": True, "checkpoint": "models/missing.pt"}, "checkpoint"),
        ({"detect": True, "checkpoint": "models"}, "checkpoint"),  # a directory
        ({"detect": True, "checkpoint": str(outside)}, "checkpoint"),
        ({"detect": True, "checkpoint": "../outside.pt"}, "checkpoint"),
        ({"detect": True, "checkpoint": "file:///etc/passwd"}, "checkpoint"),
        ({"detect": True, "checkpoint": "https://example.com/model.pt"}, "checkpoint"),
        ({"detect": True, "checkpoint": f"projects/{other}/rounds/1/model.pt"}, "checkpoint"),
        ({"detect": True, "checkpoint": f"projects/{pid}/rounds/9/model.pt"}, "checkpoint"),
        ({"detect": True, "checkpoint": ""}, "checkpoint"),
        ({"detect": True, "checkpoint": 3}, "checkpoint"),
    ]:
        response = post_round(client, requester, pid, body)
        assert response.status_code == 422, (body, response.get_json())
        message = response.get_json()["error"]["message"]
        assert message.startswith(named), (body, message)

    save_tiny_checkpoint(root / "models" / "mine.pt", (1, 2))
    for extra, named in [
        ({"steps": 5}, "steps"),
        ({"model": {"fpn_channels": 8}}, "model"),
        ({"seed": 3, "learning_rate": 0.1}, "learning_rate, seed"),
    ]:
        body = {"detect": True, "checkpoint": "models/mine.pt", **extra}
        response = post_round(client, requester, pid, body)
        assert response.status_code == 422, body
        message = response.get_json()["error"]["message"]
        assert named in message and "checkpoint" in message, message

    with get_database(local_app).session() as session:
        for project in (pid, other):
            assert session.scalar(select(func.count()).where(Round.project_id == project)) == 0
            assert session.scalar(select(func.count()).where(Job.project_id == project)) == 0

    spec = client.get("/api/v1/openapi.json").get_json()["paths"]
    schema = spec["/api/v1/projects/{project_id}/rounds"]["post"]["requestBody"]
    assert "checkpoint" in json.dumps(schema)


def test_a_round_detects_with_the_requesters_weights(
    local_app, synthetic_data, fast, requester, monkeypatch
):
    def no_training(*args, **kwargs):
        raise AssertionError("a round with a checkpoint must not train")

    monkeypatch.setattr(mm, "train_steps", no_training)
    client = local_app.test_client()
    pid = make_project(client, requester, synthetic_data)
    classes = [
        c["id"] for c in client.get(f"/api/v1/projects/{pid}", headers=requester).json["classes"]
    ]
    root = Path(fast.image_root)
    ready = _detect_with_given_weights(
        local_app, requester, pid, fast.image_root, "elsewhere.pt", (101, 102)
    )
    assert ready["training"]["init"] == "checkpoint"
    assert ready["training"]["checkpoint"] == f"file://{root.resolve() / 'models/elsewhere.pt'}"
    assert ready["training"]["class_map"] == {"101": classes[0], "102": classes[1]}
    assert 0.0 <= ready["ap"] <= 1.0  # the given weights, evaluated on the held-out set
    assert ready["counts"]["masks"] > 0  # and used to detect

    # The round owns a copy with the project's class ids: later rounds start from it.
    storage = open_storage(fast.storage_url)
    key = storage.key_from_uri(ready["checkpoint_uri"])
    assert key == train_job.model_key(pid, 1)
    adopted = mm.load_checkpoint(storage.path(key), device="cpu")
    assert adopted.config.category_ids == tuple(classes) and adopted.step == 7

    # A storage key of the project's own objects works too (here: round 1's model).
    response = post_round(
        client, requester, pid, {"detect": False, "checkpoint": f"projects/{pid}/rounds/1/model.pt"}
    )
    assert response.status_code == 202, response.get_json()
    _wait_round(local_app, pid, 2, ("round", "train"))
    second = round_status(client, requester, pid, 2)
    assert second["status"] == "ready" and second["training"]["init"] == "checkpoint"
    assert "class_map" not in second["training"]  # already the project's ids


def test_given_weights_need_no_ground_truth(local_app, synthetic_data, fast, requester):
    """Without seed ground truth a round cannot train, but it can detect with given weights."""
    client = local_app.test_client()
    pid = make_project(client, requester, synthetic_data, splits=("pool",), gt=False)
    refused = post_round(client, requester, pid, {"detect": True})
    assert refused.status_code == 422 and "give a checkpoint" in refused.json["error"]["message"]
    ready = _detect_with_given_weights(
        local_app, requester, pid, fast.image_root, "pool-only.pt", (1, 2)
    )
    assert ready["ap"] is None and ready["counts"]["masks"] > 0  # nothing held out to score on


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"not a checkpoint at all", "is not a maskmill checkpoint"),
        ("other-format", "is not a maskmill checkpoint"),
        ("three-classes", "detects 3 classes but the project has 2"),
        ("wrong-weights", "weights do not fit its own configuration"),
    ],
)
def test_an_unusable_checkpoint_fails_the_round_with_a_clear_error(
    local_app, synthetic_data, fast, requester, content, error, tmp_path
):
    client = local_app.test_client()
    pid = make_project(client, requester, synthetic_data, splits=("seed", "pool"))
    target = Path(fast.image_root) / "models" / f"bad-{pid}.pt"
    target.parent.mkdir(exist_ok=True)
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif content == "other-format":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, target)
    elif content == "three-classes":
        save_tiny_checkpoint(target, (1, 2, 3))
    else:
        path = save_tiny_checkpoint(tmp_path / "ok.pt", (1, 2))
        payload = torch.load(path, weights_only=True)
        payload["model"] = {k: v[..., :1] if v.dim() else v for k, v in payload["model"].items()}
        torch.save(payload, target)

    response = post_round(client, requester, pid, {"detect": True, "checkpoint": target.name})
    assert response.status_code == 422  # a bare name is relative to the image root, not models/
    response = post_round(
        client, requester, pid, {"detect": True, "checkpoint": f"models/{target.name}"}
    )
    assert response.status_code == 202, response.get_json()
    _wait_round(local_app, pid, 1, ("round", "train"))
    failed = round_status(client, requester, pid, 1)
    assert failed["status"] == "failed"
    assert error in failed["error"] and f"models/{target.name}" in failed["error"]
    assert "/tmp/maskmill-" not in failed["error"]  # names the requester's file, not a temp copy
    train = next(j for j in failed["jobs"] if j["id"] == f"train-p{pid}-r1")
    assert train["attempts"] == 1  # a bad file is not worth retrying
