"""The verification policy: truth tables, curtailment = paper, sequential test, sampling."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.policy import (
    AUTO_CODE_ACTIONS,
    SEQUENTIAL_BATCH,
    Action,
    Decision,
    PolicyParams,
    auto_action,
    auto_action_codes,
    decide,
    posterior_probabilities,
    prior_mean,
    sample_positions,
    threshold_action,
)

P = PolicyParams()  # paper defaults: N_s=15, K_a=0.85, K_pa=0.7, K_pr=0.0
ABOVE = 0.9  # a score above K_pa: humans are asked


# --------------------------------------------------------------------------------------------
# truth tables


@pytest.mark.parametrize(
    ("score", "size", "yes", "no", "params", "expected"),
    [
        # automatic rules
        (0.0, 100, 0, 0, P, Decision(Action.AUTO_REJECT)),  # S == K_pr
        (-0.3, 100, 0, 0, P, Decision(Action.AUTO_REJECT)),  # S < K_pr
        (0.2, 3, 0, 0, PolicyParams(k_pr=0.2), Decision(Action.AUTO_REJECT)),  # S == K_pr, tiny
        (math.nextafter(0.0, 1), 16, 0, 0, P, Decision(Action.AUTO_SPLIT)),  # just above K_pr
        (0.7, 16, 0, 0, P, Decision(Action.AUTO_SPLIT)),  # S == K_pa, size == N_s + 1
        (0.7, 15, 0, 0, P, Decision(Action.AUTO_REJECT)),  # S == K_pa, size == N_s
        (0.5, 1, 0, 0, P, Decision(Action.AUTO_REJECT)),  # a single weak mask
        (0.5, 16, 9, 3, P, Decision(Action.AUTO_SPLIT)),  # answers never override the rules
        # small clusters just above K_pa
        (math.nextafter(0.7, 1), 14, 0, 0, P, Decision(Action.ASK, 14)),  # ask_all: every mask
        (ABOVE, 14, 0, 0, PolicyParams(small_clusters="skip"), Decision(Action.SKIP)),
        (ABOVE, 15, 0, 0, PolicyParams(small_clusters="skip"), Decision(Action.ASK, 15)),
        (ABOVE, 14, 12, 2, P, Decision(Action.ACCEPT)),  # 12/14 = 0.857 >= 0.85
        (ABOVE, 14, 11, 3, P, Decision(Action.SPLIT)),  # 11/14 = 0.786
        (ABOVE, 14, 1, 13, P, Decision(Action.REJECT)),
        # the paper's decision on N_s = 15 answers
        (ABOVE, 1000, 0, 0, P, Decision(Action.ASK, 15)),
        (ABOVE, 1000, 7, 3, P, Decision(Action.ASK, 5)),
        (ABOVE, 1000, 13, 2, P, Decision(Action.ACCEPT)),  # 13/15 >= 0.85
        (ABOVE, 1000, 12, 3, P, Decision(Action.SPLIT)),  # 12/15 = 0.8
        (ABOVE, 1000, 3, 12, P, Decision(Action.SPLIT)),  # 3/15 = 0.2 > 0.15
        (ABOVE, 1000, 2, 13, P, Decision(Action.REJECT)),
        (ABOVE, 1000, 8, 7, P, Decision(Action.SPLIT)),
        # exact boundaries: Q~ == K_a accepts, Q~ == 1 - K_a rejects
        (ABOVE, 1000, 17, 3, PolicyParams(n_s=20), Decision(Action.ACCEPT)),  # 17/20 == 0.85
        (ABOVE, 1000, 16, 4, PolicyParams(n_s=20), Decision(Action.SPLIT)),
        (ABOVE, 1000, 3, 17, PolicyParams(n_s=20), Decision(Action.REJECT)),  # 3/20 == 0.15
        (ABOVE, 1000, 4, 16, PolicyParams(n_s=20), Decision(Action.SPLIT)),
        # 3/15 == 1 - 0.8 exactly, but 3/15 <= 1 - 0.8 is False in floating point
        (ABOVE, 1000, 3, 12, PolicyParams(k_a=0.8), Decision(Action.REJECT)),
        # 14/25 == 0.56 exactly, but 14 >= 25 * 0.56 is False in floating point
        (ABOVE, 1000, 14, 11, PolicyParams(k_a=0.56, n_s=25), Decision(Action.ACCEPT)),
        (ABOVE, 1000, 15, 0, PolicyParams(k_a=1.0), Decision(Action.ACCEPT)),
        (ABOVE, 1000, 14, 1, PolicyParams(k_a=1.0), Decision(Action.SPLIT)),
        (ABOVE, 1000, 0, 15, PolicyParams(k_a=1.0), Decision(Action.REJECT)),
        # a leaf decides on its one answer; it can never be split
        (ABOVE, 1, 0, 0, P, Decision(Action.ASK, 1)),
        (ABOVE, 1, 1, 0, P, Decision(Action.ACCEPT)),
        (ABOVE, 1, 0, 1, P, Decision(Action.REJECT)),
        (ABOVE, 1, 1, 0, PolicyParams(variant="curtailed"), Decision(Action.ACCEPT)),
        (ABOVE, 1, 0, 1, PolicyParams(variant="sequential"), Decision(Action.REJECT)),
    ],
)
def test_truth_table(score, size, yes, no, params, expected):
    assert decide(score, size, yes, no, params) == expected


def test_threshold_action_matches_rational_definition():
    for k_a in (0.51, 0.55, 0.6, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0):
        frac = Fraction(repr(k_a))
        params = PolicyParams(k_a=k_a)
        for n in range(1, 41):
            for yes in range(n + 1):
                q = Fraction(yes, n)
                want = (
                    Action.ACCEPT if q >= frac else Action.REJECT if q <= 1 - frac else Action.SPLIT
                )
                assert threshold_action(yes, n - yes, 1000, params) is want, (k_a, n, yes)


def test_auto_action_boundaries_and_vectorised_codes_agree():
    rng = np.random.default_rng(3)
    for params in (
        P,
        PolicyParams(k_pr=0.3, k_pa=0.5, small_clusters="skip"),
        PolicyParams(k_pr=0.5, k_pa=0.5, n_s=4),
    ):
        scores = np.concatenate([rng.random(500), [params.k_pr, params.k_pa, 0.0, 1.0]])
        sizes = np.concatenate([rng.integers(1, 40, 500), [params.n_s, params.n_s + 1, 1, 1]])
        codes = auto_action_codes(scores, sizes, params)
        for s, z, c in zip(scores, sizes, codes, strict=True):
            assert auto_action(float(s), int(z), params) is AUTO_CODE_ACTIONS[c]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((float("nan"), 10, 0, 0), "score"),
        ((0.9, 0, 0, 0), "size"),
        ((0.9, 10, -1, 0), "answer counts"),
        ((0.9, 10, 6, 5), "exceed the cluster size"),
        ((0.5, 10, 6, 5), "exceed the cluster size"),  # checked even when an auto rule applies
        ((0.9, 10, 1.0, 0), "answer counts"),
    ],
)
def test_decide_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        decide(*args, P)


# --------------------------------------------------------------------------------------------
# parameters


def test_params_round_trip_through_json():
    params = PolicyParams(
        n_s=10,
        k_a=0.9,
        k_pa=0.6,
        k_pr=0.1,
        small_clusters="skip",
        variant="sequential",
        prior_map=((0.2, 0.1), (0.9, 0.95)),
        max_questions=25,
        reuse_parent_answers=False,
    )
    again = PolicyParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params
    assert PolicyParams.from_dict({}) == PolicyParams()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"n_s": 0}, "n_s"),
        ({"n_s": 2.5}, "n_s"),
        ({"n_s": True}, "n_s"),
        ({"k_a": 0.5}, "k_a"),
        ({"k_a": 1.2}, "k_a"),
        ({"k_a": 0.0}, "k_a"),
        ({"k_a": float("nan")}, "k_a"),
        ({"k_a": "0.9"}, "k_a"),
        ({"k_iou": 0.0}, "k_iou"),
        ({"k_pr": 0.8, "k_pa": 0.7}, "k_pr"),
        ({"k_pa": float("inf")}, "k_pa"),
        ({"small_clusters": "drop"}, "small_clusters"),
        ({"variant": "fast"}, "variant"),
        ({"error_rate": 0.5}, "error_rate"),
        ({"prior_strength": 0}, "prior_strength"),
        ({"max_questions": 0}, "max_questions"),
        ({"min_answers": 0}, "min_answers"),
        ({"reuse_parent_answers": 1}, "reuse_parent_answers"),
        ({"variant": "sequential", "k_a": 1.0}, "k_a"),
        ({"prior_map": [[0.5, 0.2], [0.4, 0.9]]}, "prior_map"),
        ({"prior_map": [[0.5, 1.2]]}, "prior_map"),
        ({"prior_map": [[0.5]]}, "prior_map"),
        ({"prior_map": []}, "prior_map"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_params_validation_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        PolicyParams.from_dict(data)


def test_params_from_dict_needs_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        PolicyParams.from_dict([("n_s", 3)])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# curtailed == paper


def _run_policy(answers: list[bool], size: int, params: PolicyParams) -> tuple[Action, int]:
    """Feed an answer sequence to the policy in the batches it asks for."""
    yes = no = used = 0
    while True:
        d = decide(ABOVE, size, yes, no, params)
        if d.action is not Action.ASK:
            return d.action, used
        assert d.more >= 1
        assert used + d.more <= len(answers), "asked for more answers than the paper would"
        batch = answers[used : used + d.more]
        used += d.more
        yes += sum(batch)
        no += len(batch) - sum(batch)


@settings(max_examples=400, deadline=None)
@given(
    n_s=st.integers(1, 30),
    k_a=st.one_of(
        st.floats(0.5, 1.0, exclude_min=True),
        st.integers(51, 100).map(lambda c: c / 100),
    ),
    size=st.integers(1, 60),
    data=st.data(),
)
def test_curtailed_decides_like_paper_with_no_more_questions(n_s, k_a, size, data):
    answers = data.draw(st.lists(st.booleans(), min_size=min(n_s, size), max_size=min(n_s, size)))
    paper = PolicyParams(n_s=n_s, k_a=k_a, variant="paper")
    curtailed = PolicyParams(n_s=n_s, k_a=k_a, variant="curtailed")
    decision_p, used_p = _run_policy(answers, size, paper)
    decision_c, used_c = _run_policy(answers, size, curtailed)
    assert decision_c is decision_p
    assert used_p == min(n_s, size)
    assert used_c <= used_p


def _settled(yes: int, no: int, size: int, params: PolicyParams) -> bool:
    return decide(ABOVE, size, yes, no, params).action is not Action.ASK


@settings(max_examples=300, deadline=None)
@given(
    n_s=st.integers(1, 20),
    k_a=st.integers(51, 100).map(lambda c: c / 100),
    yes=st.integers(0, 20),
    no=st.integers(0, 20),
)
def test_curtailed_more_is_the_fewest_answers_that_could_settle(n_s, k_a, yes, no):
    params = PolicyParams(n_s=n_s, k_a=k_a, variant="curtailed")
    size = 1000
    if yes + no > n_s:
        return
    d = decide(ABOVE, size, yes, no, params)
    if d.action is not Action.ASK:
        return
    # No way to settle with fewer answers; some way with exactly ``more``.
    for k in range(1, d.more):
        assert not any(_settled(yes + j, no + k - j, size, params) for j in range(k + 1))
    assert any(_settled(yes + j, no + d.more - j, size, params) for j in range(d.more + 1))


def test_curtailment_saves_questions_on_clear_clusters():
    assert _run_policy([True] * 15, 1000, PolicyParams(variant="curtailed")) == (Action.ACCEPT, 13)
    assert _run_policy([False] * 15, 1000, PolicyParams(variant="curtailed")) == (
        Action.REJECT,
        13,
    )
    # Alternating answers: once both sides have 3 of at most 15, neither can reach 13.
    mixed = [True, False] * 8
    assert _run_policy(mixed[:15], 1000, PolicyParams(variant="curtailed")) == (Action.SPLIT, 6)


# --------------------------------------------------------------------------------------------
# sequential


SEQ = PolicyParams(variant="sequential")


def _simulate_sequential(
    q: float, score: float, size: int, params: PolicyParams, rng: np.random.Generator
) -> tuple[Action, int]:
    """Answers drawn without replacement from a cluster with ``round(q * size)`` correct masks."""
    labels = np.zeros(size, dtype=bool)
    labels[: round(q * size)] = True
    labels = rng.permutation(labels)
    yes = no = 0
    while True:
        d = decide(score, size, yes, no, params)
        if d.action is not Action.ASK:
            return d.action, yes + no
        assert 1 <= d.more <= SEQUENTIAL_BATCH
        batch = labels[yes + no : yes + no + d.more]
        yes += int(batch.sum())
        no += int(d.more - batch.sum())


#: A calibrated map as :mod:`service.engine.calibrate` would produce: scores between 0.7 and
#: 0.8 hold mostly bad clusters, scores near 1 mostly good ones.
CALIBRATED = PolicyParams(variant="sequential", prior_map=((0.7, 0.05), (0.8, 0.3), (1.0, 0.95)))


@pytest.mark.parametrize(
    ("q", "score", "params", "expected"),
    [
        (0.98, 0.95, SEQ, Action.ACCEPT),  # clearly good, score agrees
        (0.98, 0.95, CALIBRATED, Action.ACCEPT),
        (0.02, 0.72, CALIBRATED, Action.REJECT),  # clearly bad, calibrated prior agrees
        (0.5, 0.8, SEQ, Action.SPLIT),  # clearly mixed
        (0.5, 0.8, CALIBRATED, Action.SPLIT),
    ],
)
def test_sequential_stops_early_and_is_right_on_clear_clusters(q, score, params, expected):
    rng = np.random.default_rng(11)
    trials = 300
    outcomes = [_simulate_sequential(q, score, 2000, params, rng) for _ in range(trials)]
    right = sum(a is expected for a, _ in outcomes)
    mean_questions = sum(n for _, n in outcomes) / trials
    assert right / trials >= 0.95
    assert mean_questions < params.n_s  # fewer than the paper's fixed 15


def test_sequential_is_stricter_than_the_paper_rule():
    # A 95% posterior test needs more evidence than the paper's point estimate: with the
    # identity prior a clearly bad cluster scored 0.75 takes more than 15 answers to reject
    # (but is still rejected correctly), where curtailment needs 13. The cap is raised so the
    # posterior test, not the fallback to the paper rule at N_s answers, decides.
    rng = np.random.default_rng(12)
    uncapped = dataclasses.replace(SEQ, max_questions=60)
    outcomes = [_simulate_sequential(0.02, 0.75, 2000, uncapped, rng) for _ in range(100)]
    assert sum(a is Action.REJECT for a, _ in outcomes) >= 95
    assert min(n for _, n in outcomes) > 15


def test_sequential_never_decides_on_the_prior_alone():
    # The prior at S = 0.98 alone already puts P(Q >= K_a) over 1 - error_rate...
    p_acc, _, _ = posterior_probabilities(0.98, 0, 0, SEQ)
    assert p_acc >= 1 - SEQ.error_rate
    # ...but at least ``min_answers`` human answers are required.
    assert decide(0.98, 500, 0, 0, SEQ) == Decision(Action.ASK, SEQ.min_answers)
    assert decide(0.98, 500, 2, 0, SEQ).action is Action.ASK
    assert decide(0.98, 500, 3, 0, SEQ).action is Action.ACCEPT


def test_sequential_falls_back_to_paper_rule_at_the_cap():
    params = PolicyParams(variant="sequential", max_questions=4)
    p_acc, _, _ = posterior_probabilities(0.72, 4, 0, params)
    assert p_acc < 1 - params.error_rate  # the posterior alone would keep asking
    assert decide(0.72, 500, 3, 0, params) == Decision(Action.ASK, 1)
    assert decide(0.72, 500, 4, 0, params) == Decision(Action.ACCEPT)  # 4/4 >= 0.85
    assert decide(0.72, 500, 3, 1, params) == Decision(Action.SPLIT)  # 3/4 < 0.85
    assert PolicyParams(variant="sequential").sequential_cap == 15


def test_sequential_decides_exactly_once_every_mask_is_answered():
    # A 4-mask cluster fully answered: Q is known, no posterior needed.
    assert decide(0.75, 4, 3, 1, SEQ) == Decision(Action.SPLIT)
    assert decide(0.75, 4, 4, 0, SEQ) == Decision(Action.ACCEPT)


@settings(max_examples=300, deadline=None)
@given(
    params=st.sampled_from(
        [
            SEQ,
            CALIBRATED,
            PolicyParams(variant="sequential", prior_strength=30.0, k_a=0.9, error_rate=0.1),
            PolicyParams(variant="sequential", prior_strength=0.5, min_answers=1),
        ]
    ),
    score=st.floats(0.71, 1.0),
    yes=st.integers(0, 29),
    no=st.integers(0, 29),
)
def test_sequential_more_is_a_small_batch_that_could_settle(params, score, yes, no):
    if yes + no >= params.sequential_cap:
        return
    d = decide(score, 10_000, yes, no, params)
    if d.action is not Action.ASK:
        return
    assert 1 <= d.more <= SEQUENTIAL_BATCH

    def could_settle(k: int) -> bool:
        return any(
            decide(score, 10_000, yes + j, no + k - j, params).action is not Action.ASK
            for j in range(k + 1)
        )

    # Brute force over every split of k answers: ``more`` is the first k that could end the
    # test, or a full batch when none below it could.
    assert not any(could_settle(k) for k in range(1, d.more))
    if d.more < SEQUENTIAL_BATCH:
        assert could_settle(d.more)


def test_prior_mean_identity_clipped_and_calibrated_map():
    assert prior_mean(0.5, SEQ) == 0.5
    assert prior_mean(1.0, SEQ) == 0.98
    assert prior_mean(-1.0, SEQ) == 0.02
    mapped = PolicyParams(variant="sequential", prior_map=((0.7, 0.2), (0.9, 0.8)))
    assert prior_mean(0.8, mapped) == pytest.approx(0.5)
    assert prior_mean(0.95, mapped) == pytest.approx(0.8)  # flat beyond the last knot
    # A stronger prior in the same direction decides sooner.
    strong = PolicyParams(variant="sequential", prior_strength=20.0)
    assert (
        posterior_probabilities(0.95, 3, 0, strong)[0] > posterior_probabilities(0.95, 3, 0, SEQ)[0]
    )


# --------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize(("lo", "hi", "k"), [(0, 10, 10), (5, 25, 7), (100, 1_000_000, 15)])
def test_sample_positions_are_distinct_in_range_and_respect_exclude(lo, hi, k):
    rng = np.random.default_rng(0)
    exclude = [lo, lo + 1, hi + 5] if hi - lo > k + 2 else []
    got = sample_positions(lo, hi, k, rng, exclude=exclude)
    assert got.dtype == np.int64
    assert got.shape == (k,)
    assert len(set(got.tolist())) == k
    assert ((got >= lo) & (got < hi)).all()
    assert not set(got.tolist()) & set(exclude)
    again = sample_positions(lo, hi, k, np.random.default_rng(0), exclude=exclude)
    assert np.array_equal(got, again)


@pytest.mark.parametrize("hi", [12, 400])  # dense and sparse code paths
def test_sample_positions_are_uniform(hi):
    rng = np.random.default_rng(5)
    counts = np.zeros(hi, dtype=np.int64)
    first = np.zeros(hi, dtype=np.int64)
    draws = 6000
    for _ in range(draws):
        got = sample_positions(0, hi, 3, rng, exclude=[0])
        counts[got] += 1
        first[got[0]] += 1
    assert counts[0] == 0
    expected = draws * 3 / (hi - 1)
    # chi-square with hi - 2 dof; the bound is > 6 standard deviations above the mean
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    dof = hi - 2
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    expected_first = draws / (hi - 1)
    chi2_first = float(((first[1:] - expected_first) ** 2 / expected_first).sum())
    assert chi2_first < dof + 6 * math.sqrt(2 * dof)


def test_sample_positions_rejects_impossible_requests():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot sample"):
        sample_positions(0, 5, 5, rng, exclude=[2])
    with pytest.raises(ValueError, match="invalid range"):
        sample_positions(5, 2, 1, rng)
    with pytest.raises(ValueError, match="k must be"):
        sample_positions(0, 5, -1, rng)
    assert sample_positions(3, 3, 0, rng).shape == (0,)
