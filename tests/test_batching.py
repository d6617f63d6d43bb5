"""Per-step batching in pretraining: trimming padding, length bucketing, service restriction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from seqrows import event_rows
from userfm.models.encoders import UserEncoder, config_for
from userfm.models.features import FeatureConfig, batch_lengths, bucket_by_length, fit_vocabs, make_batch, pad_events, to_torch, trim_events
from userfm.data.schema import SEQUENCE_SCHEMA
from userfm.data.sequences import restrict_services


def _rows(n=8, seed=0):
    t = pa.Table.from_pydict(event_rows(n_users=n, seed=seed, max_len=12), schema=SEQUENCE_SCHEMA)
    return t.filter(pa.compute.equal(t.column("scope"), "all"))


def test_trim_cuts_each_view_to_its_longest_history_and_keeps_outputs():
    rows = _rows()
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=32))
    nb = pad_events(make_batch(rows, vocabs, None, max_events=32), 32)
    t = trim_events(nb)
    width = int(nb["length"].max())
    assert width < 32 and t["service"].shape == (8, width) and t["category"].shape[:2] == (8, width)
    np.testing.assert_array_equal(t["length"], nb["length"])
    torch.manual_seed(0)
    model = UserEncoder(config_for("tiny", vocabs, None, item_encoder="category", max_events=32, dropout=0.0)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(to_torch(t)).numpy(), model(to_torch(nb)).numpy(), rtol=1e-4, atol=1e-5)
    # two views are trimmed independently
    two = {"a.length": np.array([2, 1]), "a.service": np.ones((2, 5)), "b.length": np.array([4, 3]),
           "b.service": np.ones((2, 5)), "b.tokens": np.ones((2, 5, 3)), "pair_kind": np.array([0, 1])}
    t2 = trim_events(two)
    assert t2["a.service"].shape == (2, 2) and t2["b.service"].shape == (2, 4) and t2["b.tokens"].shape == (2, 4, 3)
    np.testing.assert_array_equal(t2["pair_kind"], [0, 1])


def test_bucketing_keeps_every_row_once_groups_similar_lengths_and_is_deterministic():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 65, size=64)
    batches = [{"length": lengths[i:i + 8], "uid": np.arange(i, i + 8)} for i in range(0, 64, 8)]
    out = list(bucket_by_length(iter(batches), group=4, seed=3))
    assert len(out) == 8 and all(len(b["uid"]) == 8 for b in out)
    assert sorted(np.concatenate([b["uid"] for b in out]).tolist()) == list(range(64))
    # within a group of 4 batches, batches cover disjoint sorted length ranges: padding shrinks
    padded_before = sum(int(b["length"].max()) * 8 for b in batches)
    padded_after = sum(int(b["length"].max()) * 8 for b in out)
    assert padded_after < padded_before
    for g in (out[:4], out[4:]):
        spans = sorted((int(b["length"].min()), int(b["length"].max())) for b in g)
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(3))
    again = list(bucket_by_length(iter(batches), group=4, seed=3))
    assert all(np.array_equal(a["uid"], b["uid"]) for a, b in zip(out, again))
    assert [b["uid"].tolist() for b in bucket_by_length(iter(batches), group=1, seed=3)] == [b["uid"].tolist() for b in batches]
    two = [{"a.length": np.array([1, 9]), "b.length": np.array([5, 2])}, {"a.length": np.array([3, 3]), "b.length": np.array([8, 1])}]
    np.testing.assert_array_equal(batch_lengths(two[0]), [5, 9])


def test_restrict_services_keeps_only_their_events_in_order():
    rows = _rows(n=12, seed=2)
    out = restrict_services(rows, ["shopping", "news"])
    before = {r["user_id"]: r for r in rows.to_pylist()}
    kept_users = 0
    for r in out.to_pylist():
        src = before[r["user_id"]]
        idx = [i for i, s in enumerate(src["service"]) if s in ("shopping", "news")]
        assert r["service"] == [src["service"][i] for i in idx] and r["ts"] == [src["ts"][i] for i in idx]
        assert r["text"] == [src["text"][i] for i in idx] and r["n_events"] == len(idx) and r["split"] == src["split"]
        kept_users += 1
    expected = sum(1 for r in before.values() if any(s in ("shopping", "news") for s in r["service"]))
    assert kept_users == expected and out.schema == SEQUENCE_SCHEMA
    assert restrict_services(rows, ["nope"]).num_rows == 0
