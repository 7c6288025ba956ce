"""Fixtures of the round tests: settings with instant retries, an in-process app, synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.app import create_app
from service.db import get_database
from tests.rounds.helpers import CLASSES, SIZE
from workers import synthetic


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """Training and detection use two threads here, whatever torch would pick."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fast(settings):
    return settings.replace(job_retry_delays=(0, 0))


@pytest.fixture(scope="module")
def local_app(fast):
    """The embedded default: jobs run in-process."""
    application = create_app(fast)
    yield application
    get_database(application).dispose()


@pytest.fixture(scope="module")
def synthetic_data(fast) -> dict[str, Path]:
    """Seed / held-out / pool splits under the image root (written once per module); the pool's
    ground truth is in ``pool_gt.json`` next to them."""
    out = Path(fast.image_root) / "syn"
    files, next_id = {}, 1
    for split, n in (("seed", 5), ("heldout", 3), ("pool", 7)):
        files[split] = synthetic.generate(
            out,
            n,
            seed=5,
            image_size=SIZE,
            classes=CLASSES,
            split=split,
            first_image_id=next_id,
            hide_annotations=split == "pool",
            image_format="png",
        )
        next_id += n
    return files
