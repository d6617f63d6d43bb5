"""Similar users through the faiss IVF index (userfm.infer.ann): exactness when every cell is probed, the index's
tie to its table, the refresh path that reuses centroids, embed's auto/on/off, and the serve store's answers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.infer.ann import (AnnConfig, AnnError, auto_nlist, auto_nprobe, build_index, exact_top_k, normalized, read_index,
                              recall_at_k, search, table_version, write_index)


def _table(n=3000, d=16, clusters=40, seed=0):
    """Clustered rows, like user embeddings: cluster centres plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return [f"u{i:05d}" for i in range(n)], x.astype(np.float32)


def _write_table(folder, ids, x):
    (folder / "embeddings").mkdir(parents=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    pq.write_table(pa.table({"user_id": ids, "embedding": emb}), folder / "embeddings" / "part-00000.parquet")


def test_auto_nlist_follows_four_root_n_within_its_bounds():
    assert auto_nlist(1_000_000) == 4000  # 4 * 1000
    assert auto_nlist(100_000) == 1265  # round(4 * 316.23)
    assert auto_nlist(10_000) == 256  # 4 * 100 = 400, but 10,000 // 39 = 256 rows per cell at least
    assert auto_nlist(100) == 2  # 100 // 39
    assert auto_nlist(10**10) == 16_384
    assert (auto_nprobe(4000), auto_nprobe(1265), auto_nprobe(256)) == (250, 79, 32)  # nlist / 16, at least 32
    assert build_index(_table(n=2000)[1], AnnConfig(nlist=20)).nprobe == 20  # never more than the cells there are
    with pytest.raises(AnnError, match="nprobe"):
        AnnConfig(nprobe=-1)


def test_every_cell_probed_is_exact_search_with_cosine_scores():
    ids, x = _table()
    index = build_index(x, AnnConfig(nlist=20, nprobe=20))
    assert (index.nlist, index.nprobe, index.ntotal) == (20, 20, len(ids))
    q = x[[0, 17, 2999]]
    scores, rows = search(index, q, 10)
    np.testing.assert_array_equal(rows, exact_top_k(x, q, 10))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.take_along_axis(xn[[0, 17, 2999]] @ xn.T, rows, axis=1), rtol=1e-5, atol=1e-6)
    assert (rows[:, 0] == [0, 17, 2999]).all()  # each row is its own nearest


def test_fewer_cells_probed_still_finds_most_neighbours_and_recall_counts_overlap():
    ids, x = _table()
    exact = exact_top_k(x, x[:200], 10)
    _, one = search(build_index(x, AnnConfig(nlist=40, nprobe=1)), x[:200], 10)
    _, all_ = search(build_index(x, AnnConfig(nlist=40, nprobe=40)), x[:200], 10)
    assert recall_at_k(all_, exact) == 1.0
    assert 0.3 < recall_at_k(one, exact) < 1.0  # one cell of 40 on clustered rows: most, not all
    assert recall_at_k(np.array([[1, 2, -1, -1]]), np.array([[2, 5, 1, 7]])) == 0.5  # {1, 2} of 4


def test_many_cells_find_their_rows_through_a_graph_and_keep_recall(tmp_path):
    import faiss

    from userfm.infer.ann import HNSW_QUANTIZER_FROM

    ids, x = _table(n=HNSW_QUANTIZER_FROM * 40, d=8, clusters=200)
    meta = write_index(tmp_path, ids, x, AnnConfig(nlist=HNSW_QUANTIZER_FROM, nprobe=64))
    index, _ = read_index(tmp_path, ids, x)
    quantizer = faiss.downcast_index(index.quantizer)
    assert meta["quantizer"] == "hnsw32" and isinstance(quantizer, faiss.IndexHNSW)
    assert index.nprobe == 64 and quantizer.hnsw.efSearch == 128  # read back with its search depth
    q = np.arange(0, len(ids), 97)
    _, found = search(index, x[q], 10)
    assert recall_at_k(found, exact_top_k(x, x[q], 10)) > 0.9  # 64 of 1,024 cells on clustered rows


