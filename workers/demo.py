"""The end-to-end demo (``scripts/demo``): a whole bootstrapping run on the embedded default.

What it does, all through the public HTTP API of a real server it starts in this process
(werkzeug, threaded, on a free port) with SQLite and in-process jobs under ``var/demo-<time>/``:

1. generates a synthetic dataset (seed / held-out / pool splits, exact masks);
2. creates an API key (as ``maskmill create-key`` does: keys have no HTTP endpoint) and a project;
   registers the images; uploads seed and held-out ground truth;
3. round 1: ``POST /rounds`` trains the seed model, detects on the pool, clusters;
4. launches a local campaign with a budget; a simulated crowd answers through the work API --
   honest workers who are right with a fixed probability (the truth is the synthetic ground
   truth: a mask is correct when its IoU with the object reaches ``K_iou``) and spammers who pass
   the qualification honestly and then answer at random -- while a progress bar shows the spend
   and the accepted masks;
5. round 2 retrains on seed + accepted masks, detects, clusters; a second campaign verifies it;
6. prints a summary (accepted masks and their quality against the synthetic truth, questions,
   cost, speed-up against manual polygons), writes ``summary.json``, the COCO export and a plot;
7. leaves the server running with a HIT page URL for a person to try (``--no-serve`` exits).

``--quick`` is the reduced form for CI: tiny images, a tiny network and few training steps; it
checks that every piece works, not that the model is good. It is not: after 24 steps from scratch
the detector's masks essentially never reach ``K_iou`` against an object (measured: 0 of 125-171 per
round; on 2 cores even 200 steps of the quick configuration give under 1%), so whatever the crowd
accepts there is the crowd's mistakes -- an honest worker's rare wrong "yes", or a spammer's
answer that passed the gold checks of its HIT -- on single-mask clusters that one answer decides.
The summary therefore measures, from the synthetic truth, how many detected masks were correct
in each round and how many accepted masks are wrong, says so in plain words when the model had
nothing correct to offer, and counts only correct masks in the speed-up against manual drawing.

Speed-up against manual drawing uses the published figures the paper compares with: 80 s to draw
one instance polygon by hand (COCO's annotation cost) and 1.4 s per yes/no answer (the paper's
measured crowd speed); every answer the simulated crowd gave counts, gold, qualification and the
spammers' discarded answers included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from sqlalchemy import select

from service import migrate
from service.auth import create_api_key
from service.coco import rle_for_pycocotools
from service.crowd import questions as hit_questions
from service.db import Database
from service.engine.treefile import TreeFile, read_tree_file
from service.models import GoldItem, Question, QuestionKind, Tree
from service.settings import Settings
from service.storage import open_storage

log = logging.getLogger("maskmill.demo")

MANUAL_SECONDS_PER_MASK = 80.0
SECONDS_PER_QUESTION = 1.4


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class SimWorker:
    name: str
    accuracy: float
    spammer: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything the demo's size depends on."""

    name: str
    image_size: int
    classes: tuple[str, ...]
    seed_images: int
    heldout_images: int
    pool_images: int
    steps: tuple[int, int]  # training steps of round 1 and round 2
    budgets_usd: tuple[float, float]  # campaign budget of round 1 and round 2
    model: dict[str, Any]
    policy: dict[str, Any]
    reward_per_hit_usd: float
    questions_per_hit: int
    gold_per_hit: int
    workers: tuple[SimWorker, ...]
    batch_size: int = 4
    max_hits: int = 2000


CROWD = (
    SimWorker("ana", 0.97),
    SimWorker("ben", 0.95),
    SimWorker("chloe", 0.96),
    SimWorker("spam-1", 0.5, spammer=True),
    SimWorker("spam-2", 0.5, spammer=True),
)

FULL = Plan(
    name="full",
    image_size=96,
    classes=("disc", "square", "triangle"),
    seed_images=40,
    heldout_images=16,
    pool_images=300,
    steps=(300, 200),
    budgets_usd=(6.0, 4.0),
    model={
        "fpn_channels": 64,
        "box_head_dim": 256,
        "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "iou_head_channels": 64,
        "iou_head_fc_dim": 256,
        "detections_per_img": 20,
        "feature_dim": 64,
    },
    policy={"n_s": 15, "k_pa": 0.45, "variant": "curtailed"},
    reward_per_hit_usd=0.12,
    questions_per_hit=50,
    gold_per_hit=5,
    workers=CROWD,
    batch_size=2,
)

