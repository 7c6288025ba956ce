"""Overlays: the JPEG a question shows, its outline, its zoom, its cache and its image sources."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from service import render
from service.crowd import questions as stored_questions
from service.crowd.questions import HitQuestion
from service.db import get_database
from service.models import Image, Question, QuestionKind, QuestionStatus
from service.render import (
    EXAMPLES,
    example_iou,
    open_image,
    overlay_for_question,
    overlay_key,
    render_overlay,
)
from service.storage import open_storage
from tests.pages import IMAGE_SIZE, rect_rle, seed_project, write_png

GREY = (128, 128, 128)


def _decode(data: bytes) -> np.ndarray:
    picture = PILImage.open(io.BytesIO(data))
    assert picture.format == "JPEG"
    return np.asarray(picture.convert("RGB")).astype(int)


def _is_outline(pixels: np.ndarray) -> np.ndarray:
    """Outline-coloured (bright yellow) pixels of an ``(..., 3)`` array."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (red > 200) & (green > 170) & (blue < 90)


def test_overlay_is_a_jpeg_scaled_to_max_side_with_outline_on_the_boundary():
    # 200x100 grey image, 40x40 square mask at x 60..100, y 30..70.
    image = PILImage.new("RGB", (200, 100), GREY)
    data = render_overlay(image, rect_rle(60, 30, 100, 70, size=(200, 100)), max_side=384)
    pixels = _decode(data)
    # The crop is 96x96 source pixels (the minimum crop side) around the square, kept inside the
    # image: x 32..128, y 2..98; scaled x4 to 384x384.
    assert pixels.shape == (384, 384, 3)
    # Left / right / top / bottom edges of the square, at their middles, in output pixels.
    for x, y in [(112, 192), (113, 192), (271, 192), (192, 112), (192, 271)]:
        assert _is_outline(pixels[y, x]), (x, y, pixels[y, x])
    # Inside: the tint, not the outline; far outside: the untouched grey.
    assert not _is_outline(pixels[192, 192])
    assert pixels[192, 192][2] > 80
    assert np.abs(pixels[192, 40] - GREY).max() < 12
    assert np.abs(pixels[40, 40] - GREY).max() < 12
    # The outline is thin: 12 px in from the edge it is gone.
    assert not _is_outline(pixels[192, 126])


def test_small_object_in_a_large_image_is_zoomed():
    image = PILImage.new("RGB", (2000, 1500), GREY)
    data = render_overlay(image, rect_rle(1000, 700, 1020, 720, size=(2000, 1500)))
    pixels = _decode(data)
    assert max(pixels.shape[:2]) == 800
    ys, xs = np.nonzero(_is_outline(pixels))
    # The minimum crop is a quarter of the image's longer side (500 px), shown at 800 px: the
    # 20-pixel square becomes ~32 px, centred.
    assert 28 <= xs.max() - xs.min() <= 40 and 28 <= ys.max() - ys.min() <= 40
    assert abs((xs.max() + xs.min()) / 2 - pixels.shape[1] / 2) < 10


def test_overlay_is_deterministic_and_checks_its_input():
    image = PILImage.new("RGB", (200, 100), GREY)
    rle = rect_rle(60, 30, 100, 70, size=(200, 100))
    assert render_overlay(image, rle) == render_overlay(image.copy(), dict(rle))
    with pytest.raises(ValueError, match=r"does not match the image"):
        render_overlay(image, rect_rle(0, 0, 5, 5, size=(100, 100)))
    with pytest.raises(ValueError, match="not valid COCO RLE"):
        render_overlay(image, {"size": [100, 200], "counts": "0"})
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        render_overlay(image, {"counts": "abc"})
    with pytest.raises(ValueError, match="max_side"):
        render_overlay(image, rle, max_side=8)
    with pytest.raises(ValueError, match="PIL image"):
        render_overlay(np.zeros((100, 200, 3)), rle)


def test_empty_mask_shows_the_whole_image():
    image = PILImage.new("RGB", (200, 100), GREY)
    empty = {"size": [100, 200], "counts": [200 * 100]}
    pixels = _decode(render_overlay(image, empty, max_side=400))
    assert pixels.shape == (200, 400, 3)
    assert not _is_outline(pixels).any()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_instruction_examples_follow_the_iou_rule(example):
    # The instructions teach "yes when IoU >= 0.75": every example must be on the right side.
    assert (example_iou(example.name) >= 0.75) is example.answer


# ------------------------------------------------------------------------------ image sources


def test_open_image_refuses_paths_outside_the_image_root(settings, tmp_path):
    storage = open_storage(settings.storage_url)
    inside = Path(settings.image_root) / "ok" / "a.png"
    write_png(inside, 0)
    assert open_image(f"file://{inside}", settings, storage).size == IMAGE_SIZE
    assert open_image("ok/a.png", settings, storage).size == IMAGE_SIZE  # relative to the root

    outside = tmp_path / "secret.png"
    write_png(outside, 1)
    for uri in (
        f"file://{outside}",
        str(outside),
        "ok/../../secret.png",
        "http://example.com/a.png",
    ):
        with pytest.raises(ValueError, match="neither under the image root nor in storage"):
            open_image(uri, settings, storage)
    # A symlink under the root that points out of it is refused too.
    link = Path(settings.image_root) / "ok" / "link.png"
    os.symlink(outside, link)
    with pytest.raises(ValueError, match="neither under the image root"):
        open_image(f"file://{link}", settings, storage)
    with pytest.raises(ValueError, match="does not exist"):
        open_image(f"file://{Path(settings.image_root) / 'ok' / 'missing.png'}", settings, storage)


