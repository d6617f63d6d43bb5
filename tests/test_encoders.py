"""User encoder and item encoders: parameter formulas, padding/masking, odd texts, save/load."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from seqrows import all_scope, event_rows, table

from userfm.models.encoders import (
    ITEM_ENCODERS,
    SIZES,
    EncoderConfig,
    UserEncoder,
    config_for,
    expected_num_params,
    flops_per_sample,
    load_encoder,
    num_params,
    save_encoder,
    tiny,
)
from userfm.models.features import concat_batches, fit_vocabs, make_batch, to_torch
from userfm.models.tokenizer import TextTokenizer

VEC = 8  # frozen text vector size in tests (MiniLM's is 384)


@pytest.fixture(scope="module")
def corpus():
    tab = all_scope(table(event_rows(8, seed=3)))
    vocabs = fit_vocabs(tab)
    tok = TextTokenizer.fit(sum(tab.column("text").to_pylist(), []), vocab_size=300)
    return tab, vocabs, tok


def _batch(rows, vocabs, tok):
    b = make_batch(rows, vocabs, tok)
    rng = np.random.default_rng(0)
    b["text_vector"] = rng.standard_normal((*b["service"].shape, VEC)).astype(np.float32)
    return b


def _one_user(batch, i):
    """User i alone, with the event axis cut to its own length (no padding at all)."""
    w = max(1, int(batch["length"][i]))
    return {k: (v[i : i + 1] if k == "length" else v[i : i + 1, :w]) for k, v in batch.items()}


def _model(vocabs, tok, item_encoder, **kw):
    torch.manual_seed(0)
    cfg = tiny(vocabs, tok, item_encoder=item_encoder, text_vector_dim=VEC if item_encoder != "text" else 0, **kw)
    return UserEncoder(cfg).eval()


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("item_encoder", ITEM_ENCODERS)
def test_param_count_matches_formula(name, item_encoder):
    cfg = config_for(name, item_encoder=item_encoder, text_vector_dim=384 if item_encoder != "text" else 0,
                     out_dim=96)
    with torch.device("meta"):  # shapes only: clue-725m would need 2.9 GB
        model = UserEncoder(cfg)
    assert num_params(model) == expected_num_params(cfg)
    assert num_params(model, non_embedding=True) == expected_num_params(cfg, non_embedding=True)


def test_item_id_embedding_tells_apart_items_with_the_same_text_vector(corpus):
    # item_id_buckets adds a learned vector per hashed item identity: with it, two users whose events
    # differ only in text_hash (same text vectors, categories, times) get different embeddings; without
    # it they are identical. Its table counts as an embedding in the parameter formula.
    tab, vocabs, tok = corpus
    b = to_torch(_batch(tab.slice(0, 2), vocabs, tok))
    other = dict(b, text_hash=b["text_hash"] + 1)
    for buckets in (0, 64):
        model = _model(vocabs, tok, "minilm", item_id_buckets=buckets)
        same = torch.allclose(model(b), model(other))
        assert same == (buckets == 0), buckets
        assert num_params(model) == expected_num_params(model.config)
        assert num_params(model, non_embedding=True) == expected_num_params(model.config, non_embedding=True)
    assert expected_num_params(model.config) - expected_num_params(_model(vocabs, tok, "minilm").config) == 64 * 32
    # a hash 64 apart lands in the same bucket: the same vector
    wrapped = dict(b, text_hash=b["text_hash"] + 64)
    assert torch.allclose(model(b), model(wrapped))
    with pytest.raises(ValueError, match="item_id_buckets"):
        EncoderConfig(item_id_buckets=-1)
    # item_key "item_id" reads item_hash (the event's item id) instead: a text change alone no longer moves the id part
    keyed = _model(vocabs, tok, "minilm", item_id_buckets=64, item_key="item_id")
    b2 = dict(b, item_hash=b["text_hash"] * 0 + 7)
    torch.testing.assert_close(keyed.item_vectors(b2) - keyed.item(b2), keyed.item_vectors(dict(b2, text_hash=b2["text_hash"] + 1)) - keyed.item(b2))
    assert not torch.allclose(keyed(b2), keyed(dict(b2, item_hash=b2["item_hash"] + 1)))
    with pytest.raises(ValueError, match="item_key"):
        EncoderConfig(item_key="title")
    # an untrained id adds a small vector (std 0.02 per coordinate), not one that outweighs the item's text part
    norms = keyed.item_ids.weight.detach().norm(dim=1)
    assert float(norms.mean()) == pytest.approx(0.02 * 32 ** 0.5, rel=0.1)


def test_named_sizes_grow_and_clue_is_725m():
    totals = [expected_num_params(config_for(n, item_encoder="text")) for n in ("tiny", "small", "base", "large")]
    assert totals == sorted(totals)
    clue = clue_cfg = config_for("clue-725m")
    assert clue_cfg.item_encoder == "text" and clue.pooling == "mean"
    assert expected_num_params(clue) == pytest.approx(725e6, rel=0.01)


def test_layer_formula_by_hand():
    # d 4, f 8, 1 layer, minilm from 2-d vectors, no output projection:
    # layer 4*16 + 2*32 + 9*4 + 8 = 172, final LN 8, adaptor 2*4 + 4 + 8 = 20 -> 200 non-embedding
    cfg = EncoderConfig(item_encoder="minilm", d_model=4, n_layers=1, n_heads=1, d_ff=8, text_vector_dim=2,
                        max_events=1, n_services=3, time_sizes=(5,))
    assert expected_num_params(cfg, non_embedding=True) == 200
    # embeddings: services 3*4 + time 5*4 + positions 2*4 + cls 4 + mask 4 = 48
    assert expected_num_params(cfg) == 248
    # FLOPs, 1 event: T = 2 tokens; fwd = 2*172*2 + 2*1*2*2*4 + 2*2*4*1 (adaptor) = 688 + 32 + 16 = 736
    assert flops_per_sample(cfg, n_events=1, training=False) == 736
    assert flops_per_sample(cfg, n_events=1) == 3 * 736


@pytest.mark.parametrize("item_encoder", ITEM_ENCODERS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_a_users_embedding(corpus, item_encoder, pooling):
    tab, vocabs, tok = corpus
    model = _model(vocabs, tok, item_encoder, pooling=pooling, out_dim=5)
    batch = _batch(tab, vocabs, tok)
    lengths = batch["length"]
    assert lengths.min() < lengths.max()  # a real mix of lengths
    with torch.no_grad():
        together = model(to_torch(batch))
        alone = [model(to_torch(_one_user(batch, i)))[0] for i in range(len(lengths))]
    assert together.shape == (len(lengths), 5)
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-5)
    # Padding content is ignored: garbage in padded slots changes nothing.
    noisy = {k: v.copy() for k, v in batch.items()}
    pad = ~(np.arange(batch["service"].shape[1])[None, :] < lengths[:, None])
    for k in ("service", "category", "time", "tokens"):
        noisy[k][pad] = 1
    noisy["text_vector"][pad] = 99.0
    with torch.no_grad():
        torch.testing.assert_close(model(to_torch(noisy)), together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("item_encoder", ITEM_ENCODERS)
def test_single_and_zero_event_users_and_gradients(corpus, item_encoder):
    tab, vocabs, tok = corpus
    rows = tab.to_pydict()
    for k in ("ts", "service", "text", "item_id", "category", "value"):
        rows[k][0] = rows[k][0][:1]  # user 0: one event
        rows[k][1] = []  # user 1: none
    model = _model(vocabs, tok, item_encoder, pooling="mean").train()
    batch = to_torch(_batch(rows, vocabs, tok))
    z = model(batch)
    assert torch.isfinite(z).all()
    z.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        model.eval()
        h, valid = model.hidden(batch)
        torch.testing.assert_close(model(batch)[1], h[1, 0])  # no events: mean pooling falls back to [CLS]


def test_masked_event_hides_item_and_time(corpus):
    tab, vocabs, tok = corpus
    model = _model(vocabs, tok, "category")
    batch = _batch(tab, vocabs, tok)
    i = int(np.argmax(batch["length"]))
    batch["masked"][i, 0] = True
    other = {k: v.copy() for k, v in batch.items()}
    other["category"][i, 0] = 1
    other["time"][i, 0] = 1
    other["text_vector"][i, 0] = 5.0
    with torch.no_grad():
        a, b = model(to_torch(batch)), model(to_torch(other))
        unmasked = model(to_torch({**batch, "masked": np.zeros_like(batch["masked"])}))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[i], unmasked[i])


def test_text_encoder_handles_empty_non_ascii_and_long_text(corpus):
    tab, vocabs, tok = corpus
    model = _model(vocabs, tok, "text")
    rows = {"ts": [[0, 1, 2]], "service": [["search"] * 3], "text": [["", "한국어 🙂 naïve ünïcode", "long " * 5000]]}
    b = make_batch(rows, vocabs, tok)
    assert b["tokens"].shape == (1, 3, vocabs.config.max_text_tokens)
    with torch.no_grad():
        item = model.item(to_torch(b))  # (1, 3, d)
        assert torch.isfinite(item).all() and item.abs().sum(-1).gt(0).all()
        assert not torch.allclose(item[0, 0], item[0, 1])


def test_save_load_round_trip(corpus, tmp_path):
    tab, vocabs, tok = corpus
    model = _model(vocabs, tok, "text", out_dim=7)
    save_encoder(tmp_path / "enc", model, vocabs, tok)
    loaded, v2, t2 = load_encoder(tmp_path / "enc")
    assert loaded.config == model.config and v2 == vocabs and t2 == tok
    batch = to_torch(_batch(tab, vocabs, tok))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))
    assert (tmp_path / "enc" / "config.json").read_text() == model.config.to_json()


def test_concat_batches_pads_event_axis(corpus):
    tab, vocabs, tok = corpus
    a, b = make_batch(tab.slice(0, 3), vocabs, tok), make_batch(tab.slice(3, 2), vocabs, tok)
    both = make_batch(tab.slice(0, 5), vocabs, tok)
    cat = concat_batches([a, b])
    for k in both:
        np.testing.assert_array_equal(cat[k], both[k], err_msg=k)


def test_encoder_without_calendar_fields_ignores_event_dates(corpus):
    """time_fields=() (PretrainConfig.time_fields for data rated in sessions): the batch carries no time ids,
    the encoder has no time embeddings, and moving every event to another date leaves the embedding unchanged,
    while the default fields change it (the date is what a time-split CLUE pair could be matched by)."""
    from userfm.models.features import FeatureConfig

    tab, _, tok = corpus
    vocabs = fit_vocabs(tab, FeatureConfig(time_fields=()))
    b = make_batch(tab, vocabs, tok)
    assert b["time"].shape == (*b["service"].shape, 0) and vocabs.time_sizes == ()
    ts = tab.column("ts").combine_chunks()  # every event 40 days and 5 hours later
    later = pc.add(ts.flatten(), pa.scalar(dt.timedelta(days=40, hours=5), pa.duration("us")))
    moved = tab.set_column(tab.schema.get_field_index("ts"), "ts", pa.ListArray.from_arrays(ts.offsets, later))
    model = _model(vocabs, tok, "text")
    assert not len(model.times)
    with torch.no_grad():
        a, c = model(to_torch(make_batch(tab, vocabs, tok))), model(to_torch(make_batch(moved, vocabs, tok)))
    assert torch.equal(a, c)
    dated = fit_vocabs(tab)
    model = _model(dated, tok, "text")
    with torch.no_grad():
        a, c = model(to_torch(make_batch(tab, dated, tok))), model(to_torch(make_batch(moved, dated, tok)))
    assert not torch.allclose(a, c)
