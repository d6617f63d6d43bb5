"""The no-pretraining yardsticks: bag-of-items (userfm.eval.bag_of_items) and item-kNN (userfm.eval.item_knn), by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from userfm.eval.bag_of_items import bag_of_items
from userfm.eval.baselines import _item_knn_ranks, _popularity_ranks
from userfm.eval.task_data import TaskData
from userfm.eval.tasks import EvalConfig, TaskConfig
from userfm.eval.item_knn import TIE_BREAK, item_cosine, knn_scorer


def test_bag_of_items_is_the_binary_matrix_of_training_items():
    docs = {"train": [["b", "a", "b"], ["c"], []], "val": [["a", "z"]], "test": [["z"], ["c", "b"]]}
    x, n = bag_of_items(docs)
    assert n == 3  # a, b, c: z is no training user's item
    np.testing.assert_array_equal(x["train"].toarray(), [[1, 1, 0], [0, 0, 1], [0, 0, 0]])  # b twice counts once
    np.testing.assert_array_equal(x["val"].toarray(), [[1, 0, 0]])
    np.testing.assert_array_equal(x["test"].toarray(), [[0, 0, 0], [0, 1, 1]])
    assert x["train"].dtype == np.float32


def test_item_cosine_by_hand():
    # users: {0, 1}, {0, 1, 2}, {1, 2}, {3}; item 4 nobody's
    sim = item_cosine([np.array([0, 1]), np.array([0, 1, 2, 1]), np.array([1, 2]), np.array([3])], 5).toarray()
    users = {0: {0, 1}, 1: {0, 1, 2}, 2: {1, 2}, 3: {3}, 4: set()}
    expect = np.array([[0.0 if i == j or not users[i] or not users[j] else
                        len(users[i] & users[j]) / math.sqrt(len(users[i]) * len(users[j])) for j in range(5)]
                       for i in range(5)])
    np.testing.assert_allclose(sim, expect, rtol=1e-6)
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(2 * 3)) and sim[0, 2] == pytest.approx(1 / 2)


def test_knn_scores_read_the_last_items_and_break_ties_by_popularity():
    sim = item_cosine([np.array([0, 1]), np.array([0, 1, 2]), np.array([1, 2]), np.array([3])], 5)
    pop = np.array([2.0, 3.0, 2.0, 1.0, 0.0])
    hist = [np.array([3, 0]), np.array([2])]
    dense = sim.toarray()
    tie = TIE_BREAK * pop / 3.0
    np.testing.assert_allclose(knn_scorer(sim, hist, 1, pop)(np.array([0, 1])), np.stack([dense[0], dense[2]]) + tie, rtol=1e-6)
    np.testing.assert_allclose(knn_scorer(sim, hist, 0, pop)(np.array([0])), (dense[3] + dense[0])[None] + tie, rtol=1e-6)
    # user 1 (last item 2): items 3 and 4 share a knn score of 0; popularity puts 3 (once) above 4 (never)
    s = knn_scorer(sim, hist, 1, pop)(np.array([1]))[0]
    assert s[3] > s[4] == 0.0 and s[1] > s[0] > s[3]


def _td(train_hist, train_y, val_hist, val_y, test_hist, test_y, n_items):
    task = TaskConfig(name="n", table="last_event", target="item_id", type="retrieval")
    ids = {s: np.array([f"{s}{i}" for i in range(len(y))], dtype=object) for s, y in
           (("train", train_y), ("val", val_y), ("test", test_y))}
    return TaskData(task, ids, {"train": np.array(train_y), "val": np.array(val_y), "test": np.array(test_y)},
                    [f"i{k}" for k in range(n_items)], {s: np.full(len(v), 3) for s, v in ids.items()}, {},
                    {"train": [np.array(h) for h in train_hist], "val": [np.array(h) for h in val_hist],
                     "test": [np.array(h) for h in test_hist]})


def test_popularity_unseen_drops_the_users_items_and_ranks_a_repeat_last():
    # training items (held-out ones included): 0 x3, 1 x2, 2 x1, 3 x0
    td = _td([[0, 1], [0, 2]], [0, 1], [[0]], [2], [[0, 1], [0], [2]], [2, 3, 2], 4)
    ranks, _, _ = _popularity_ranks(td, None)
    assert ranks.tolist() == [2, 3, 2]  # ranked below 0 and 1 (and 2) by count
    ranks, _, _ = _popularity_ranks(td, None, remove_seen=True)
    # user 0 saw 0, 1: item 2 is first; user 1 saw 0: 1, 2 above 3; user 2's held-out item 2 is a repeat: last
    assert ranks.tolist() == [0, 2, 3]


def _switching_users(n, rng, groups=20, per=3, earlier=4):
    """Each user: one item of each of ``earlier`` random groups, then an item of group g, then (held out)
    another item of g: only the last item tells the next one."""
    hist, y = [], []
    for _ in range(n):
        gs = rng.choice(groups, earlier + 1, replace=False)
        first = [g * per + rng.integers(per) for g in gs[:-1]]
        last, nxt = rng.choice(per, 2, replace=False) + gs[-1] * per
        hist.append(first + [last])
        y.append(nxt)
    return hist, y


def test_item_knn_picks_the_last_items_on_val_and_ranks_by_hand():
    """60 items in 20 groups of 3. A training user's last item and held-out item share a group (~6.7 users per
    within-group pair over 400 users); other pairs are random (~3.2 users each): reading the last item scores the
    target above most items, reading all 5 adds the ~8 group-mates of the earlier items as competitors of similar
    score. Val must see it (val HR@10 0.70-0.83 vs 0.36-0.49 over data seeds 0-3: the 0.1 margin is loose)."""
    rng = np.random.default_rng(0)
    (tr_h, tr_y), (va_h, va_y), (te_h, te_y) = (_switching_users(n, rng) for n in (400, 100, 100))
    td = _td(tr_h, tr_y, va_h, va_y, te_h, te_y, 60)
    ranks, _, _, info = _item_knn_ranks(td, None, EvalConfig(item_knn_last=(0, 1)))
    assert info["last"] == 1 and info["val_hr@10"]["1"] > info["val_hr@10"]["0"] + 0.1, info
    full = [np.append(h, y) for h, y in zip(tr_h, tr_y)]
    sim = item_cosine(full, 60).toarray()
    pop = np.bincount(np.concatenate(full), minlength=60).astype(float)
    expect = []
    for h, y in zip(te_h, te_y):
        s = sim[h[-1]] + TIE_BREAK * pop / pop.max()
        expect.append(sum(1 for j in range(60) if j != y and s[j] >= s[y]))
    assert ranks.tolist() == expect
    masked, _, _, _ = _item_knn_ranks(td, td.history["test"], EvalConfig(item_knn_last=(1,)))
    assert (masked <= ranks).all() and (masked < ranks).any()  # the protocol's seen-masking only lifts the target


def test_pad_sequences_keeps_the_last_items_left_padded():
    from userfm.eval.sasrec import pad_sequences

    got = pad_sequences([np.array([4, 5, 6]), np.array([], np.int64), np.array([0, 1, 2, 3, 7])], 4)
    np.testing.assert_array_equal(got, [[0, 5, 6, 7], [0, 0, 0, 0], [2, 3, 4, 8]])  # ids + 1, 0 = padding


@pytest.mark.parametrize("select", ["loss", "mrr"])
def test_sasrec_is_causal_and_learns_a_deterministic_next_item(select):
    """Item k is always followed by k + 1 (mod 30): a next-item model that learned anything ranks it first
    (chance HR@5 is 5/30), early-stopped on either val criterion. The state at position t must not change when
    later items do (causal mask)."""
    import torch

    from userfm.eval.sasrec import SASRecConfig, _model, fit_sasrec, sasrec_scorer

    rng = np.random.default_rng(0)

    def users(n):
        starts, lens = rng.integers(0, 30, n), rng.integers(4, 10, n)
        seqs = [(s + np.arange(k)) % 30 for s, k in zip(starts, lens)]
        return [q[:-1] for q in seqs], np.array([q[-1] for q in seqs])

    (tr_h, tr_y), (va_h, va_y), (te_h, te_y) = users(300), users(50), users(50)
    cfg = SASRecConfig(max_len=10, dim=32, layers=1, max_epochs=40, patience=3, dropout=0.1, lr=3e-3, select=select)
    lines = []
    model, info = fit_sasrec([np.append(h, y) for h, y in zip(tr_h, tr_y)], va_h, va_y, 30, cfg, progress=lines.append)
    # one progress line per epoch run, counted from 1; best_epoch counts from 0, so its line is number best_epoch + 1
    assert len(lines) == info["epochs"] and lines[0].startswith("[sasrec] epoch 1: train loss "), lines
    assert lines[info["best_epoch"]].endswith(f"val {select} {info[f'val_{select}']:.4f}"), (lines, info)
    scores = sasrec_scorer(model, te_h, cfg.max_len)(np.arange(50))
    ranks = (scores > scores[np.arange(50), te_y][:, None]).sum(1)
    assert np.mean(ranks < 5) > 0.9 and info["best_epoch"] < info["epochs"] <= 40, (np.mean(ranks < 5), info)
    # the best epoch's criterion: a mean reciprocal rank this good, or a loss below chance's log(30) = 3.4
    assert info["select"] == select and (0.5 < info["val_mrr"] <= 1.0 if select == "mrr" else info["val_loss"] < 1.0), info

    m = _model(30, cfg).eval()
    x = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10]])
    y = x.clone()
    y[0, 7:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        torch.testing.assert_close(m.states(x)[:, :7], m.states(y)[:, :7])
        assert not torch.allclose(m.states(x)[:, 7:], m.states(y)[:, 7:])


def test_sasrec_windows_train_on_every_item():
    """max_len 10 reads windows of 11 items: a 25-item sequence is 3 of them ([14, 25), [4, 15), [0, 5)), a 3-item
    one 1, a 1-item one none (no next item); without windows each sequence is one row (its last 11)."""
    from userfm.eval.sasrec import SASRecConfig, fit_sasrec

    seqs = [np.arange(25) % 30, np.array([1, 2, 3]), np.array([4])]
    for windows, rows in ((True, 4), (False, 2)):
        cfg = SASRecConfig(max_len=10, dim=8, layers=1, max_epochs=1, windows=windows)
        _, info = fit_sasrec(seqs, [np.array([1, 2])], np.array([3]), 30, cfg)
        assert info["train_rows"] == rows, (windows, info)


def test_mean_reciprocal_rank_by_hand_and_the_sasrec_criterion_is_checked():
    """Row 0: the target (score 2) is second -> 1/2; row 1: all tie, and ties count against the target (rank 2 of
    0..2) -> 1/3; mean 5/12. An unknown early-stopping criterion is refused by name, in both configs."""
    from userfm.eval.sasrec import SASRecConfig, mean_reciprocal_rank
    from userfm.eval.tasks import EvalConfig

    assert mean_reciprocal_rank(np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), np.array([2, 0])) == pytest.approx(5 / 12)
    assert mean_reciprocal_rank(np.array([[0.0, 9.0]]), np.array([1])) == 1.0
    with pytest.raises(ValueError, match="select must be one of"):
        SASRecConfig(select="hr@10")
    with pytest.raises(ValueError, match="sasrec_select must be one of"):
        EvalConfig(sasrec_select="hr@10")
