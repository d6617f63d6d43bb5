"""Item co-occurrence vectors (userfm.models.cooc) and the encoder's frozen table: PPMI by hand, what the SVD
vectors separate, the lookup, save/load and the parameter formula."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from userfm.models.cooc import CoocConfig, fit_item_vectors, ppmi, user_item_matrix
from userfm.models.encoders import EncoderConfig, UserEncoder, expected_num_params, load_encoder, num_params, save_encoder
from userfm.models.features import text_hash


def rows(histories: list[list[str]]) -> pa.Table:
    return pa.table({"user_id": [f"u{i}" for i in range(len(histories))], "text": histories})


def test_user_item_matrix_is_binary_over_the_last_max_events():
    tab = rows([["a", "b", "a"], [], ["c", "a", "b", "d"]])
    hashes, x = user_item_matrix(tab, max_events=3)
    # user 2's oldest event (c) is outside the last 3, and nobody else took c: no column
    assert hashes.tolist() == sorted(text_hash(list("abd")).tolist())
    col = {t: int(np.searchsorted(hashes, text_hash([t])[0])) for t in "abd"}
    dense = x.toarray()
    assert dense.shape == (3, 3) and dense.dtype == np.float32
    assert [dense[0, col[t]] for t in "abd"] == [1, 1, 0]  # a twice: still 1
    assert dense[1].sum() == 0  # no events
    assert [dense[2, col[t]] for t in "abd"] == [1, 1, 1]
    # max_events=0 counts every event (what an encoder trained on every window reads): c gets its column
    every, x0 = user_item_matrix(tab, max_events=0)
    assert every.tolist() == sorted(text_hash(list("abcd")).tolist()) and x0.sum() == 2 + 0 + 4
    with pytest.raises(ValueError, match="max_events must be >= 0"):
        CoocConfig(max_events=-1)


def test_item_id_key_makes_one_column_per_item_whatever_its_texts():
    # MovieLens-style texts carry the rating: one film, two texts. Keyed by text they are two items; keyed by
    # item id (features.item_hash) one, and an event without an id is the item its text names.
    from userfm.models.features import ITEM_KEY_PREFIX, item_hash

    tab = pa.table({"user_id": ["u0", "u1"], "text": [["f rated 4", "g"], ["f rated 3", "h"]],
                    "item_id": [["f", None], ["f", "h"]]})
    by_text, x_text = user_item_matrix(tab, key="text")
    assert len(by_text) == 4 and x_text.sum() == 4
    by_id, x_id = user_item_matrix(tab, key="item_id")
    assert by_id.tolist() == sorted(text_hash([ITEM_KEY_PREFIX + "f", "g", ITEM_KEY_PREFIX + "h"]).tolist())
    f = int(np.searchsorted(by_id, text_hash([ITEM_KEY_PREFIX + "f"])[0]))
    assert x_id.toarray()[:, f].tolist() == [1, 1]  # both users took the one film
    assert item_hash(["f", None, "f"], ["x", "g", "y"]).tolist() == text_hash([ITEM_KEY_PREFIX + "f", "g", ITEM_KEY_PREFIX + "f"]).tolist()
    with pytest.raises(ValueError, match="key must be"):
        CoocConfig(key="title")


def test_ppmi_by_hand():
    # users: {a,b} x3, {a,c}, {b,c}, {c,d} x2 -> co-occurrence ab 3, ac 1, bc 1, cd 2 (symmetric, N = 14)
    # marginals a 4, b 4, c 4, d 2: PMI ab = log(3*14/16), cd = log(2*14/8), ac = bc = log(14/16) < 0 -> 0
    items = "abcd"
    users = [["a", "b"]] * 3 + [["a", "c"], ["b", "c"]] + [["c", "d"]] * 2
    x = np.array([[t in u for t in items] for u in users], dtype=np.float32)
    from scipy import sparse

    p = ppmi(sparse.csr_matrix(x)).toarray()
    want = np.zeros((4, 4))
    want[0, 1] = want[1, 0] = math.log(3 * 14 / 16)
    want[2, 3] = want[3, 2] = math.log(2 * 14 / 8)
    np.testing.assert_allclose(p, want, rtol=1e-6)


def _groups(n_users=200, seed=0):
    """Two 'taste' groups of 10 items: each user takes 5 items of their own group; one item taken once."""
    rng = np.random.default_rng(seed)
    group = [[f"g{g}-item{i}" for i in range(10)] for g in range(2)]
    hist = [list(rng.choice(group[u % 2], size=5, replace=False)) for u in range(n_users)]
    hist[0].append("rare-item")
    return group, rows(hist)


def test_vectors_separate_items_by_the_users_who_take_them():
    group, tab = _groups()
    hashes, v = fit_item_vectors(tab, CoocConfig(dim=4, min_users=2))
    assert len(hashes) == 20 and v.shape == (20, 4)  # the item one user took has no vector
    assert text_hash(["rare-item"])[0] not in set(hashes.tolist())
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 2.0, rtol=1e-5)  # norm sqrt(dim)

    def vec(t):
        return v[np.searchsorted(hashes, text_hash([t])[0])]

    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    within = [cos(vec(group[g][i]), vec(group[g][j])) for g in range(2) for i in range(10) for j in range(i + 1, 10)]
    across = [cos(vec(group[0][i]), vec(group[1][j])) for i in range(10) for j in range(10)]
    assert min(within) > max(across), (min(within), max(across))
    # deterministic (seeded randomized SVD), and min_users=1 keeps the rare item only if it co-occurs
    h2, v2 = fit_item_vectors(tab, CoocConfig(dim=4, min_users=2))
    assert np.array_equal(hashes, h2) and np.array_equal(v, v2)
    h3, _ = fit_item_vectors(tab, CoocConfig(dim=4, min_users=1))
    assert len(h3) == 21


def test_tiny_catalogues_shrink_the_dimension_or_give_no_table():
    h, v = fit_item_vectors(rows([["a", "b", "c"], ["a", "b", "c"]]), CoocConfig(dim=32))
    assert len(h) == 3 and v.shape == (3, 2)  # dim reduced to items - 1
    h, v = fit_item_vectors(rows([["a"], ["a"]]), CoocConfig(dim=32))
    assert h.shape == (0,) and v.shape == (0, 0)  # nothing co-occurs
    with pytest.raises(ValueError, match="dim"):
        CoocConfig(dim=0)


def _encoder(n=3, k=2) -> UserEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(item_encoder="minilm", d_model=8, n_layers=1, n_heads=2, d_ff=16, text_vector_dim=4,
                        max_events=4, n_services=3, time_sizes=(5,), cooc_items=n, cooc_dim=k)
    return UserEncoder(cfg).eval()


def _batch(hashes):
    b, l = hashes.shape
    return {"length": torch.full((b,), l), "service": torch.ones(b, l, dtype=torch.long),
            "time": torch.ones(b, l, 1, dtype=torch.long), "text_hash": hashes,
            "text_vector": torch.ones(b, l, 4)}


def test_encoder_table_lookup_save_load_and_param_count(tmp_path):
    model = _encoder()
    table_h = torch.tensor([-5, 7, 100])
    table_v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    model.set_cooc(table_h, table_v)
    got = model.cooc_lookup(torch.tensor([[7, 100, 8, 0], [-5, 101, -6, 7]]))
    want = torch.tensor([[[0, 1], [2, 2], [0, 0], [0, 0]], [[1, 0], [0, 0], [0, 0], [0, 1]]], dtype=torch.float32)
    assert torch.equal(got, want)  # unknown hashes and padding (0) give zeros
    # two users with the same texts and times but different items (both known) differ; an unknown item
    # adds nothing: the same as a table row of zeros
    with torch.no_grad():
        z = model(_batch(torch.tensor([[7, 7], [-5, -5], [8, 8]])))
        assert not torch.allclose(z[0], z[1])
        plain = _encoder(n=3, k=2)
        plain.set_cooc(table_h, torch.zeros(3, 2))
        assert torch.allclose(z[2], plain(_batch(torch.tensor([[8, 8]])))[0], atol=1e-6)
    # the projection is a parameter (cooc_dim x d, no bias); the table is a buffer
    assert num_params(model) == expected_num_params(model.config)
    assert num_params(model, non_embedding=True) == expected_num_params(model.config, non_embedding=True)
    no_table = EncoderConfig(**{**model.config.__dict__, "cooc_items": 0, "cooc_dim": 0})
    assert expected_num_params(model.config) - expected_num_params(no_table) == 2 * 8
    # saved with the weights: the loaded model looks up the same rows and embeds identically
    save_encoder(tmp_path / "m", model)
    loaded, _, _ = load_encoder(tmp_path / "m")
    assert torch.equal(loaded.cooc_hashes, table_h) and torch.equal(loaded.cooc_vectors, table_v)
    with torch.no_grad():
        assert torch.equal(loaded(_batch(torch.tensor([[7, 7], [-5, -5], [8, 8]]))), z)


def test_bad_tables_are_rejected():
    model = _encoder()
    with pytest.raises(ValueError, match="does not fit"):
        model.set_cooc([1, 2], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="sorted"):
        model.set_cooc([3, 2, 1], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="cooc_items and cooc_dim"):
        EncoderConfig(cooc_items=5)
