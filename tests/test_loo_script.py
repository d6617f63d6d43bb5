"""Helpers of experiments/benchmarks/loo.py that decide what the leave-one-out tables rank over."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("loo_script", REPO / "experiments/benchmarks/loo.py")
loo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loo)


def test_service_catalog_reindexes_one_services_items():
    # whole catalog a..f; the service's events touch c, a, f only (b, d, e are the other service's)
    catalog = ["a", "b", "c", "d", "e", "f"]
    items = {"u1": np.array([2, 0, 2]), "u2": np.array([5]), "u3": np.array([], dtype=np.int64)}
    cat, hist = loo.service_catalog(catalog, items, "arts")
    assert cat == ["a", "c", "f"]
    assert sorted(hist) == ["u1", "u2"]  # u3 has no event of the service
    assert hist["u1"].tolist() == [1, 0, 1] and hist["u2"].tolist() == [2]
    assert [cat[i] for i in hist["u1"]] == ["c", "a", "c"]  # the same items, in the same order


def test_service_catalog_refuses_an_absent_service():
    with pytest.raises(SystemExit, match="--service toys"):
        loo.service_catalog(["a"], {"u1": np.array([], dtype=np.int64)}, "toys")


def test_val_chosen_row_follows_the_yardsticks_with_the_val_best_rows_ranks():
    """Two pretrained rows, the logistic head better on val (0.2 vs 0.1): val-chosen is its ranks, placed after
    the yardsticks; a tie keeps the first row; the other rows keep their order."""
    ranks = {"popularity": "P", "item-knn": "K", "a/own-head": "R1", "a/logreg": "R2"}
    rows, picked = loo.with_val_chosen(ranks, {"a/own-head": 0.1, "a/logreg": 0.2}, ["popularity", "item-knn"])
    assert picked == "a/logreg" and list(rows.items()) == [("popularity", "P"), ("item-knn", "K"), ("val-chosen", "R2"),
                                                           ("a/own-head", "R1"), ("a/logreg", "R2")]
    assert loo.with_val_chosen(ranks, {"a/own-head": 0.2, "a/logreg": 0.2}, ["popularity"])[1] == "a/own-head"


def test_head_pairs_are_each_users_last_prefixes_inside_items_minus_two():
    """u1 = a b c d e f (items[:-2] = a b c d), u2 = x y z (items[:-2] = x: no pair), u3 = p q r s.
    j = 1: a b c -> d, p -> q; j = 2: a b -> c (u3's prefix would be empty); j = 3: a -> b."""
    items = {"u1": np.arange(6), "u2": np.array([10, 11, 12]), "u3": np.array([20, 21, 22, 23])}
    users = ["u1", "u2", "u3"]
    pairs = loo.head_pairs(items, users, 3)
    assert [h for h, *_ in pairs] == [3, 4, 5]  # events held out of each prefix's embedding
    (_, r1, y1, p1), (_, r2, y2, p2), (_, r3, y3, p3) = pairs
    assert r1.tolist() == [0, 2] and y1.tolist() == [3, 21] and [p.tolist() for p in p1] == [[0, 1, 2], [20]]
    assert r2.tolist() == [0] and y2.tolist() == [2] and [p.tolist() for p in p2] == [[0, 1]]
    assert r3.tolist() == [0] and y3.tolist() == [1] and [p.tolist() for p in p3] == [[0]]
    for h, rows, y, prefixes in pairs:  # no target is the validation (item[-2]) or the test (item[-1]) item
        for i, t, p in zip(rows, y, prefixes):
            full = items[users[i]]
            assert t == full[len(p)] and len(p) + 1 <= len(full) - 2
    assert loo.head_pairs(items, users, 0) == []


def test_popularity_alpha_by_hand():
    """3 items; the head ranks item 1 first (0.5) over item 2 (0.2); only item 2 has training counts (log 1).
    HR@1 of targets [2, 2, 1]: alpha 0 and 0.25 keep item 1 on top (0.45 < 0.5): 1/3; alpha >= 0.5 puts item 2 on
    top (0.7, 1.2, ...): 2/3, a tie the smallest (0.5) wins."""
    scores = lambda r: np.tile([0.0, 0.5, 0.2], (len(r), 1))  # noqa: E731
    alpha, hr = loo.popularity_alpha(scores, np.array([0.0, 0.0, 1.0]), 3, np.array([2, 2, 1]), k=1)
    assert alpha == 0.5
    assert hr == pytest.approx({0.0: 1 / 3, 0.25: 1 / 3, 0.5: 2 / 3, 1.0: 2 / 3, 2.0: 2 / 3, 4.0: 2 / 3})