def test_zero_rows_stay_zero_when_normalised():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(normalized(x), [[0.6, 0.8], [0.0, 0.0]])


def test_index_round_trips_and_refuses_another_table(tmp_path):
    ids, x = _table(n=500)
    meta = write_index(tmp_path, ids, x, AnnConfig(nlist=8, nprobe=8))
    assert meta["users"] == 500 and meta["nlist"] == 8 and meta["centroids"] == "trained"
    assert meta["table_version"] == table_version(ids, x)
    index, read = read_index(tmp_path, ids, x)
    assert read == json.loads((tmp_path / "ann" / "index.json").read_text()) and index.ntotal == 500 and index.nprobe == 8
    changed = x.copy()
    changed[3, 0] += 1.0
    with pytest.raises(AnnError, match="rebuild it with `userfm embed`"):
        read_index(tmp_path, ids, changed)
    assert read_index(tmp_path / "elsewhere") == (None, None)


def test_a_refresh_reuses_the_centroids_and_adds_every_row_again(tmp_path):
    ids, x = _table(n=1000)
    write_index(tmp_path / "v1", ids, x, AnnConfig(nlist=10, nprobe=10))
    ids2, x2 = _table(n=1200, seed=1)
    meta = write_index(tmp_path / "v2", ids2, x2, AnnConfig(nlist=99), previous_dir=tmp_path / "v1")
    assert meta["nlist"] == 10 and meta["centroids"].startswith("reused from") and meta["users"] == 1200
    old, _ = read_index(tmp_path / "v1")
    new, _ = read_index(tmp_path / "v2", ids2, x2)
    np.testing.assert_array_equal(old.quantizer.reconstruct_n(0, 10), new.quantizer.reconstruct_n(0, 10))
    np.testing.assert_array_equal(search(new, x2[:5], 3)[1], exact_top_k(x2, x2[:5], 3))  # nprobe = nlist: exact


def test_write_ann_auto_on_off(tmp_path):
    from userfm.infer.embed import write_ann

    ids, x = _table(n=300)
    _write_table(tmp_path, ids, x)
    meta = write_ann(tmp_path, "on", progress=lambda s: None)
    assert meta["users"] == 300 and (tmp_path / "ann" / "index.faiss").is_file()
    assert write_ann(tmp_path, "auto", progress=lambda s: None) is None  # 300 < ANN_MIN_USERS
    assert not (tmp_path / "ann").exists()  # an index of another table is never left behind


def test_store_answers_from_its_index_and_falls_back_to_exact_for_a_stale_one(tmp_path):
    from userfm.serve.deployments import EmbeddingStore

    store_cls = EmbeddingStore.func_or_class
    ids, x = _table(n=800)
    _write_table(tmp_path / "t", ids, x)
    exact = store_cls(str(tmp_path / "t"))
    assert exact.info()["similar"] == "exact"
    want = exact.similar("u00005", 7)
    write_index(tmp_path / "t", ids, x, AnnConfig(nlist=8, nprobe=8))  # every cell probed: the same answer
    ann = store_cls(str(tmp_path / "t"))
    assert ann.info()["similar"].startswith("ann: faiss") and "nprobe 8" in ann.info()["similar"]
    got = ann.similar("u00005", 7)
    assert [u for u, _ in got] == [u for u, _ in want] and "u00005" not in [u for u, _ in got]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)
    assert ann.snapshot().ann is None and ann.table.ann is not None  # the ingress copy carries no index
    assert ann.similar("nobody", 3) is None
    write_index(tmp_path / "t", ids[:-1] + ["other"], x)  # an index of another table in the folder
    stale = store_cls(str(tmp_path / "t"))
    assert stale.info()["similar"].startswith("exact (index not used:") and stale.similar("u00005", 7) == want
