"""Metric functions against values computed by hand (and scikit-learn), bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from userfm.eval import metrics as M


def test_hr_and_ndcg_at_10_three_users_by_hand():
    # 12 items. User 0: target (item 3) scored highest -> rank 0. User 1: two items above the target
    # -> rank 2. User 2: ten items above -> rank 10, outside the top 10.
    scores = np.zeros((3, 12))
    scores[0] = np.linspace(0, 1, 12)[::-1]  # item 0 best ... item 11 worst
    scores[0, 3] = 2.0
    scores[1] = np.arange(12) / 12.0  # item 11 best
    target1 = 9  # items 10 and 11 score higher
    scores[2] = np.arange(12) / 12.0
    target2 = 1  # items 2..11 score higher: 10 of them
    ranks = M.target_rank(scores, np.array([3, target1, target2]))
    assert ranks.tolist() == [0, 2, 10]
    assert M.hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)
    # NDCG: (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3
    assert M.ndcg_at_k(ranks, 10) == pytest.approx(0.5)
    # Excluding 3 of user 2's higher-scored items (e.g. already seen) moves it to rank 7: 1/log2(9).
    exclude = np.zeros((3, 12), bool)
    exclude[2, [9, 10, 11]] = True
    exclude[2, target2] = True  # the target itself is never excluded
    r2 = M.target_rank(scores, np.array([3, target1, target2]), exclude)
    assert r2.tolist() == [0, 2, 7]
    assert M.ndcg_at_k(r2, 10) == pytest.approx((1 + 0.5 + 1 / math.log2(9)) / 3)


def test_ties_count_against_the_target():
    ranks = M.target_rank(np.ones((2, 5)), np.array([0, 4]))
    assert ranks.tolist() == [4, 4]  # a constant scorer gets the worst rank, never a hit at k < 5
    assert M.hit_rate_at_k(ranks, 4) == 0.0


def test_auc_tiny_examples():
    # 4 (pos, neg) pairs: 0.35 < 0.4 is the only misordered one -> 3/4
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: (0.5 + 1 + 1 + 1) / 4
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_macro_f1_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    # class 0: TP 1 FP 1 FN 1 -> 0.5; class 1: TP 2 FP 1 -> 0.8; class 2: TP 1 FN 1 -> 2/3
    assert M.macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never true nor predicted is skipped; one predicted but never true contributes 0
    assert M.macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_accuracy_log_loss_rmse_by_hand():
    assert M.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert M.log_loss([0, 1], [[0.8, 0.2], [0.4, 0.6]]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert M.log_loss([1, 0], np.array([0.6, 0.2])) == pytest.approx(-(math.log(0.6) + math.log(0.8)) / 2)
    assert math.isfinite(M.log_loss([0], [[0.0, 1.0]]))  # clipped, not inf
    assert M.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))


def test_compute_from_head_output_matches_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    proba = rng.dirichlet(np.ones(3), 200)
    assert M.compute("accuracy", y, proba) == pytest.approx(skm.accuracy_score(y, proba.argmax(1)))
    assert M.compute("macro_f1", y, proba) == pytest.approx(skm.f1_score(y, proba.argmax(1), average="macro"))
    assert M.compute("log_loss", y, proba) == pytest.approx(skm.log_loss(y, proba, labels=[0, 1, 2]))
    yb = rng.integers(0, 2, 200)
    pb = rng.random(200)
    pb[:50] = np.round(pb[:50], 1)  # plenty of ties
    assert M.compute("auc", yb, np.stack([1 - pb, pb], 1)) == pytest.approx(skm.roc_auc_score(yb, pb))
    with pytest.raises(ValueError, match="binary"):
        M.compute("auc", y, proba)
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute("f2", y, proba)


def test_bootstrap_interval_of_a_mean_has_the_textbook_width_and_is_seeded():
    x = np.random.default_rng(1).normal(0.0, 1.0, 400)
    point, lo, hi = M.bootstrap_interval(np.mean, [x], n_samples=2000, seed=3)
    assert point == pytest.approx(x.mean())
    assert lo < point < hi
    # normal theory: 2 * 1.96 * sd / sqrt(n) = 0.196 for sd 1, n 400
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)
    assert M.bootstrap_interval(np.mean, [x], n_samples=200, seed=3) == M.bootstrap_interval(np.mean, [x], n_samples=200, seed=3)
    assert M.bootstrap_interval(np.mean, [x], n_samples=200, seed=3) != M.bootstrap_interval(np.mean, [x], n_samples=200, seed=4)


def test_paired_difference_is_narrower_than_unpaired_when_users_vary():
    rng = np.random.default_rng(2)
    user = rng.normal(0, 5, 300)  # large per-user variation shared by both models
    a, b = user + 0.3 + rng.normal(0, 0.1, 300), user + rng.normal(0, 0.1, 300)
    d, lo, hi = M.bootstrap_difference(np.mean, [a], [b], paired=True, n_samples=500, seed=0)
    du, lou, hiu = M.bootstrap_difference(np.mean, [a], [b], paired=False, n_samples=500, seed=0)
    assert d == pytest.approx(du) == pytest.approx(np.mean(a - b))
    assert lo > 0.2 and hi < 0.4  # paired: the shared variation cancels
    assert lou < 0 < hiu  # unpaired: swamped by user variation
    assert (hi - lo) < (hiu - lou) / 10


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 19 + [1])
    s = np.linspace(0, 1, 20)
    point, lo, hi = M.bootstrap_interval(M.roc_auc, [y, s], n_samples=300, seed=0)
    assert point == 1.0 and lo == 1.0 and hi == 1.0  # resamples without the positive are dropped


def test_compute_reads_ranks_for_retrieval_metrics():
    # The 3-user example above through the evaluate entry point: ranks 0, 2 and 10.
    ranks = np.array([0, 2, 10])
    assert M.compute("hr@10", None, ranks) == pytest.approx(2 / 3)
    assert M.compute("ndcg@10", None, ranks) == pytest.approx(0.5)
    assert M.compute("hr@3", None, ranks) == pytest.approx(2 / 3) and M.compute("hr@2", None, ranks) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="ranks"):
        M.compute("hr@10", None, np.zeros((3, 12)))


def _metric_cases(n: int = 60):
    """(metric, y, per-seed scores) with ties in the scores: every metric evaluate reports."""
    rng = np.random.default_rng(7)
    y2 = rng.integers(0, 2, n)
    p1 = np.round(rng.random(n), 1)  # ties across classes
    p = np.stack([1 - p1, p1], axis=1)
    y4 = rng.integers(0, 4, n)
    p4 = rng.dirichlet(np.ones(4), n)
    ranks = rng.integers(0, 25, n)
    return [("auc", y2, [p, p[::-1].copy()]), ("accuracy", y4, [p4]), ("macro_f1", y4, [p4, np.roll(p4, 5, axis=0)]),
            ("log_loss", y4, [p4]), ("rmse", rng.normal(size=n), [rng.normal(size=n)]),
            ("hr@10", np.zeros(n), [ranks]), ("ndcg@10", np.zeros(n), [ranks, ranks[::-1].copy()])]


@pytest.mark.parametrize("case", range(7))
def test_weighted_metric_of_row_counts_is_the_metric_of_the_resample(case):
    name, y, scores = _metric_cases()[case]
    rng = np.random.default_rng(case)
    idx = rng.integers(0, len(y), (5, len(y)))
    w = np.stack([np.bincount(i, minlength=len(y)) for i in idx])
    got = M.weighted_metric(name, y, scores[0], w)
    want = [M.compute(name, y[i], scores[0][i]) for i in idx]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("case", range(7))
def test_bootstrap_metric_gives_the_loop_intervals(case):
    """The same seed draws the same resamples as bootstrap_interval / bootstrap_difference (paired), so the
    intervals agree, for the seed mean and for the difference to another model; chunking changes nothing."""
    name, y, scores = _metric_cases()[case]

    def stat(yy, *ss):
        return float(np.mean([M.compute(name, yy, s) for s in ss]))

    loop = M.bootstrap_interval(stat, [y, *scores], n_samples=200, seed=3)
    assert M.bootstrap_metric(name, y, scores, n_samples=200, seed=3) == pytest.approx(loop, rel=1e-12, abs=1e-12)
    assert M.bootstrap_metric(name, y, scores, n_samples=200, seed=3, chunk_cells=7 * len(y)) == pytest.approx(loop, rel=1e-12, abs=1e-12)
    other = [scores[0][::-1].copy()]
    loop_d = M.bootstrap_difference(stat, [y, *scores], [y, *other], n_samples=200, seed=3)
    assert M.bootstrap_metric(name, y, scores, other, n_samples=200, seed=3) == pytest.approx(loop_d, rel=1e-12, abs=1e-12)


def test_bootstrap_metric_drops_one_class_resamples_and_takes_no_rows():
    y = np.array([0] * 19 + [1])
    s = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], axis=1)
    assert M.bootstrap_metric("auc", y, [s], n_samples=300, seed=0) == (1.0, 1.0, 1.0)
    w = np.array([[1.0] * 19 + [0.0]])  # a resample without the positive: AUC undefined
    assert math.isnan(M.weighted_metric("auc", y, s, w)[0])
    point, lo, hi = M.bootstrap_metric("accuracy", np.zeros(0, int), [np.zeros((0, 2))], n_samples=10)
    assert math.isnan(point) and math.isnan(lo) and math.isnan(hi)
