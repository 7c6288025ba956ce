"""The train job across crashes: a resumed run keeps the interrupted run's learning-rate schedule
and loss history, a retry after the weights were stored reports what the run did, an unreadable
resume file does not wedge the job, and bad options are refused by name before any work."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from service.jobs import TransientJobError, job_context_for_tests
from service.models import RoundStatus
from service.storage import open_storage
from tests.rounds.helpers import TINY_MODEL, project_with_round
from workers import model as mm
from workers import train as train_job


@pytest.fixture()
def training_round(local_app, synthetic_data) -> dict[str, int]:
    """A fresh project with seed ground truth and a round about to train."""
    pid, round_id, _ = project_with_round(
        local_app, synthetic_data, "train-job", RoundStatus.TRAINING, splits=("seed",)
    )
    return {"pid": pid, "round_id": round_id}


class Recorder:
    """Wraps ``train_steps``: records each call's start and warm-up and every step's loss, and
    crashes (a preempted worker) when asked to start at ``crash_at``."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.real = mm.train_steps
        self.crash_at = crash_at
        self.calls: list[tuple[int, int]] = []
        self.losses: dict[int, float] = {}

    def __call__(self, model, loader, optimizer, n, *, start_step=0, warmup_steps=0, **kw):
        self.calls.append((start_step, warmup_steps))
        if start_step == self.crash_at:
            self.crash_at = None
            raise TransientJobError("worker preempted")
        history = self.real(
            model, loader, optimizer, n, start_step=start_step, warmup_steps=warmup_steps, **kw
        )
        for k, entry in enumerate(history):
            self.losses[start_step + k] = entry["loss"]
        return history


def _train(fast, training_round, **options: Any) -> dict[str, Any]:
    with job_context_for_tests(fast) as ctx:
        return train_job.train(
            ctx, round_id=training_round["round_id"], model=TINY_MODEL, **options
        )


def test_a_resumed_run_keeps_the_warm_up_of_the_interrupted_one(training_round, fast, monkeypatch):
    # 48 steps from scratch warm up over 12; the resumed run must not switch to the 10 of a
    # fine-tune (it would jump to the full learning rate at step 4 of 12).
    recorder = Recorder(crash_at=4)
    monkeypatch.setattr(mm, "train_steps", recorder)
    options = {"steps": 48, "checkpoint_every": 4}
    with pytest.raises(TransientJobError):
        _train(fast, training_round, **options)
    recorder.crash_at = 8  # the retry runs one chunk from the checkpoint, then is preempted too
    with pytest.raises(TransientJobError):
        _train(fast, training_round, **options)
    assert recorder.calls == [(0, 12), (4, 12), (4, 12), (8, 12)]


def test_the_resumed_and_the_stored_run_report_the_whole_run(training_round, fast, monkeypatch):
    recorder = Recorder(crash_at=4)
    monkeypatch.setattr(mm, "train_steps", recorder)
    options = {"steps": 8, "checkpoint_every": 4}
    with pytest.raises(TransientJobError):
        _train(fast, training_round, **options)
    resumed = _train(fast, training_round, **options)
    assert resumed["resumed_from_step"] == 4 and resumed["init"] == "scratch"
    assert sorted(recorder.losses) == list(range(8))
    # The loss over the first steps includes the steps the interrupted attempt ran.
    assert resumed["loss_first"] == pytest.approx(
        statistics.fmean(recorder.losses[k] for k in range(8)), abs=1e-4
    )

    stored = _train(fast, training_round, **options)
    assert stored["reused_stored_weights"]
    for key in ("init", "loss_first", "loss", "lr", "warmup_steps", "resumed_from_step"):
        assert stored[key] == resumed[key], key


def test_an_unreadable_resume_file_is_discarded_not_fatal(training_round, fast):
    storage = open_storage(fast.storage_url)
    key = train_job.resume_key(training_round["pid"], 1)
    storage.put_bytes(key, b"half a checkpoint")
    result = _train(fast, training_round, steps=2, checkpoint_every=1)
    assert result["init"] == "scratch" and result["resumed_from_step"] is None
    assert "torch.load cannot read it" in result["resume_discarded"]
    assert key in result["resume_discarded"]
    assert not storage.exists(key)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"batch_size": "2"}, "batch_size"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"seed": -3}, "seed"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
)
def test_bad_options_are_refused_by_name(training_round, fast, options, named):
    with pytest.raises(ValueError, match=rf"^{named} must be"):
        _train(fast, training_round, **options)
