"""Training rounds: the rounds endpoint, the train → detect → cluster pipeline on real PostgreSQL with a
real Redis and RQ worker, failures and retries, resumable training, detect shards, seed selection.

Everything runs on tiny synthetic data (64 px images) and a tiny detector, so a round takes seconds;
what is checked is the plumbing (jobs, statuses, storage, counts), not the model's accuracy.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from redis import Redis
from rq import Queue, SimpleWorker
from sqlalchemy import select

from service import jobs
from service.app import create_app
from service.coco import rle_for_pycocotools
from service.db import get_database
from service.export import AcceptedMask, accepted_masks, one_mask_per_object
from service.jobs import TransientJobError, job_context_for_tests
from service.models import Cluster, ClusterState, Image, Job, JobStatus, Round, RoundStatus
from service.render import open_image
from service.storage import open_storage
from tests.data_factory import rect_mask, rle
from tests.helpers import new_key
from tests.rounds.helpers import (
    SIZE,
    TINY_MODEL,
    make_project,
    project_with_round,
    round_status,
    start_round,
)
from workers import model as mm
from workers import rounds as rounds_job
from workers import seed_select
from workers import train as train_job
from workers.detect import (
    detection_images,
    drop_accepted_duplicates,
    finish_round,
    shard_key,
)

# ------------------------------------------------------------------------------ RQ pipeline


@pytest.fixture()
def rq_app(fast, redis_server, monkeypatch) -> Iterator[Any]:
    """An app enqueueing on a real Redis; the RQ worker (this process) reads the same settings
    from the environment, as a worker machine would."""
    connection = Redis.from_url(redis_server.url)
    connection.flushall()
    connection.close()
    rq_settings = fast.replace(redis_url=redis_server.url)
    for name, value in {
        "MASKMILL_DATABASE_URL": rq_settings.database_url,
        "MASKMILL_REDIS_URL": rq_settings.redis_url,
        "MASKMILL_STORAGE_URL": rq_settings.storage_url,
        "MASKMILL_IMAGE_ROOT": rq_settings.image_root,
        "MASKMILL_JOB_RETRY_DELAYS": "0,0",
    }.items():
        monkeypatch.setenv(name, value)
    application = create_app(rq_settings)
    yield application
    get_database(application).dispose()


def work(redis_url: str) -> None:
    connection = Redis.from_url(redis_url)
    queues = [Queue(name, connection=connection) for name in jobs.QUEUES]
    # SimpleWorker runs jobs in this process: monkeypatches apply, and stage jobs enqueued by
    # earlier stages are picked up in the same burst.
    SimpleWorker(queues, connection=connection).work(burst=True)
    connection.close()


def test_round_end_to_end_on_rq(rq_app, synthetic_data, fast, tmp_path):
    client = rq_app.test_client()
    with get_database(rq_app).session() as session:
        _, headers = new_key(session, "rq")
    pid = make_project(client, headers, synthetic_data)
    started = start_round(client, headers, pid, shards=2)
    assert started["job_id"] == f"round-p{pid}-r1" and started["round"] == 1
    pending = round_status(client, headers, pid, 1)
    assert pending["status"] == "pending"
    assert [j["id"] for j in pending["jobs"]] == [f"round-p{pid}-r1"]
    # A second round while this one is not done is refused, and nothing new is queued.
    again = client.post(f"/api/v1/projects/{pid}/rounds", json={"detect": True}, headers=headers)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "conflict"
    assert "round 1" in again.get_json()["error"]["message"]

    work(rq_app.extensions["maskmill.settings"].redis_url)

    done = round_status(client, headers, pid, 1)
    assert done["status"] == "ready", done
    assert [j["id"] for j in done["jobs"]] == [
        f"round-p{pid}-r1",
        f"train-p{pid}-r1",
        f"detect-p{pid}-r1-s0",
        f"detect-p{pid}-r1-s1",
        f"cluster-p{pid}-r1",
    ]
    assert all(j["status"] == "finished" and j["attempts"] == 1 for j in done["jobs"])
    assert 0.0 <= done["ap"] <= 1.0
    assert done["training"]["seed_masks"] > 0 and done["training"]["init"] == "scratch"
    assert done["training"]["steps"] == 2  # the request's options reached the train job
    storage = open_storage(fast.storage_url)
    assert storage.exists(storage.key_from_uri(done["checkpoint_uri"]))

    # The cluster stage clustered exactly what the shards detected on pool images.
    job = client.get(f"/api/v1/jobs/cluster-p{pid}-r1", headers=headers).get_json()
    clustered = job["progress"]["result"]
    shard_masks = [
        client.get(f"/api/v1/jobs/detect-p{pid}-r1-s{k}", headers=headers).get_json()["progress"][
            "result"
        ]["masks"]
        for k in range(2)
    ]
    assert clustered["predictions"] == sum(shard_masks) > 0
    assert done["counts"]["masks"] == clustered["masks"] > 0
    assert done["counts"]["trees"] == clustered["trees"] >= 1
    assert clustered["gold_items"] > 0  # held-out predictions became gold
    assert sum(done["counts"]["clusters"].values()) == clustered["clusters"]

    listed = client.get(f"/api/v1/projects/{pid}/rounds", headers=headers).get_json()["rounds"]
    assert [r["number"] for r in listed] == [1]

    # Round 2's training set: the crowd accepted a cluster; its masks join the seed masks, and
    # the other detections on their images are painted over.
    check_next_training_set(fast, pid, tmp_path)


def check_next_training_set(settings, pid: int, tmp_path: Path) -> None:
    with job_context_for_tests(settings) as ctx, ctx.database.session() as session:
        cluster = session.scalars(
            select(Cluster).where(Cluster.project_id == pid).order_by(Cluster.size.desc())
        ).first()
        cluster.state = ClusterState.ACCEPTED
        next_round = Round(project_id=pid, number=2, status=RoundStatus.TRAINING)
        session.add(next_round)
        session.commit()
        info = train_job.round_info(session, next_round.id)
        accepted = accepted_masks(session, ctx.storage, pid)
        data = train_job.gather_training_data(ctx, info, tmp_path)
        mask = accepted[0]
        image = session.get(Image, mask.image_id)
        original = np.asarray(open_image(image.uri, settings, ctx.storage).convert("RGB"))
    assert data.accepted_masks == len(one_mask_per_object(accepted)) > 0
    assert data.train.annotations == data.seed_masks + data.accepted_masks
    assert data.painted_images > 0
    names = {i["id"]: i["file_name"] for i in json.loads(data.train.path.read_text())["images"]}
    with PILImage.open(data.images_dir / names[mask.image_id]) as picture:
        painted = np.asarray(picture.convert("RGB"))
    inside = mask_utils.decode(rle_for_pycocotools(mask.rle)).astype(bool)
    assert np.array_equal(painted[inside], original[inside])  # the annotated object is intact
    assert (painted != original).any()  # other detections were painted over


def test_paint_over_fills_with_the_median_of_the_rest():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:, 2:] = 200
    region = np.zeros((4, 4), dtype=bool)
    region[0, 0] = region[1, 0] = True
    out = train_job.paint_over(image, region)
    assert out[0, 0].tolist() == [200, 200, 200]  # 8 of the 14 other pixels are 200
    assert np.array_equal(out[~region], image[~region])
    with pytest.raises(ValueError, match="does not fit"):
        train_job.paint_over(image, region[:3])


def _start_round_on_rq(rq_app, synthetic_data, key_name: str) -> tuple[Any, dict, int]:
    """A new project's first round (no detection), run by an RQ worker until nothing is left."""
    client = rq_app.test_client()
    with get_database(rq_app).session() as session:
        _, headers = new_key(session, key_name)
    pid = make_project(client, headers, synthetic_data, splits=("seed", "pool"))
    start_round(client, headers, pid)
    work(rq_app.extensions["maskmill.settings"].redis_url)
    return client, headers, pid