QUICK = Plan(
    name="quick",
    image_size=64,
    classes=("disc", "square"),
    seed_images=10,
    heldout_images=5,
    pool_images=24,
    steps=(24, 12),
    budgets_usd=(2.0, 1.0),
    model={
        "fpn_channels": 16,
        "box_head_dim": 64,
        "box_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 50,
        "iou_head_channels": 16,
        "iou_head_fc_dim": 32,
        "detections_per_img": 10,
        "feature_dim": 16,
        "score_threshold": 0.05,
    },
    policy={"n_s": 5, "k_pa": 0.05, "variant": "curtailed"},
    reward_per_hit_usd=0.05,
    questions_per_hit=20,
    gold_per_hit=4,
    workers=CROWD,
    batch_size=2,
)


class DemoError(RuntimeError):
    """The demo cannot go on (a request failed, a round failed)."""


# ---------------------------------------------------------------------------------- HTTP client


class Api:
    """A minimal JSON client for the service's REST API (standard library only)."""

    def __init__(self, base_url: str, key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        document = json.loads(payload) if payload else None
        if status not in ok:
            error = (document or {}).get("error", {}) if isinstance(document, dict) else {}
            raise DemoError(f"{method} {path} -> {status}: {error.get('message', payload[:200])}")
        return status, document

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)[1]

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, body if body is not None else {}, **kw)[1]


