"""Byte-level BPE tokenizer and the rows -> padded arrays batch function."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
from seqrows import T0, all_scope, event_rows, table

from userfm.models.features import (
    IGNORE_INDEX,
    LEVEL_SEP,
    N_SPECIAL,
    UNK_ID,
    FeatureConfig,
    Vocabs,
    fit_vocabs,
    make_batch,
    text_hash,
)
from userfm.data.schema import SEQUENCE_SCHEMA
from userfm.models.tokenizer import BOS_ID, UNK_ID as TOK_UNK, TextTokenizer

CORPUS = ["red running shoes", "blue phone case", "한국어 책", "café au lait", "laptop bag"] * 20


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.fit(CORPUS, vocab_size=320)


def test_fit_is_deterministic_and_json_round_trips(tok, tmp_path):
    again = TextTokenizer.fit(CORPUS, vocab_size=320)
    assert again.to_json() == tok.to_json()
    tok.save(tmp_path / "tok.json")
    loaded = TextTokenizer.load(tmp_path / "tok.json")
    assert loaded == tok
    texts = ["red shoes", "한국어", ""]
    np.testing.assert_array_equal(loaded.encode_batch(texts, 8), tok.encode_batch(texts, 8))
    assert json.loads(tok.to_json())["model"]["type"] == "BPE"
    assert 256 + 3 < tok.vocab_size <= 320  # bytes + specials + learned merges (corpus may run out)


def test_merges_learned_from_corpus(tok):
    ids = tok.encode_batch(["red running shoes"], 32)[0]
    n = int((ids != 0).sum())
    assert 2 <= n < len(" red running shoes".encode()) + 1  # frequent words became few tokens


def test_empty_non_ascii_and_over_long_text(tok):
    ids = tok.encode_batch(["", None, "한국어 🙂 naïve", "word " * 200], 12)
    assert ids.shape == (4, 12) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[0], [BOS_ID] + [0] * 11)  # empty text is just <bos>
    np.testing.assert_array_equal(ids[1], ids[0])
    assert ids[2, 0] == BOS_ID and (ids[2] != TOK_UNK).all()  # bytes: never UNK, even for unseen 🙂
    assert tok.decode(tok.encode_batch(["한국어 🙂 naïve"], 64)[0]).strip() == "한국어 🙂 naïve"
    assert (ids[3] != 0).all()  # truncated to exactly max_tokens


# --------------------------------------------------------------------------------------------------
# features.make_batch
# --------------------------------------------------------------------------------------------------


def _hand_rows():
    t = [T0, T0 + dt.timedelta(days=40, hours=2), dt.datetime(2024, 12, 31, 23, 30, tzinfo=dt.timezone.utc)]
    return {
        "user_id": ["a", "b", "c"],
        "split": ["train"] * 3,
        "scope": ["all"] * 3,
        "n_events": [3, 1, 0],
        "ts": [t, [T0], []],
        "service": [["shopping", "search", "shopping"], ["news"], []],
        "text": [["red shoes", "", "한국어"], ["x" * 1000], []],
        "item_id": [["1", None, "2"], [None], []],
        "category": [[["Clothing", "Shoes"], None, ["Books"]], [["Toys"]], []],
        "value": [[1.0, None, 2.0], [None], []],
    }


def test_make_batch_by_hand():
    rows = _hand_rows()
    fit_rows = {k: v[:1] for k, v in rows.items()}  # fitted on user a only: "news", "Toys", are unknown
    cfg = FeatureConfig(time_fields=("year", "month", "day", "weekday", "hour", "recency"), recency_buckets=4)
    v = fit_vocabs(fit_rows, cfg)
    assert v.services == ("shopping", "search")  # count 2 before count 1
    assert v.categories[0] == ("Books", "Clothing") and v.categories[1] == ("Clothing" + LEVEL_SEP + "Shoes",)
    assert v.years == (2023, 2024)
    b = make_batch(table(rows), v)
    np.testing.assert_array_equal(b["length"], [3, 1, 0])
    assert b["service"].shape == (3, 3)
    np.testing.assert_array_equal(b["service"], [[2, 3, 2], [UNK_ID, 0, 0], [0, 0, 0]])
    # category: level ids; missing level = 0; unseen "Toys" = UNK
    np.testing.assert_array_equal(b["category"][0, :, :2], [[3, 2], [0, 0], [2, 0]])
    np.testing.assert_array_equal(b["category"][1, 0], [UNK_ID, 0, 0, 0])
    # 2023-05-17 13:00 Wed: year 2023 -> 2, month 5 -> 2+4, day 17 -> 2+16, weekday Wed=2 -> 4, hour 13 -> 15,
    # recency: 593 days before the last event -> log2(1 + 14233.5 h) = 13.8 -> clamped to bucket 3 -> 5
    np.testing.assert_array_equal(b["time"][0, 0], [2, 6, 18, 4, 15, 5])
    # 2024-12-31 23:30 Tue, the last event: recency 0 -> 2
    np.testing.assert_array_equal(b["time"][0, 2], [3, 13, 32, 3, 25, 2])
    np.testing.assert_array_equal(b["time"][2], 0)
    assert b["ts"][0, 0] == int(T0.timestamp() * 1e6)
    assert b["text_hash"][0, 0] == text_hash(["red shoes"])[0] and b["text_hash"][2, 0] == 0
    assert not b["masked"].any()
    assert IGNORE_INDEX == -100 and N_SPECIAL == 2


def test_truncation_keeps_most_recent_and_dict_equals_table(tok):
    rows = _hand_rows()
    v = fit_vocabs(rows)
    from_dict = make_batch(rows, v, tok, max_events=2)
    from_table = make_batch(table(rows), v, tok, max_events=2)
    for k in from_dict:
        np.testing.assert_array_equal(from_dict[k], from_table[k], err_msg=k)
    full = make_batch(rows, v, tok)
    np.testing.assert_array_equal(from_dict["length"], [2, 1, 0])
    np.testing.assert_array_equal(from_dict["ts"][0], full["ts"][0, 1:])
    np.testing.assert_array_equal(from_dict["tokens"][0], full["tokens"][0, 1:])
    assert from_dict["tokens"].shape == (3, 2, 32)
    assert (from_dict["tokens"][1, 0] != 0).all()  # 1000 chars truncated to 32 tokens


def test_null_columns_and_sliced_tables():
    rows = _hand_rows()
    rows["category"][0] = None  # a whole row without categories
    tab = table(rows)
    v = fit_vocabs(tab)
    b = make_batch(tab.slice(1, 2), v)  # slices keep list offsets right
    np.testing.assert_array_equal(b["length"], [1, 0])
    full = make_batch(tab, v)
    np.testing.assert_array_equal(full["category"][0], 0)
    np.testing.assert_array_equal(b["text_hash"][0], full["text_hash"][1, :1])


def test_fit_vocabs_counts_every_event_by_hand():
    """Counted per distinct value: a path taken by many events counts once per event, at every level it has."""
    rows = _hand_rows()
    rows["category"][1] = None  # user b's whole category list missing: its event has no path
    rows["category"][0] = [["Clothing", "Shoes"], ["Clothing", "Hats"], ["Books"]]
    rows = {k: v + v[:1] for k, v in rows.items()}  # user a twice: Clothing 4, Books 2, Shoes 2, Hats 2
    v = fit_vocabs(rows, FeatureConfig(min_count=3, category_levels=2))
    assert v.categories == (("Clothing",), ())  # Books (2) and every level-2 path (2 each) are under min_count 3
    v = fit_vocabs(rows, FeatureConfig(category_levels=2))
    assert v.categories == (("Clothing", "Books"), ("Clothing" + LEVEL_SEP + "Hats", "Clothing" + LEVEL_SEP + "Shoes"))
    assert v.services == ("shopping", "search", "news")  # 4, 2, 1


def test_vocabs_json_round_trip_and_min_count(tmp_path):
    tab = all_scope(table(event_rows(8)))
    v = fit_vocabs(tab, FeatureConfig(min_count=3, category_levels=2))
    v.save(tmp_path / "v.json")
    assert Vocabs.load(tmp_path / "v.json") == v
    counts = {}
    for path in sum(tab.column("category").to_pylist(), []):
        if path:
            counts[path[0]] = counts.get(path[0], 0) + 1
    assert set(v.categories[0]) == {c for c, n in counts.items() if n >= 3}
    assert fit_vocabs(tab.take(list(reversed(range(tab.num_rows)))), v.config) == v  # order-independent