def test_failing_stage_is_retried_then_reported(rq_app, synthetic_data, monkeypatch):
    calls = []

    def broken_train(ctx, **kwargs):
        calls.append(kwargs["round_id"])
        raise TransientJobError("GPU fell off the bus")

    monkeypatch.setattr(train_job, "train", broken_train)
    client, headers, pid = _start_round_on_rq(rq_app, synthetic_data, "rq-fail")

    assert len(calls) == 3  # the first try and the two retries of MASKMILL_JOB_RETRY_DELAYS
    job = client.get(f"/api/v1/jobs/train-p{pid}-r1", headers=headers).get_json()
    assert job["status"] == "failed" and job["attempts"] == 3
    assert "GPU fell off the bus" in job["error"]
    failed = round_status(client, headers, pid, 1)
    assert failed["status"] == "failed" and "GPU fell off the bus" in failed["error"]
    # A failed round does not block a new one.
    assert (
        client.post(
            f"/api/v1/projects/{pid}/rounds", json={"detect": False}, headers=headers
        ).status_code
        == 202
    )


def test_the_round_fails_with_the_last_attempt_rq_makes(rq_app, synthetic_data, monkeypatch):
    """The entry job's retries were fixed by the app that enqueued it (two); the worker's own
    settings say four. The round must fail when RQ's last attempt fails, not wait for retries
    that never come."""
    monkeypatch.setenv("MASKMILL_JOB_RETRY_DELAYS", "0,0,0,0")  # the worker machine's settings
    calls = []

    def unreachable_queue(*args, **kwargs):
        calls.append(1)
        raise TransientJobError("Redis is restarting")

    monkeypatch.setattr(rounds_job, "_enqueue_once", unreachable_queue)
    _, _, pid = _start_round_on_rq(rq_app, synthetic_data, "rq-last")

    assert len(calls) == 3  # RQ's count: the first try and the app's two retries
    with get_database(rq_app).session() as session:
        stored = session.scalar(select(Round.status).where(Round.project_id == pid))
    assert stored is RoundStatus.FAILED