# ------------------------------------------------------------------------------------ the server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Server:
    """The Flask app under werkzeug's threaded server, on a background thread."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        from werkzeug.serving import make_server

        from service.app import create_app

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.app = create_app(settings)
        self.server = make_server(host, port, self.app, threaded=True)
        self.url = f"http://{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


# ------------------------------------------------------------------------------------ the data


@dataclass
class Dataset:
    """The synthetic splits and the ground truth of every image, by file name."""

    root: Path
    files: dict[str, Path]
    truth: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def objects(self, split: str) -> int:
        names = {i["file_name"] for i in json.loads(self.files[split].read_text())["images"]}
        return sum(len(self.truth.get(name, [])) for name in names)


def make_dataset(plan: Plan, image_root: Path, seed: int) -> Dataset:
    from workers import synthetic

    out = image_root / "synthetic"
    files: dict[str, Path] = {}
    next_id = 1
    for split, n in (
        ("seed", plan.seed_images),
        ("heldout", plan.heldout_images),
        ("pool", plan.pool_images),
    ):
        files[split] = synthetic.generate(
            out,
            n,
            seed=seed,
            image_size=plan.image_size,
            classes=plan.classes,
            split=split,
            first_image_id=next_id,
            hide_annotations=split == "pool",
        )
        next_id += n
    dataset = Dataset(out, files)
    for split in ("seed", "heldout", "pool"):
        path = out / "pool_gt.json" if split == "pool" else files[split]
        document = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in document["categories"]}
        images = {i["id"]: i["file_name"] for i in document["images"]}
        for ann in document["annotations"]:
            dataset.truth.setdefault(images[ann["image_id"]], []).append(
                (names[ann["category_id"]], ann["segmentation"])
            )
    return dataset


# ------------------------------------------------------------------------------------ the crowd


def best_iou(rle: dict[str, Any], truths: list[dict[str, Any]]) -> float:
    if not truths:
        return 0.0
    ious = mask_utils.iou(
        [rle_for_pycocotools(rle)], [rle_for_pycocotools(t) for t in truths], [0] * len(truths)
    )
    return float(np.asarray(ious).max())


class Oracle:
    """The right answer to any question, from the synthetic ground truth.

    A simulated worker sees only a question id (as a person sees only the picture), so the demo
    looks the question up in the database -- the mask behind it -- and compares that mask with the
    synthetic object it was meant to segment.
    """

    def __init__(
        self,
        database: Database,
        settings: Settings,
        dataset: Dataset,
        image_names: dict[int, str],
        class_names: dict[int, str],
        k_iou: float,
    ) -> None:
        self.database = database
        self.storage = open_storage(settings.storage_url)
        self.dataset = dataset
        self.image_names = image_names
        self.class_names = class_names
        self.k_iou = k_iou
        self._trees: dict[int, TreeFile] = {}

    def _tree(self, session: Any, tree_id: int) -> TreeFile:
        if tree_id not in self._trees:
            uri = session.scalar(select(Tree.uri).where(Tree.id == tree_id))
            with self.storage.open_read(self.storage.key_from_uri(uri)) as handle:
                self._trees[tree_id] = read_tree_file(handle)
        return self._trees[tree_id]

    def mask_iou(self, image_id: int, class_id: int, rle: dict[str, Any]) -> float:
        name, cls = self.image_names[image_id], self.class_names[class_id]
        return best_iou(rle, [s for c, s in self.dataset.truth.get(name, []) if c == cls])

    def detection_quality(self, round_id: int) -> dict[str, Any]:
        """How good the round's detected pool masks were: the share with ``IoU >= K_iou`` is the
        best precision any verification of them could reach."""
        ious: list[float] = []
        with self.database.session() as session:
            tree_ids = session.scalars(select(Tree.id).where(Tree.round_id == round_id)).all()
            for tree_id in tree_ids:
                tree = self._tree(session, tree_id)
                ious += [
                    self.mask_iou(int(tree.image_ids[pos]), tree.class_id, tree.rle(pos))
                    for pos in range(len(tree.image_ids))
                ]
        arr = np.asarray(ious, dtype=np.float64)
        correct = int((arr >= self.k_iou).sum())
        return {
            "masks": len(ious),
            "correct": correct,
            "correct_share": round(correct / len(arr), 4) if len(arr) else None,
            "mean_iou": round(float(arr.mean()), 4) if len(arr) else None,
        }

    def answers(self, public_ids: list[str]) -> dict[str, bool]:
        out: dict[str, bool] = {}
        with self.database.session() as session:
            targets: list[tuple[str, QuestionKind, int | None, int | None, bool | None]] = []
            rows = session.execute(
                select(Question.public_id, Question.kind, GoldItem.expected)
                .join(GoldItem, GoldItem.id == Question.gold_item_id)
                .where(Question.public_id.in_(public_ids))
            ).all()
            targets.extend((pid, QuestionKind(kind), None, None, exp) for pid, kind, exp in rows)
            found = hit_questions.of_public_ids(session, set(public_ids) - {r[0] for r in rows})
            expected = hit_questions.expected_answers(session, found.values())
            targets.extend(
                (pid, q.kind, q.tree_id, q.leaf_pos, expected.get(q.id)) for pid, q in found.items()
            )
            for public_id, kind, tree_id, leaf_pos, expected in targets:
                if kind is not QuestionKind.SAMPLE:
                    out[public_id] = bool(expected)
                    continue
                tree = self._tree(session, tree_id)
                rle = tree.rle(leaf_pos)
                iou = self.mask_iou(int(tree.image_ids[leaf_pos]), tree.class_id, rle)
                out[public_id] = iou >= self.k_iou
        missing = set(public_ids) - set(out)
        if missing:
            raise DemoError(f"questions {sorted(missing)[:3]} are not in the database")
        return out


def _coin(worker: str, question: str, accuracy: float) -> bool:
    """A deterministic coin per (worker, question): True with probability ``accuracy``."""
    digest = hashlib.sha256(f"{worker}:{question}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < accuracy


@dataclass
class Member:
    spec: SimWorker
    token: str
    worker_id: int
    blocked: bool = False


@dataclass
class CampaignRun:
    round_number: int
    campaign_id: int
    budget_usd: float
    hits: int = 0
    answers: int = 0
    trace: list[tuple[int, int, float]] = field(default_factory=list)  # questions, masks, usd
    final: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Progress:
    """One plain-text status line, redrawn with ``\\r`` on a terminal.

    When the output is not a terminal (a CI log, a pipe) a redrawn line would pile up as one
    endless line, so it prints a full line instead, at most every ``log_every`` seconds.
    """

    def __init__(self, stream: Any = sys.stdout, width: int = 20, log_every: float = 10.0) -> None:
        self.stream = stream
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else log_every
        self._last = 0.0
        self._length = 0

    def bar(self, fraction: float) -> str:
        filled = round(self.width * min(max(fraction, 0.0), 1.0))
        return "[" + "#" * filled + "-" * (self.width - filled) + "]"

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + text.ljust(self._length))
            self._length = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        if self.tty:
            self.show(text, force=True)
            self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._length = 0


def qualify(api: Api, member: Member, oracle: Oracle) -> int:
    """Take the qualification test, answering honestly (spammers too: they spam once paid)."""
    headers = {"X-Worker-Token": member.token}
    test = api.get("/api/v1/work/qualification", headers=headers)
    ids = [q["id"] for q in test["questions"]]
    truth = oracle.answers(ids)
    graded = api.post(
        "/api/v1/work/qualification",
        {"answers": [{"question_id": q, "value": truth[q], "ms": 1400} for q in ids]},
        headers=headers,
    )
    if not graded.get("passed"):
        raise DemoError(f"simulated worker {member.spec.name} failed the qualification test")
    return len(ids)


def run_crowd(
    api: Api,
    campaign: CampaignRun,
    members: list[Member],
    oracle: Oracle,
    plan: Plan,
    progress: Progress,
) -> None:
    """Workers take turns claiming and answering HITs until no one can get work."""
    started = time.perf_counter()

    def snapshot(force: bool = False) -> dict[str, Any]:
        state = api.get(f"/api/v1/campaigns/{campaign.campaign_id}")
        spent = state["spent_usd"] + state["reserved_usd"]
        campaign.trace.append(
            (state["questions"]["answered"], state["masks"]["accepted"], state["spent_usd"])
        )
        active = sum(not m.blocked for m in members)
        progress.show(
            f"  crowd {progress.bar(spent / campaign.budget_usd)} "
            f"${state['spent_usd']:.2f}/{campaign.budget_usd:.2f} spent, "
            f"{state['masks']['accepted']} masks accepted, "
            f"{state['questions']['answered']} questions, {active} workers",
            force=force,
        )
        return state

    snapshot(force=True)
    while campaign.hits < plan.max_hits:
        progressed = False
        for member in members:
            if member.blocked:
                continue
            headers = {"X-Worker-Token": member.token}
            status, hit = api.call(
                "POST", "/api/v1/work/assignments", {}, headers=headers, ok=(200, 403, 409)
            )
            if status != 200:
                member.blocked = hit["error"]["code"] == "blocked"
                continue
            ids = [q["id"] for q in hit["questions"]]
            truth = oracle.answers(ids)
            answers = []
            for q in ids:
                if member.spec.spammer:
                    value = _coin(member.spec.name, q, 0.5)
                else:
                    right = _coin(member.spec.name, q, member.spec.accuracy)
                    value = truth[q] if right else not truth[q]
                answers.append({"question_id": q, "value": value, "ms": 1400})
            api.post(
                f"/api/v1/work/assignments/{hit['assignment_id']}/answers",
                {"answers": answers},
                headers=headers,
            )
            campaign.hits += 1
            campaign.answers += len(answers)
            progressed = True
            snapshot()
        if not progressed:
            break
    campaign.final = snapshot(force=True)
    campaign.seconds = time.perf_counter() - started
    progress.done(
        f"  round {campaign.round_number} crowd done: {campaign.hits} HITs, "
        f"{campaign.final['masks']['accepted']} masks accepted, "
        f"${campaign.final['spent_usd']:.2f} spent, campaign {campaign.final['status']}"
    )


# ---------------------------------------------------------------------------------- the rounds


def wait_for_round(api: Api, pid: int, number: int, progress: Progress) -> dict[str, Any]:
    started = time.perf_counter()
    while True:
        state = api.get(f"/api/v1/projects/{pid}/rounds/{number}")
        running = [j for j in state["jobs"] if j["status"] in ("queued", "started")]
        current = running[0] if running else (state["jobs"][-1] if state["jobs"] else None)
        detail = f"{current['id']}: {current['message']}" if current else ""
        elapsed = time.perf_counter() - started
        progress.show(f"  round {number} {state['status']:<10} {elapsed:5.0f} s  {detail}")
        if state["status"] in ("ready", "failed"):
            break
        time.sleep(0.5)
    if state["status"] == "failed":
        progress.done(f"  round {number} failed")
        raise DemoError(f"round {number} failed: {state.get('error')}")
    counts = state["counts"]
    progress.done(
        f"  round {number} ready in {time.perf_counter() - started:.0f} s: held-out mask AP "
        f"{state['ap']}, {counts['masks']} masks in {counts['trees']} trees, "
        f"{counts['clusters'].get('candidate', 0)} candidate clusters"
    )
    state["seconds"] = round(time.perf_counter() - started, 1)
    return state


# ---------------------------------------------------------------------------------- the results


#: Below this share of correct detected masks a round's model is called barely trained: the crowd
#: has (almost) nothing right to accept, and what it accepts is its own errors.
USELESS_MODEL_SHARE = 0.05


def export_quality(export: dict[str, Any], oracle: Oracle) -> dict[str, Any]:
    ious = [
        oracle.mask_iou(a["image_id"], a["category_id"], a["segmentation"])
        for a in export["annotations"]
    ]
    arr = np.asarray(ious, dtype=np.float64)
    by_round: dict[int, int] = defaultdict(int)
    for annotation in export["annotations"]:
        by_round[annotation["maskmill"]["round"]] += 1
    correct = int((arr >= oracle.k_iou).sum())
    return {
        "accepted_masks": len(ious),
        "correct_masks": correct,
        "wrong_masks": len(ious) - correct,
        "mean_iou": round(float(arr.mean()), 4) if len(arr) else None,
        "share_iou_ge_k": round(correct / len(arr), 4) if len(arr) else None,
        "k_iou": oracle.k_iou,
        "by_round": dict(sorted(by_round.items())),
    }


def caveats(summary: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers do not show, for the summary to print."""
    notes = []
    k = summary["quality"]["k_iou"]
    for r in summary["rounds"]:
        detected = r["detected"]
        share = detected["correct_share"]
        if share is not None and share < USELESS_MODEL_SHARE:
            start = "scratch" if r["train_init"] == "scratch" else f"{r['train_init']}'s model"
            note = (
                f"round {r['number']}: the model is barely trained ({r['train_steps']} steps "
                f"from {start}, held-out mask AP {r['ap']}): {detected['correct']} of "
                f"{detected['masks']} detected masks reach IoU {k} with an object, so the crowd "
                "had (almost) nothing correct to accept"
            )
            if r["accepted_masks"]:
                note += (
                    f"; its {r['accepted_masks']} accepted are answer errors (honest workers' "
                    "rare mistakes, spammers' answers that passed gold checks), typically on "
                    "single-mask clusters that one answer decides"
                )
            notes.append(note)
    quality = summary["quality"]
    if quality["wrong_masks"]:
        notes.append(
            f"{quality['wrong_masks']} of {quality['accepted_masks']} accepted masks are wrong "
            f"(IoU < {k}); the speed-up counts only the {quality['correct_masks']} correct ones"
        )
    if summary["mode"] == "quick" and notes:
        notes.append(
            "--quick checks that every piece works, not the model: run scripts/demo without "
            f"--quick for a meaningful dataset ({' + '.join(map(str, FULL.steps))} training steps)"
        )
    return notes


