"""Per-step batching in pretraining: trimming padding, length bucketing, service restriction."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("objective", ["clue", "simclr", "mlm", "future", "next"])
def test_vectors_looked_up_per_step_equal_the_featurized_ones(tmp_path, objective):
    """Pretraining featurizes text hashes and each step looks the MiniLM vectors up after its crops / masks /
    views (add_vectors): the step's batch equals the one featurized with the vectors in it."""
    from userfm.models.features import text_hash
    from userfm.models.minilm import VectorCache, to_table, write_part
    from userfm.objectives.pretext import add_vectors
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import featurize, step_inputs

    t = pa.Table.from_pydict(event_rows(n_users=12, seed=4), schema=SEQUENCE_SCHEMA)
    texts = sorted({x for lst in t.column("text").to_pylist() for x in lst})
    vecs = np.random.default_rng(0).normal(size=(len(texts), 384)).astype(np.float32)
    write_part(tmp_path, to_table(text_hash(texts), vecs))
    vocabs = fit_vocabs(t.filter(pa.compute.equal(t.column("scope"), "all")), FeatureConfig(max_events=16))
    kw = dict(split="train", objective=objective, vocabs_json=vocabs.to_json(), tokenizer_json=None, max_events=16,
              single_service="", seed=0)
    featurized = featurize(t, vectors_dir=str(tmp_path), **kw)
    hashes = featurize(t, vectors_dir=None, **kw)
    assert not [k for k in hashes if k.endswith("text_vector")]
    cfg = PretrainConfig(data="d", out="o", objective=objective, item_encoder="minilm",
                         pooling="last" if objective == "next" else "mean")
    want = trim_events(step_inputs(featurized, cfg, np.random.default_rng(1)))
    got = add_vectors(trim_events(step_inputs(hashes, cfg, np.random.default_rng(1))), VectorCache.load(tmp_path))
    assert sorted(got) == sorted(want)
    vector_keys = [k for k in want if k.endswith("text_vector")]
    assert vector_keys and all(np.abs(want[k]).sum() > 0 for k in vector_keys)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