# --------------------------------------------------------------------------- in-process runs


def _wait(app, job_id: str) -> None:
    jobs.dispatcher_for(app.extensions["maskmill.settings"]).wait(job_id, timeout=120)


def test_non_transient_failure_fails_the_round_at_once(local_app, synthetic_data, monkeypatch):
    def broken_train(ctx, **kwargs):
        raise ValueError("seed mask 3 has no pixels")

    monkeypatch.setattr(train_job, "train", broken_train)
    client = local_app.test_client()
    with get_database(local_app).session() as session:
        _, headers = new_key(session, "local-fail")
    pid = make_project(client, headers, synthetic_data, splits=("seed", "pool"))
    start_round(client, headers, pid)
    _wait(local_app, f"round-p{pid}-r1")
    _wait(local_app, f"train-p{pid}-r1")
    failed = round_status(client, headers, pid, 1)
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: seed mask 3 has no pixels"
    train = next(j for j in failed["jobs"] if j["id"] == f"train-p{pid}-r1")
    assert train["attempts"] == 1  # not worth retrying
    with get_database(local_app).session() as session:
        assert session.scalar(select(Round.status).where(Round.project_id == pid)) is (
            RoundStatus.FAILED
        )


def test_a_retried_stage_dispatches_a_next_stage_that_was_recorded_but_never_sent(
    local_app, synthetic_data, fast
):
    """The entry job died between recording the train job and handing it to the runner; its retry
    finds the row and must send it, or the round would wait forever."""
    client = local_app.test_client()
    pid, round_id, headers = project_with_round(
        local_app, synthetic_data, "lost-dispatch", RoundStatus.PENDING
    )
    with get_database(local_app).session() as session:
        options = {"steps": 1, "model": TINY_MODEL, "seed": 0}
        session.add(
            Job(
                id=f"train-p{pid}-r1",
                func_name="workers.rounds.train_stage",
                queue="gpu",
                kwargs={
                    "round_id": round_id,
                    "detect": False,
                    "shards": 1,
                    "max_image_id": 0,
                    "train_options": options,
                    "detect_options": {},
                },
                project_id=pid,
                status=JobStatus.QUEUED,
            )
        )
        session.commit()
    with job_context_for_tests(fast) as ctx:
        rounds_job.run_round(ctx, round_id=round_id, detect=False, train_options=options)
    _wait(local_app, f"train-p{pid}-r1")
    ready = round_status(client, headers, pid, 1)
    assert ready["status"] == "ready" and ready["checkpoint_uri"], ready
    with job_context_for_tests(fast) as ctx:  # sent once: a second retry finds it finished
        rounds_job.run_round(ctx, round_id=round_id, detect=False, train_options=options)
    train = next(j for j in round_status(client, headers, pid, 1)["jobs"] if "train" in j["id"])
    assert train["status"] == "finished" and train["attempts"] == 1