def write_plot(path: Path, runs: list[CampaignRun], rounds: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    questions_before = masks_before = 0
    for run in runs:
        # Cumulative over the rounds: each round's curve starts where the previous one ended.
        questions = [questions_before + q for q, _, _ in run.trace]
        masks = [masks_before + m for _, m, _ in run.trace]
        left.plot(questions, masks, label=f"round {run.round_number}")
        if questions:
            questions_before, masks_before = questions[-1], masks[-1]
    left.set_xlabel("questions answered (cumulative)")
    left.set_ylabel("masks accepted (cumulative)")
    left.set_title("Accepted masks vs questions")
    left.legend()
    numbers = [r["number"] for r in rounds]
    accepted = [r["counts"]["accepted_masks"] for r in rounds]
    aps = [r["ap"] or 0.0 for r in rounds]
    right.bar(numbers, accepted, color="tab:green", label="accepted masks")
    right.set_xlabel("round")
    right.set_ylabel("accepted masks")
    right.set_xticks(numbers)
    twin = right.twinx()
    twin.plot(numbers, aps, "o-", color="tab:blue", label="held-out mask AP")
    twin.set_ylabel("held-out mask AP")
    twin.set_ylim(0, max(0.05, max(aps) * 1.3))
    right.set_title("Quantity and model quality per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- the run


@dataclass
class DemoProject:
    """The requester's side of the demo: its API client, its project, the oracle, the crowd."""

    api: Api
    pid: int
    oracle: Oracle
    members: list[Member] = field(default_factory=list)
    qualification_answers: int = 0


def setup_project(
    plan: Plan, settings: Settings, server: Server, database: Database, dataset: Dataset
) -> DemoProject:
    """Key (as ``maskmill create-key`` makes one), project, images, seed and held-out truth."""
    with database.session() as session:
        _, key = create_api_key(session, "demo")
        session.commit()
    api = Api(server.url, key)
    project = api.post(
        "/api/v1/projects",
        {"name": "maskmill demo", "classes": list(plan.classes), "params": plan.policy},
    )
    pid = project["id"]
    entries = [
        {
            "file_name": image["file_name"],
            "uri": f"synthetic/images/{image['file_name']}",
            "width": image["width"],
            "height": image["height"],
        }
        for split in ("seed", "heldout", "pool")
        for image in json.loads(dataset.files[split].read_text())["images"]
    ]
    images = api.post(f"/api/v1/projects/{pid}/images", {"images": entries})["images"]
    for split in ("seed", "heldout"):
        api.post(
            f"/api/v1/projects/{pid}/ground-truth?split={split}",
            json.loads(dataset.files[split].read_text()),
        )
    oracle = Oracle(
        database,
        settings,
        dataset,
        image_names={i["id"]: i["file_name"] for i in images},
        class_names={c["id"]: c["name"] for c in project["classes"]},
        k_iou=float(project["params"]["k_iou"]),
    )
    return DemoProject(api, pid, oracle)


def run_round_and_campaign(
    demo: DemoProject,
    plan: Plan,
    number: int,
    seed: int,
    progress: Progress,
    timings: dict[str, float],
) -> tuple[dict[str, Any], CampaignRun]:
    """``POST /rounds``, wait for it, then verify its clusters with a budgeted campaign."""
    api, pid = demo.api, demo.pid
    steps, budget = plan.steps[number - 1], plan.budgets_usd[number - 1]
    print(f"round {number}: train ({steps} steps) -> detect -> cluster")
    mark = time.perf_counter()
    body: dict[str, Any] = {
        "detect": True,
        "steps": steps,
        "batch_size": plan.batch_size,
        "checkpoint_every": max(steps // 4, 1),
        "seed": seed,
    }
    if number == 1:
        body["model"] = plan.model  # later rounds continue from the previous round's model
    api.post(f"/api/v1/projects/{pid}/rounds", body)
    state = wait_for_round(api, pid, number, progress)
    timings[f"round{number}_pipeline"] = time.perf_counter() - mark

    mark = time.perf_counter()
    campaign = api.post(
        f"/api/v1/projects/{pid}/campaigns",
        {
            "budget_usd": budget,
            "backend": "local",
            "reward_per_hit_usd": plan.reward_per_hit_usd,
            "questions_per_hit": plan.questions_per_hit,
            "gold_per_hit": plan.gold_per_hit,
            "round_id": state["id"],
        },
    )
    if not demo.members:  # invited and qualified once, for the whole project
        for spec in plan.workers:
            invite = api.post(f"/api/v1/projects/{pid}/workers")
            member = Member(spec, invite["token"], invite["worker_id"])
            demo.qualification_answers += qualify(api, member, demo.oracle)
            demo.members.append(member)
    run = CampaignRun(number, campaign["id"], budget)
    run_crowd(api, run, demo.members, demo.oracle, plan, progress)
    timings[f"round{number}_crowd"] = time.perf_counter() - mark
    return api.get(f"/api/v1/projects/{pid}/rounds/{number}"), run


def summarise(
    demo: DemoProject,
    plan: Plan,
    rounds: list[dict[str, Any]],
    runs: list[CampaignRun],
    timings: dict[str, float],
    workdir: Path,
) -> dict[str, Any]:
    """Export, plot, and the numbers of the summary."""
    api, pid = demo.api, demo.pid
    export = api.get(f"/api/v1/projects/{pid}/export?format=coco")
    export_path = workdir / "export.coco.json"
    export_path.write_text(json.dumps(export), encoding="utf-8")
    quality = export_quality(export, demo.oracle)
    plot_path = workdir / "progress.png"
    write_plot(plot_path, runs, rounds)

    answers = sum(r.answers for r in runs) + demo.qualification_answers
    blocked = {
        w["id"] for w in api.get(f"/api/v1/projects/{pid}/workers")["workers"] if w["blocked"]
    }
    # A wrong accepted mask saves no drawing: it would have to be drawn anyway.
    manual = quality["correct_masks"] * MANUAL_SECONDS_PER_MASK
    verification = answers * SECONDS_PER_QUESTION
    members = demo.members
    summary = {
        "mode": plan.name,
        "project_id": pid,
        "dataset": {
            "image_size": plan.image_size,
            "classes": list(plan.classes),
            "seed_images": plan.seed_images,
            "heldout_images": plan.heldout_images,
            "pool_images": plan.pool_images,
        },
        "rounds": [
            _round_summary(r, run, timings, demo.oracle.detection_quality(r["id"]))
            for r, run in zip(rounds, runs, strict=True)
        ],
        "accepted_masks": quality["accepted_masks"],
        "quality": quality,
        "questions": {
            "sample_answered": sum(r.final["questions"]["answered"] for r in runs),
            "all_answers": answers,
        },
        "cost_usd": round(sum(r.final["spent_usd"] for r in runs), 2),
        "workers": {
            "honest": sum(not m.spec.spammer for m in members),
            "spammers": sum(m.spec.spammer for m in members),
            "spammers_blocked": sum(m.spec.spammer and m.worker_id in blocked for m in members),
            "honest_blocked": sum((not m.spec.spammer) and m.worker_id in blocked for m in members),
        },
        "speedup_vs_manual": {
            "manual_seconds_per_mask": MANUAL_SECONDS_PER_MASK,
            "seconds_per_answer": SECONDS_PER_QUESTION,
            "masks_counted": quality["correct_masks"],
            "manual_hours": round(manual / 3600, 3),
            "verification_hours": round(verification / 3600, 3),
            "factor": round(manual / verification, 2) if verification else None,
        },
        "files": {"export": str(export_path), "plot": str(plot_path)},
    }
    summary["caveats"] = caveats(summary)
    return summary


def _round_summary(
    state: dict[str, Any],
    run: CampaignRun,
    timings: dict[str, float],
    detected: dict[str, Any],
) -> dict[str, Any]:
    training = state["training"]
    return {
        "number": state["number"],
        "ap": state["ap"],
        "train_steps": training.get("steps"),
        "train_init": training.get("init"),
        "train_masks": {
            "seed": training.get("seed_masks"),
            "accepted": training.get("accepted_masks"),
        },
        "masks_detected": state["counts"]["masks"],
        "detected": detected,
        "clusters": state["counts"]["clusters"],
        "accepted_masks": state["counts"]["accepted_masks"],
        "pipeline_seconds": round(timings[f"round{state['number']}_pipeline"], 1),
        "campaign": {
            "id": run.campaign_id,
            "status": run.final["status"],
            "budget_usd": run.budget_usd,
            "spent_usd": run.final["spent_usd"],
            "hits": run.hits,
            "questions_answered": run.final["questions"]["answered"],
            "crowd_seconds": round(run.seconds, 1),
        },
    }


def _settings(workdir: Path, url: str) -> Settings:
    return Settings(
        database_url=f"sqlite:///{workdir / 'maskmill.db'}",
        redis_url="",
        storage_url=str(workdir / "storage"),
        image_root=str(workdir / "images"),
        public_url=url,
        job_retry_delays=(1,),
        log_level="WARNING",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    timings: dict[str, float] = {}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.out or Path("var") / f"demo-{stamp}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port(args.host)
    settings = _settings(workdir, f"http://{args.host}:{port}")
    settings.ensure_local_dirs()
    print(f"maskmill demo ({plan.name}) in {workdir}")

    migrate.upgrade(settings.database_url)
    mark = time.perf_counter()
    dataset = make_dataset(plan, Path(settings.image_root), args.seed)
    timings["dataset"] = time.perf_counter() - mark
    pool_objects = dataset.objects("pool")
    print(
        f"  synthetic data: {plan.seed_images} seed, {plan.heldout_images} held-out and "
        f"{plan.pool_images} pool images of {plan.image_size} px, {len(plan.classes)} classes, "
        f"{pool_objects} objects in the pool"
    )

    server = Server(settings, args.host, port).start()
    database = Database(settings.database_url)
    progress = Progress()
    try:
        demo = setup_project(plan, settings, server, database, dataset)
        rounds, runs = [], []
        for number in range(1, len(plan.steps) + 1):
            state, campaign = run_round_and_campaign(
                demo, plan, number, args.seed, progress, timings
            )
            rounds.append(state)
            runs.append(campaign)
        mark = time.perf_counter()
        summary = summarise(demo, plan, rounds, runs, timings, workdir)
        timings["export"] = time.perf_counter() - mark
    except BaseException:
        server.stop()
        database.dispose()
        raise
    summary["dataset"]["pool_objects"] = pool_objects
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["stage_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    summary["server"] = server.url
    summary_path = workdir / "summary.json"
    summary["files"]["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _print_summary(summary)
    database.dispose()
    if args.no_serve:
        server.stop()
    else:
        _serve_forever(server, demo.api, demo.pid)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    quality = summary["quality"]
    speed = summary["speedup_vs_manual"]
    print("\nsummary")
    for r in summary["rounds"]:
        print(
            f"  round {r['number']}: held-out mask AP {r['ap']}, {r['masks_detected']} masks "
            f"detected ({r['detected']['correct']} correct), {r['accepted_masks']} accepted, "
            f"{r['campaign']['questions_answered']} questions, ${r['campaign']['spent_usd']:.2f}"
        )
    print(
        f"  dataset: {quality['accepted_masks']} accepted masks (one per object) of "
        f"{summary['dataset']['pool_objects']} objects in the pool; mean IoU "
        f"{quality['mean_iou']}, {quality['correct_masks']} correct (IoU >= {quality['k_iou']}), "
        f"{quality['wrong_masks']} wrong"
    )
    print(
        f"  crowd: {summary['questions']['all_answers']} answers "
        f"({summary['questions']['sample_answered']} on sampled masks), "
        f"${summary['cost_usd']:.2f}; spammers blocked "
        f"{summary['workers']['spammers_blocked']}/{summary['workers']['spammers']}"
    )
    print(
        f"  speed-up vs manual polygons ({speed['manual_seconds_per_mask']:.0f} s/mask, "
        f"{speed['masks_counted']} correct masks): {speed['factor']}x "
        f"({speed['manual_hours']} h by hand vs {speed['verification_hours']} h of yes/no "
        f"answers at {speed['seconds_per_answer']} s)"
    )
    for note in summary["caveats"]:
        print(f"  note: {note}")
    print(f"  took {summary['seconds']:.0f} s")
    for name, path in summary["files"].items():
        print(f"  {name}: {path}")


def _serve_forever(server: Server, api: Api, project_id: int) -> None:
    """Invite a person and keep serving until Ctrl-C, with a small campaign over what is left."""
    invite = api.post(f"/api/v1/projects/{project_id}/workers")
    campaign = api.post(
        f"/api/v1/projects/{project_id}/campaigns",
        {
            "budget_usd": 1.0,
            "backend": "local",
            "reward_per_hit_usd": 0.05,
            "questions_per_hit": 20,
            "gold_per_hit": 3,
        },
    )
    print(
        "\nThe server keeps running. Try the worker's page (a short qualification test first):\n"
        f"  {invite['url']}\n"
        f"Campaign {campaign['id']} offers whatever is still unverified "
        f"(status: {campaign['status']}). Requester dashboard: {server.url}/dashboard\n"
        f"  with this demo's API key: {api.key}\n"
        "Press Ctrl-C to stop."
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="maskmill end to end on synthetic data: train, detect, cluster, crowd-verify "
        "(simulated workers, spammers included) for two rounds, then export and summarise.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced run for CI (tiny model)")
    parser.add_argument("--no-serve", action="store_true", help="exit instead of serving")
    parser.add_argument("--out", type=Path, help="work directory (default var/demo-<time>)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic data and training seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        run(args)
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