def test_open_image_reads_uploads_from_storage(settings):
    storage = open_storage(settings.storage_url)
    buffer = io.BytesIO()
    PILImage.new("RGB", (30, 20), GREY).save(buffer, format="PNG")
    uri = storage.put_bytes("projects/1/images/up.png", buffer.getvalue())
    assert open_image(uri, settings, storage).size == (30, 20)
    bad = storage.put_bytes("projects/1/images/bad.png", b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(bad, settings, storage)


# ------------------------------------------------------------------------ questions and cache


@pytest.fixture(scope="module")
def seeded(app, settings):
    storage = open_storage(settings.storage_url)
    with get_database(app).session() as session:
        return seed_project(session, storage, settings)


def _question(db, gold_item_id: int) -> Question:
    """A qualification question: the only kind stored as a row of ``questions``."""
    question = Question(
        public_id=secrets.token_urlsafe(16),
        kind=QuestionKind.QUALIFICATION,
        gold_item_id=gold_item_id,
    )
    db.add(question)
    db.commit()
    return question


def _hit_question(kind: QuestionKind, position: int = 0, **target) -> HitQuestion:
    """A HIT's question as :mod:`service.crowd.questions` reads it from its HIT row; rendering
    reads only its target (the tree's leaf, or the gold item), so no HIT is stored."""
    fields = {"cluster_id": None, "tree_id": None, "leaf_pos": None, "gold_item_id": None}
    fields.update(target)
    return HitQuestion(
        id=stored_questions.question_id(1, position),
        hit_id=1,
        position=position,
        public_id=stored_questions.public_id(secrets.token_urlsafe(18), position),
        kind=kind,
        status=QuestionStatus.OPEN,
        **fields,
    )


def test_sample_and_gold_overlays_are_rendered_then_cached(db, settings, seeded, monkeypatch):
    storage = open_storage(settings.storage_url)
    sample = _hit_question(
        QuestionKind.SAMPLE, tree_id=seeded.tree_id, cluster_id=seeded.cluster_id, leaf_pos=3
    )
    gold = _hit_question(QuestionKind.GOLD, 1, gold_item_id=seeded.gold_ids[0])
    qualification = _question(db, seeded.qualification_ids[0])
    for question in (sample, gold, qualification):
        key = overlay_key(question)
        assert not storage.exists(key)
        data = overlay_for_question(db, storage, settings, question)
        assert _decode(data).shape[:2] != (0, 0)
        assert storage.get_bytes(key) == data
    assert "/trees/" in overlay_key(sample) and "/gold/" in overlay_key(gold)
    assert "/gold/" in overlay_key(qualification)

    # A cache hit neither reads the image nor renders.
    def boom(*_args, **_kwargs):
        raise AssertionError("rendered although cached")

    monkeypatch.setattr(render, "render_overlay", boom)
    monkeypatch.setattr(render, "open_image", boom)
    assert overlay_for_question(db, storage, settings, gold) == storage.get_bytes(overlay_key(gold))


def test_sample_overlay_outlines_the_tree_files_mask(db, settings, seeded):
    storage = open_storage(settings.storage_url)
    question = _hit_question(
        QuestionKind.SAMPLE, tree_id=seeded.tree_id, cluster_id=seeded.cluster_id, leaf_pos=0
    )
    image, rle = render.question_target(db, storage, question)
    expected = render_overlay(open_image(image.uri, settings, storage), rle)
    assert overlay_for_question(db, storage, settings, question) == expected
    assert image.id in seeded.image_ids


def test_question_whose_image_lies_outside_the_root_is_refused(db, settings, seeded, tmp_path):
    storage = open_storage(settings.storage_url)
    outside = tmp_path / "elsewhere.png"
    write_png(outside, 3)
    image = db.get(Image, seeded.image_ids[1])
    original = image.uri
    image.uri = f"file://{outside}"
    db.commit()
    try:
        question = _hit_question(QuestionKind.GOLD, gold_item_id=seeded.gold_ids[1])
        with pytest.raises(ValueError, match="neither under the image root"):
            overlay_for_question(db, storage, settings, question)
        assert not storage.exists(overlay_key(question))
    finally:
        image.uri = original
        db.commit()


# ------------------------------------------------------------------------------ the render job


def test_render_job_prerenders_once_and_reports(app, db, settings, seeded):
    from service.jobs import job_context_for_tests
    from workers.render import render_job, render_questions

    storage = open_storage(settings.storage_url)
    # Qualification questions (rows); a HIT's questions render through render_hits
    # (tests/crowd/test_render_ahead.py).
    questions = [_question(db, gold_item_id) for gold_item_id in seeded.qualification_ids[4:8]]
    ids = [q.id for q in questions]
    assert not any(storage.exists(overlay_key(q)) for q in questions)
    assert render_questions([*ids, 10**9], settings=settings) == 4
    assert all(storage.exists(overlay_key(q)) for q in questions)
    with job_context_for_tests(settings) as ctx:
        again = render_job(ctx, question_ids=ids)
    assert again == {"rendered": 0, "cached": 4, "missing": 0, "failed": 0}
    with pytest.raises(ValueError, match="integers"):
        render_questions(["1"], settings=settings)


def test_tree_file_cache_drops_features_and_keeps_a_byte_budget(db, settings, seeded):
    from service.models import Tree

    storage = open_storage(settings.storage_url)
    tree = db.get(Tree, seeded.tree_id)
    cache = render.TreeFileCache(max_bytes=1)
    first = cache.get(storage, tree)
    assert first.features.shape == (seeded.mask_count, 0)
    assert cache.get(storage, tree) is first  # cached, even over budget (the newest stays)
    clone = Tree(id=tree.id + 1000, uri=tree.uri, project_id=tree.project_id)
    cache.get(storage, clone)
    assert cache.get(storage, tree) is not first  # the budget evicted it