def test_train_only_round_and_effective_failure(local_app, synthetic_data):
    """``detect: false`` trains and stops; a round whose job died without marking it still reads
    as failed."""
    client = local_app.test_client()
    with get_database(local_app).session() as session:
        _, headers = new_key(session, "train-only")
    pid = make_project(client, headers, synthetic_data, splits=("seed", "heldout"))
    start_round(client, headers, pid, detect=False, steps=1)
    _wait(local_app, f"round-p{pid}-r1")
    _wait(local_app, f"train-p{pid}-r1")
    ready = round_status(client, headers, pid, 1)
    assert ready["status"] == "ready" and ready["checkpoint_uri"]
    assert [j["id"] for j in ready["jobs"]] == [f"round-p{pid}-r1", f"train-p{pid}-r1"]

    with get_database(local_app).session() as session:
        session.add(Round(project_id=pid, number=2, status=RoundStatus.TRAINING))
        session.add(
            Job(
                id=f"train-p{pid}-r2",
                func_name="workers.rounds.train_stage",
                queue="gpu",
                kwargs={},
                project_id=pid,
                status=JobStatus.FAILED,
                error="WorkHorseKilled: out of memory",
            )
        )
        session.commit()
    died = round_status(client, headers, pid, 2)
    assert died["status"] == "failed" and died["error"] == "WorkHorseKilled: out of memory"


# ---------------------------------------------------------------------------------- training


def test_train_resumes_from_its_checkpoint(local_app, synthetic_data, fast, monkeypatch):
    client = local_app.test_client()
    pid, round_id, headers = project_with_round(
        local_app, synthetic_data, "resume", RoundStatus.TRAINING, splits=("seed",)
    )

    real = mm.train_steps
    starts: list[int] = []

    def crash_after_first_checkpoint(model, loader, optimizer, n, *, start_step=0, **kw):
        starts.append(start_step)
        if start_step >= 2 and len(starts) == 2:
            raise TransientJobError("worker preempted")
        return real(model, loader, optimizer, n, start_step=start_step, **kw)

    monkeypatch.setattr(mm, "train_steps", crash_after_first_checkpoint)
    options = {"steps": 4, "checkpoint_every": 2, "model": TINY_MODEL}
    with job_context_for_tests(fast) as ctx, pytest.raises(TransientJobError):
        train_job.train(ctx, round_id=round_id, **options)
    storage = open_storage(fast.storage_url)
    assert storage.exists(train_job.resume_key(pid, 1))  # step 2 is in storage

    with job_context_for_tests(fast) as ctx:
        result = train_job.train(ctx, round_id=round_id, **options)
    assert starts[2:] == [2]  # the retry started at the checkpoint's step, not at 0
    # The resumed run still says what it started from (the interrupted run's state says so).
    assert result["init"] == "scratch" and result["resumed_from_step"] == 2
    assert result["ap"] is None  # no held-out set in this project
    assert not storage.exists(train_job.resume_key(pid, 1))
    checkpoint = mm.load_checkpoint(
        storage.path(train_job.model_key(pid, 1)), device="cpu"
    )  # the final weights
    assert checkpoint.step == 4
    assert checkpoint.config.category_ids == tuple(
        c["id"]
        for c in client.get(f"/api/v1/projects/{pid}", headers=headers).get_json()["classes"]
    )

    # A retry after the weights were stored does not train again.
    with job_context_for_tests(fast) as ctx:
        again = train_job.train(ctx, round_id=round_id, **options)
    assert again["reused_stored_weights"] and starts[3:] == []
    assert {k: again[k] for k in ("init", "loss", "loss_first", "lr")} == {
        k: result[k] for k in ("init", "loss", "loss_first", "lr")
    }


