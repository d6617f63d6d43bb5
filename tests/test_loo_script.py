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
