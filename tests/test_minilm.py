"""MiniLM vector cache: same vectors as direct encoding, reuse on rebuild, odd texts, lookups."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.models.features import text_hash
from userfm.models.minilm import CACHE_SCHEMA, VECTOR_DIM, MiniLMEncoder, VectorCache, build_cache, cached_hashes, to_table

TEXTS = ["red running shoes", "", "한국어 책 🙂", "long title " * 400, "red running shoes", "blue phone case"]


class CountingEncoder:
    """Wraps the real encoder and records every text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, texts):
        self.seen.extend(texts)
        return self.inner(texts)


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder(batch_size=4)


def test_cache_matches_direct_encoding_and_rebuild_reuses(encoder, tmp_path):
    enc = CountingEncoder(encoder)
    stats = build_cache(TEXTS, tmp_path, encoder=enc)
    assert stats["n_texts"] == 6 and stats["n_unique"] == 5 and stats["n_new"] == 5 and stats["n_reused"] == 0
    assert sorted(enc.seen) == sorted(set(TEXTS))  # duplicates encoded once
    part = next(tmp_path.glob("part-*.parquet"))
    assert pq.read_schema(part).remove_metadata() == CACHE_SCHEMA.remove_metadata()

    cache = VectorCache.load(tmp_path)
    got = cache.lookup(text_hash(TEXTS), strict=True)  # (6, 384)
    direct = np.stack([encoder.encode([t])[0] for t in TEXTS])  # one text at a time: no batch padding
    np.testing.assert_allclose(got, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(got[1], got[2])  # empty and non-ASCII texts get real, distinct vectors

    # Second build: nothing encoded, nothing written.
    enc.seen.clear()
    again = build_cache(pa.table({"text": TEXTS}), tmp_path, encoder=enc)
    assert again["n_new"] == 0 and again["n_reused"] == 5 and enc.seen == []
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    # Third build with one new text: only it is encoded, into a second part.
    more = build_cache(TEXTS + ["a brand new title"], tmp_path, encoder=enc)
    assert more["n_new"] == 1 and more["n_reused"] == 5 and enc.seen == ["a brand new title"]
    assert len(VectorCache.load(tmp_path)) == 6


def test_lookup_shapes_padding_and_strict(encoder, tmp_path):
    build_cache(["a", "b"], tmp_path, encoder=encoder)
    cache = VectorCache.load(tmp_path)
    h = np.array([[text_hash(["b"])[0], 0], [text_hash(["a"])[0], text_hash(["a"])[0]]])  # (2, 2), 0 = padding
    v = cache.lookup(h, strict=True)
    assert v.shape == (2, 2, VECTOR_DIM) and v.dtype == np.float32
    assert (v[0, 1] == 0).all() and (v[1, 0] == v[1, 1]).all() and not (v[0, 0] == v[1, 0]).all()
    with pytest.raises(KeyError):
        cache.lookup(text_hash(["never cached"]), strict=True)
    assert (cache.lookup(text_hash(["never cached"])) == 0).all()
    assert (VectorCache.load(tmp_path / "empty").lookup(h) == 0).all()


def test_encoder_is_a_map_batches_callable(encoder):
    out = encoder(pa.table({"text": ["x", None]}))
    assert out["vector"].shape == (2, VECTOR_DIM)
    np.testing.assert_array_equal(out["text_hash"], text_hash(["x", ""]))
    out_dict = encoder({"text": np.array(["x", ""], dtype=object)})  # Ray Data numpy batch format
    np.testing.assert_allclose(out_dict["vector"], out["vector"], atol=1e-6)


def test_batches_carry_cached_vectors_through_augmentation(encoder, tmp_path):
    from seqrows import all_scope, event_rows, table

    from userfm.models.features import fit_vocabs
    from userfm.objectives.pretext import ObjectiveConfig, simclr_batch, split_views

    tab = all_scope(table(event_rows(5, seed=2)))
    build_cache(sum(tab.column("text").to_pylist(), []), tmp_path, encoder=encoder)
    cache = VectorCache.load(tmp_path)
    cfg = ObjectiveConfig("simclr", replace_rate=0.5, shuffle_prob=1.0)
    a, b = split_views(simclr_batch(tab, fit_vocabs(tab), cfg=cfg, seed=0, vectors=cache))
    for view in (a, b):  # after crop/shuffle/replace, every vector still belongs to its event's text
        np.testing.assert_array_equal(view["text_vector"], cache.lookup(view["text_hash"]))
        assert view["text_vector"].shape == (*view["text_hash"].shape, VECTOR_DIM)
        assert np.abs(view["text_vector"]).sum(-1)[view["ts"] > 0].min() > 0


def test_text_blocks_cover_every_text_once_in_order():
    from userfm.models.minilm import text_blocks

    texts = [f"title {i}" for i in range(2500)]
    blocks = text_blocks(texts, size=1024)
    assert [b.num_rows for b in blocks] == [1024, 1024, 452]
    assert pa.concat_tables(blocks).column("text").to_pylist() == texts
    assert text_blocks([], size=1024) == []


def test_parts_written_one_by_one_are_all_read_and_nothing_half_written_is(encoder, tmp_path):
    """A build that dies after some batches keeps them: each part is complete on its own, a leftover temporary
    file is ignored, and the next build encodes only what is missing."""
    from userfm.models.minilm import write_part

    out = encoder(TEXTS[:3])
    write_part(tmp_path, to_table(out["text_hash"][:2], out["vector"][:2]))
    write_part(tmp_path, to_table(out["text_hash"][2:], out["vector"][2:]))
    (tmp_path / ".tmp-part-0-dead.parquet").write_bytes(b"PAR1 half a file")  # a writer killed mid-write
    assert sorted(cached_hashes(tmp_path).tolist()) == sorted(out["text_hash"].tolist())
    enc = CountingEncoder(encoder)
    more = build_cache(TEXTS, tmp_path, encoder=enc)
    assert more["n_reused"] == len(set(TEXTS[:3])) and sorted(enc.seen) == sorted(set(TEXTS) - set(TEXTS[:3]))