def test_seeded_batches_resume_exactly():
    dataset = list(range(10))

    class Items:
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int):
            return torch.zeros(1), {"i": dataset[i]}

    def take(start: int, n: int) -> list[list[int]]:
        batches = iter(train_job.SeededBatches(Items(), 4, seed=3, start_step=start))
        return [[t["i"] for t in next(batches)[1]] for _ in range(n)]

    full = take(0, 9)
    assert take(5, 4) == full[5:]  # resuming at step 5 sees the batches step 5.. would have
    epoch = full[:3]  # 10 items in batches of 4: an epoch is 3 batches, every item once
    assert sorted(i for batch in epoch for i in batch) == list(range(10))
    assert full[3:6] != epoch  # the next epoch is reshuffled


def test_default_model_config_follows_the_images():
    small = train_job.default_model_config([7, 9], [(128, 96), (128, 96), (160, 96)])
    assert small.min_size == 96 and small.max_size == 128
    assert small.anchor_sizes == (6, 12, 24, 48, 96)
    assert small.category_ids == (7, 9) and small.num_classes == 2
    large = train_job.default_model_config([1], [(1024, 800)], overrides={"min_box_area": 5.0})
    assert large.anchor_sizes == (16, 32, 64, 128, 256) and large.min_box_area == 5.0
    with pytest.raises(ValueError, match="derived from the project's classes"):
        train_job.default_model_config([1], [(64, 64)], overrides={"num_classes": 3})
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        train_job.default_model_config([1], [(64, 64)], overrides={"colour": "red"})


# ----------------------------------------------------------------------------------- detect


def test_detect_shards_cover_the_pool_exactly_once(local_app, synthetic_data):
    client = local_app.test_client()
    with get_database(local_app).session() as session:
        _, headers = new_key(session, "shards")
    pid = make_project(client, headers, synthetic_data)
    images = client.get(f"/api/v1/projects/{pid}/images", headers=headers).get_json()["images"]
    seed_names = {i["file_name"] for i in json.loads(synthetic_data["seed"].read_text())["images"]}
    wanted = {i["id"] for i in images if i["file_name"] not in seed_names}
    with get_database(local_app).session() as session:
        for n_shards in (1, 2, 3, 5, 40):
            shards = [
                [ref.id for ref in detection_images(session, pid, shard=k, n_shards=n_shards)]
                for k in range(n_shards)
            ]
            flat = [i for shard in shards for i in shard]
            assert sorted(flat) == sorted(wanted)  # every pool and held-out image, once
        snapshot = sorted(wanted)[4]
        limited = detection_images(session, pid, shard=0, n_shards=1, max_image_id=snapshot)
        assert [ref.id for ref in limited] == sorted(wanted)[:5]
        with pytest.raises(ValueError, match="shard must be an integer"):
            detection_images(session, pid, shard=3, n_shards=3)
        with pytest.raises(ValueError, match="n_shards"):
            detection_images(session, pid, shard=0, n_shards=0)
    assert shard_key(pid, 2, 3, 16).endswith("/rounds/2/detect/shard-00003-of-00016.json.gz")


