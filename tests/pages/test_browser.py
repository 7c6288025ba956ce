"""A real browser: a local worker opens their invite link, passes the qualification test and answers a
HIT with the keyboard (Y / N, one undo); the answers land in PostgreSQL. The task UI must also work on
a phone (no horizontal scroll, touch targets >= 44 px).

Chromium is the system's (``/usr/bin/chromium``) driven by Playwright over a real HTTP server (werkzeug,
in a thread) on the module's PostgreSQL database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select
from werkzeug.serving import make_server

from service.auth import hash_secret
from service.crowd import questions as stored_questions
from service.db import get_database
from service.models import Assignment, GoldItem, Question, QuestionKind, Worker
from service.storage import open_storage
from tests.helpers import hit_answers, hit_questions
from tests.pages import seed_project

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
#: Answers faster than the campaign's minimum time per question are discarded; look a bit longer.
THINK_MS = 600


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def seeded(app, settings):
    with get_database(app).session() as session:
        seeded = seed_project(session, open_storage(settings.storage_url), settings)
    client = app.test_client()
    campaign = client.post(
        f"/api/v1/projects/{seeded.project_id}/campaigns",
        json={
            "budget_usd": 5,
            "backend": "local",
            "reward_per_hit_usd": 0.05,
            "questions_per_hit": 6,
            "gold_per_hit": 2,
        },
        headers=seeded.headers,
    )
    assert campaign.status_code == 201, campaign.get_json()
    return seeded


def _invite(app, seeded) -> str:
    response = app.test_client().post(
        f"/api/v1/projects/{seeded.project_id}/workers", headers=seeded.headers
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["url"].endswith(f"/hit?token={body['token']}")
    return body["token"]


def _expected(app, public_id: str) -> bool | None:
    """The right answer of a gold / qualification question; None for a sample."""
    with get_database(app).session() as session:
        question = stored_questions.by_public_id(session, public_id) or session.scalar(
            select(Question).where(Question.public_id == public_id)
        )
        assert question is not None, public_id
        if question.kind is QuestionKind.SAMPLE:
            return None
        return session.get(GoldItem, question.gold_item_id).expected


def _current_question(page: Page) -> str:
    """Wait until the picture is on screen (answering is enabled) and return its question id."""
    expect(page.locator("#answer-yes")).to_be_visible(timeout=10_000)
    expect(page.locator("#answer-yes")).to_be_enabled(timeout=10_000)
    return page.locator("#question-image").get_attribute("data-question-id")


def _no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"page is {width} px wide"


def test_worker_qualifies_and_answers_a_hit_with_the_keyboard(app, base_url, browser, seeded):
    token = _invite(app, seeded)
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        # The invite link leads to the qualification test (the worker is not qualified yet).
        page.goto(f"{base_url}/hit?token={token}")
        expect(page).to_have_url(f"{base_url}/qualification?token={token}")
        page.click("#start-test")
        expect(page.locator("#progress")).to_have_text("1 / 10")
        for index in range(10):
            public_id = _current_question(page)
            expect(page.locator("#progress")).to_have_text(f"{index + 1} / 10")
            page.keyboard.press("y" if _expected(app, public_id) else "n")
        expect(page.locator("#review")).to_be_visible()
        page.keyboard.press("Enter")
        expect(page.locator("#message-title")).to_have_text("You passed!")
        page.screenshot(path=str(ARTIFACTS / "qualification-passed.png"))
        page.click("#message-link")

        # The HIT: 6 samples + 2 hidden gold, one at a time.
        expect(page).to_have_url(f"{base_url}/hit?token={token}")
        expect(page.locator("#progress")).to_have_text("1 / 8")
        given: dict[str, bool] = {}
        undone = None
        for index in range(8):
            public_id = _current_question(page)
            expect(page.locator("#progress")).to_have_text(f"{index + 1} / 8")
            expected = _expected(app, public_id)
            value = True if expected is None else expected
            page.wait_for_timeout(THINK_MS)
            if index == 2 and expected is None:
                # Answer "no" by mistake, undo with U, and answer again.
                page.keyboard.press("n")
                expect(page.locator("#progress")).to_have_text("4 / 8")
                page.keyboard.press("u")
                expect(page.locator("#progress")).to_have_text("3 / 8")
                assert _current_question(page) == public_id
                page.wait_for_timeout(THINK_MS)
                undone = public_id
            elif index == 2:
                # A gold question here: undo with Backspace instead, same effect.
                page.keyboard.press("y" if not value else "n")
                page.keyboard.press("Backspace")
                expect(page.locator("#progress")).to_have_text("3 / 8")
                page.wait_for_timeout(THINK_MS)
                undone = public_id
            if index == 7:
                page.screenshot(path=str(ARTIFACTS / "hit-question.png"))
            page.keyboard.press("y" if value else "n")
            given[public_id] = value
        expect(page.locator("#review")).to_be_visible()
        # Undo walks back over answers not sent yet (the page sends them in batches of 5, always
        # keeping the latest back), and stops at the first one already submitted.
        for shown in ("8 / 8", "7 / 8", "6 / 8"):
            page.keyboard.press("u")
            expect(page.locator("#progress")).to_have_text(shown)
        page.keyboard.press("u")
        expect(page.locator("#verifier-note")).to_contain_text("already submitted")
        expect(page.locator("#progress")).to_have_text("6 / 8")
        for _ in range(3):
            public_id = _current_question(page)
            page.wait_for_timeout(THINK_MS)
            page.keyboard.press("y" if given[public_id] else "n")
        expect(page.locator("#review")).to_be_visible()
        page.keyboard.press("Enter")
        expect(page.locator("#message-title")).to_have_text("HIT complete — thank you!")
        page.screenshot(path=str(ARTIFACTS / "hit-complete.png"))
        assert errors == []
    finally:
        context.close()

    with get_database(app).session() as session:
        worker = session.scalar(select(Worker).where(Worker.token_hash == hash_secret(token)))
        assert worker.qualified
        assignment = session.scalar(select(Assignment).where(Assignment.worker_id == worker.id))
        public_id = {q.id: q.public_id for q in hit_questions(session, hit_id=assignment.hit_id)}
        rows = [
            (public_id[a.question_id], a.value, a.ms, a.discarded)
            for a in hit_answers(session, Assignment.id == assignment.id)
        ]
    stored = {public_id: value for public_id, value, _, _ in rows}
    assert stored == given  # every answer once, the undone one with its corrected value
    assert undone in stored and stored[undone] is given[undone]
    assert all(ms >= THINK_MS - 50 for _, _, ms, _ in rows)
    assert not any(discarded for *_, discarded in rows)
    assert assignment.status.value in {"submitted", "approved"}


def test_task_ui_fits_a_phone(app, base_url, browser, seeded):
    token = _invite(app, seeded)
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    try:
        page.goto(f"{base_url}/qualification?token={token}")
        _no_horizontal_scroll(page)
        page.tap("#start-test")
        _current_question(page)
        _no_horizontal_scroll(page)
        for selector in ("#answer-yes", "#answer-no", "#answer-undo"):
            box = page.locator(selector).bounding_box()
            assert box["height"] >= 44 and box["width"] >= 44, (selector, box)
        # The picture and both answer buttons are on screen without scrolling.
        for selector in ("#question-image", "#answer-yes", "#answer-no"):
            box = page.locator(selector).bounding_box()
            assert box["y"] + box["height"] <= 844 and box["x"] + box["width"] <= 390, selector
        page.tap("#answer-yes")
        expect(page.locator("#progress")).to_have_text("2 / 10")
        page.tap("#answer-undo")
        expect(page.locator("#progress")).to_have_text("1 / 10")
        page.screenshot(path=str(ARTIFACTS / "phone-question.png"))
        for path in (
            "/instructions",
            "/dashboard",
            "/hit?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE",
        ):
            page.goto(base_url + path)
            page.wait_for_load_state("load")
            _no_horizontal_scroll(page)
    finally:
        context.close()


def test_requester_dashboard(app, base_url, browser, seeded):
    key = seeded.headers["Authorization"].removeprefix("Bearer ")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{base_url}/dashboard")
        page.fill("#api-key", "mm_wrong_key")
        page.keyboard.press("Enter")
        expect(page.locator("#key-error")).to_contain_text("refused")
        page.fill("#api-key", key)
        page.keyboard.press("Enter")
        expect(page.locator("#campaign-status")).to_have_text("running")
        expect(page.locator("#budget-text")).to_contain_text("of $5.00")
        expect(page.locator("#kpis")).to_contain_text("Questions answered")
        expect(page.locator("#clusters-table")).to_contain_text("active")
        expect(page.locator("#timeline-chart path.series")).to_have_count(2)
        # The worker of the keyboard test: qualified, with gold answers counted.
        expect(page.locator("#workers-table tbody tr").first).to_contain_text("yes")
        page.click("#invite-worker")
        expect(page.locator("#invite-output")).to_contain_text("/hit?token=")
        page.click("#campaign-pause")
        expect(page.locator("#campaign-status")).to_have_text("paused")
        page.click("#campaign-resume")
        expect(page.locator("#campaign-status")).to_have_text("running")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        # The key survives a reload of the tab (sessionStorage), not a new tab.
        page.reload()
        expect(page.locator("#campaign-status")).to_have_text("running")
        page.set_viewport_size({"width": 390, "height": 844})
        _no_horizontal_scroll(page)
        assert errors == []
    finally:
        context.close()