def test_re_detections_of_accepted_objects_are_dropped():
    def rect(x0, y0, x1, y1):
        return rle(rect_mask(SIZE, SIZE, x0, y0, x1, y1))

    accepted = [AcceptedMask(1, 10, rect(0, 0, 20, 20), 0.9, 1, 5, 0)]
    predictions = [
        {"image_id": 1, "category_id": 10, "segmentation": rect(1, 0, 20, 21), "score": 0.8},
        {"image_id": 1, "category_id": 10, "segmentation": rect(30, 30, 50, 50), "score": 0.8},
        {"image_id": 1, "category_id": 11, "segmentation": rect(0, 0, 20, 20), "score": 0.8},
        {"image_id": 2, "category_id": 10, "segmentation": rect(0, 0, 20, 20), "score": 0.8},
    ]
    kept, dropped = drop_accepted_duplicates(predictions, accepted)
    assert dropped == 1 and kept == predictions[1:]  # same image and class, IoU 0.9: dropped
    assert drop_accepted_duplicates(predictions, []) == (predictions, 0)


def test_finish_round_refuses_missing_shards(local_app, synthetic_data, fast):
    pid, round_id, _ = project_with_round(
        local_app, synthetic_data, "missing-shards", RoundStatus.CLUSTERING
    )
    storage = open_storage(fast.storage_url)
    storage.put_bytes(shard_key(pid, 1, 1, 3), gzip.compress(b"[]"))
    with (
        job_context_for_tests(fast) as ctx,
        pytest.raises(ValueError, match=r"detect shards \[0, 2\] of 3 have not finished"),
    ):
        finish_round(ctx, round_id=round_id, n_shards=3)


# ----------------------------------------------------------------------------- 4xx answers


def test_rounds_endpoint_refusals(local_app, synthetic_data):
    client = local_app.test_client()
    with get_database(local_app).session() as session:
        _, headers = new_key(session, "refusals")
        _, stranger = new_key(session, "stranger")
    url = "/api/v1/projects/{}/rounds"

    bare = make_project(client, headers, synthetic_data, splits=("pool",), gt=False)
    response = client.post(url.format(bare), json={"detect": True}, headers=headers)
    assert response.status_code == 422
    assert "no seed ground truth" in response.get_json()["error"]["message"]

    seed_only = make_project(client, headers, synthetic_data, splits=("seed",))
    response = client.post(url.format(seed_only), json={"detect": True}, headers=headers)
    assert response.status_code == 422
    assert "no unlabelled images" in response.get_json()["error"]["message"]

    for body, field in [
        ({}, "detect"),
        ({"detect": "yes"}, "detect"),
        ({"detect": True, "steps": 0}, "steps"),
        ({"detect": True, "shards": 0}, "shards"),
        ({"detect": True, "epochs": 3}, "epochs"),
        ({"detect": True, "model": {"backbone": "vgg16"}}, "model.backbone"),
        ({"detect": True, "model": {"anchor_sizes": [4, 8]}}, "model.anchor_sizes"),
        ({"detect": True, "model": {"min_size": 256, "max_size": 128}}, "max_size"),
    ]:
        response = client.post(url.format(seed_only), json=body, headers=headers)
        assert response.status_code == 422, body
        assert field in response.get_json()["error"]["message"], (body, response.get_json())
    response = client.post(url.format(seed_only), data="detect", headers=headers)
    assert response.status_code == 415

    assert client.post(url.format(seed_only), json={"detect": True}).status_code == 401
    for method in (client.get, client.post):
        response = method(url.format(seed_only), json={"detect": False}, headers=stranger)
        assert response.status_code == 404  # another key's project looks absent
    assert client.get(url.format(seed_only) + "/1", headers=headers).status_code == 404
    assert client.get(url.format(seed_only), headers=headers).get_json() == {"rounds": []}

    spec = client.get("/api/v1/openapi.json").get_json()["paths"]
    assert "detect" in json.dumps(spec["/api/v1/projects/{project_id}/rounds"]["post"])


def test_model_options_mirror_the_model_config():
    from service.api.rounds import ModelOptions

    known = {f for f in mm.ModelConfig.__dataclass_fields__}
    assert set(ModelOptions.model_fields) <= known - {"num_classes", "category_ids", "seed"}


def test_service_never_imports_torch():
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.jobs import resolve\n"
        "create_app({'database_url': 'sqlite://'})\n"
        "resolve('workers.rounds.run_round')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ seed selection


def _is_farthest_first(x: np.ndarray, order: np.ndarray, gaps: np.ndarray) -> None:
    chosen = [int(order[0])]
    for k in range(1, len(order)):
        dist = np.sqrt(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1)).min(axis=1)
        dist[chosen] = -1
        assert dist[order[k]] == pytest.approx(dist.max())
        assert gaps[k] == pytest.approx(dist.max())
        chosen.append(int(order[k]))


def test_farthest_first_on_constructed_features():
    # Three tight groups far apart plus one outlier: the first four picks cover all four places.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [30.0, 30.0]])
    groups = [
        c + rng.normal(0, 0.1, size=(n, 2)) for c, n in zip(centres, (20, 15, 10, 1), strict=True)
    ]
    x = np.concatenate(groups)
    label = np.repeat(np.arange(4), (20, 15, 10, 1))
    order, gaps = seed_select.farthest_first(x, seed=4)
    assert sorted(order.tolist()) == list(range(len(x)))
    assert sorted(label[order[:4]].tolist()) == [0, 1, 2, 3]
    assert np.isinf(gaps[0]) and np.all(np.diff(gaps[1:]) <= 1e-9)  # the cover radius shrinks
    _is_farthest_first(x, order[:12], gaps[:12])
    again, _ = seed_select.farthest_first(x, seed=4)
    assert np.array_equal(order, again)
    first, _ = seed_select.farthest_first(x, count=3, seed=4)
    assert np.array_equal(first, order[:3])
    with pytest.raises(ValueError, match="2-D"):
        seed_select.farthest_first(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        seed_select.farthest_first(np.array([[0.0], [np.nan]]))
    with pytest.raises(ValueError, match="no images"):
        seed_select.farthest_first(np.zeros((0, 3)))


def test_seed_select_cli(synthetic_data, tmp_path, capsys):
    images_dir = synthetic_data["pool"].parent / "images"
    args = ["--coco", str(synthetic_data["pool"]), "--image-dir", str(images_dir)]
    assert seed_select.main([*args, "--count", "4"]) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 4 and len(set(first)) == 4
    assert all(name.startswith("pool_") for name in first)
    out = tmp_path / "order.json"
    assert seed_select.main([*args, "--format", "json", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["order"][:4] == first  # deterministic
    assert "weak baseline" in document["features"] and document["distances"][0] is None
    assert len(document["order"]) == 7

    # Two identical images: the duplicate comes last, at distance zero.
    folder = tmp_path / "dup"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes((images_dir / "pool_000000.png").read_bytes())
    (folder / "c.png").write_bytes((images_dir / "pool_000003.png").read_bytes())
    assert seed_select.main(["--images", str(folder), "--format", "json"]) == 0
    dup = json.loads(capsys.readouterr().out)
    assert dup["distances"][-1] == 0.0 and dup["order"][-1] in ("a.png", "b.png")

    assert seed_select.main(["--images", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        seed_select.main(["--images", str(folder), "--count", "0"])
