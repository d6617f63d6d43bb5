"""Approximate nearest users: a faiss IVF index written beside an embedding table, for ``/similar`` at scale.

Exact cosine top-k over N users costs a (N, D) matrix-vector product and a partition per query: measured on
one core at 128 floats, 0.1 ms at 10k users, 2.6 ms at 100k, 27 ms (p99 55 ms) at 1M (docs/results/scale.md).
Above ``ANN_MIN_USERS`` ``userfm embed`` (and ``userfm refresh``) also write an inverted-file index of the
L2-normalised rows (inner product = cosine):

    <table>/ann/index.faiss   faiss IndexIVFFlat, METRIC_INNER_PRODUCT, ids = the table's row numbers
    <table>/ann/index.json    users, dim, nlist, nprobe, table_version (the digest serve computes), timings

Why faiss (faiss-cpu) over hnswlib and usearch: IVF-Flat builds in seconds at 1M users on 2 cores (k-means on a
sample, then one assignment pass) where an HNSW graph takes minutes; its recall is set at query time by one
knob (``nprobe``) without a rebuild; a refresh reuses the trained centroids and re-adds the rows; and it is
Meta's maintained library with wheels for every platform this runs on (hnswlib ships only an sdist that needs a
C++ toolchain; usearch is fast but younger). Memory: the normalised rows (N x D x 4 bytes) plus 8 bytes of id
per row plus nlist x D centroids; at 1M x 128 about 520 MB next to the 512 MB table serve already holds.

``faiss`` is imported only inside the functions that build, load or search an index.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ANN_MIN_USERS = 50_000  # below: exact search (about 1.3 ms per query at 50k users: half the 100k figure)
INDEX_DIR = "ann"
INDEX_FILE = "index.faiss"
META_FILE = "index.json"


class AnnError(ValueError):
    """An index that does not belong to its table, or bad index settings; the message says which."""


@dataclass(frozen=True)
class AnnConfig:
    nlist: int = 0  # inverted lists (k-means cells); 0 = auto: 4 * sqrt(N), between 16 and 16,384
    nprobe: int = 0  # cells searched per query; 0 = auto: nlist / 16, at least 32 (a fixed share of the rows, so recall
    #                  holds as the table grows: at 100k users nprobe 32 of 1,265 cells gave recall@10 0.977, 64 0.994)
    train_per_list: int = 64  # k-means training rows per cell (a sample of the table, seeded)
    seed: int = 0

    def __post_init__(self):
        if self.nlist < 0 or self.nprobe < 0 or self.train_per_list < 1:
            raise AnnError(f"nlist and nprobe must be >= 0 (0 = auto), train_per_list >= 1; got nlist={self.nlist}, "
                           f"nprobe={self.nprobe}, train_per_list={self.train_per_list}")


def table_version(ids: list[str], x: np.ndarray) -> str:
    """The digest that identifies one embedding table (its float32 rows and ids, in order); serve reports it."""
    digest = hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float32).tobytes(), digest_size=6)
    digest.update("\x1f".join(ids).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def normalized(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit L2 norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def auto_nlist(n: int) -> int:
    """Cells for ``n`` rows: 4 sqrt(n), the usual IVF rule (1M -> 4,000), between 16 and 16,384 and at most n / 39
    (faiss wants >= 39 training rows per centroid)."""
    return int(max(1, min(16_384, max(16, round(4 * math.sqrt(n))), n // 39)))


def auto_nprobe(nlist: int) -> int:
    """Cells probed per query: nlist / 16 (about 6 % of the rows), at least 32."""
    return max(32, nlist // 16)


HNSW_QUANTIZER_FROM = 1024  # cells: from here a row finds its cell through an HNSW graph over the centroids


def _reusable(previous, n: int, d: int) -> bool:
    """An earlier index whose cells still fit a table of ``n`` rows of dimension ``d`` (it has not grown past 4x)."""
    return previous is not None and previous.d == d and previous.is_trained and n <= 4 * max(previous.ntotal, 1)


def set_search(index, nprobe: int) -> None:
    """Probe ``nprobe`` cells per query (the HNSW quantizer, if any, searches at least twice that deep)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(nprobe, ivf.nlist)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(2 * ivf.nprobe, 64)


def build_index(x: np.ndarray, cfg: AnnConfig = AnnConfig(), previous=None):
    """(N, D) embeddings -> a trained, filled ``faiss.IndexIVFFlat`` (ids 0..N-1 = row numbers).

    The cells are k-means centroids of a sample (``train_per_list`` rows per cell, exact k-means). Adding a row
    searches the centroids for its cell: exactly below HNSW_QUANTIZER_FROM cells; above, through an HNSW graph of
    the centroids, so adding N rows costs O(N log nlist) rather than O(N nlist) (with nlist ~ 4 sqrt(N) the exact
    assignment grew as N^1.4: 0.4 s at 100k users, 10.6 s at 1M; the graph: 0.7 s, 9.0 s, same recall@10).

    ``previous``: an index of an earlier version of the table (same D): its trained centroids are reused and only
    the rows are added again (what a refresh does; the cells still fit while the table has not grown past 4x)."""
    import faiss

    xn = normalized(x)
    n, d = xn.shape
    if _reusable(previous, n, d):
        index = faiss.clone_index(previous)
        index.reset()  # keeps the trained coarse quantizer, drops the rows
    else:
        nlist = cfg.nlist or auto_nlist(n)
        if n < nlist:
            raise AnnError(f"{n} rows cannot train {nlist} cells")
        hnsw = nlist >= HNSW_QUANTIZER_FROM
        quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if hnsw else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        if hnsw:
            index.clustering_index = faiss.IndexFlatIP(d)  # k-means assigns exactly; the graph is built on its centroids
        rng = np.random.default_rng(cfg.seed)
        sample = xn if n <= nlist * cfg.train_per_list else xn[np.sort(rng.choice(n, nlist * cfg.train_per_list, replace=False))]
        index.cp.seed = cfg.seed
        index.train(sample)
    index.add_with_ids(xn, np.arange(n, dtype=np.int64))
    set_search(index, cfg.nprobe or auto_nprobe(index.nlist))
    return index


def write_index(table_dir: str | Path, ids: list[str], x: np.ndarray, cfg: AnnConfig = AnnConfig(),
                previous_dir: str | Path | None = None) -> dict:
    """Build the index of the table (``ids``, ``x``) and write it under ``table_dir/ann``; return its metadata.
    ``previous_dir``: an earlier table's folder whose index's centroids are reused (``build_index(previous=)``)."""
    import faiss

    t0 = time.perf_counter()
    previous = None
    if previous_dir is not None and (Path(previous_dir) / INDEX_DIR / META_FILE).is_file():
        previous = faiss.read_index(str(Path(previous_dir) / INDEX_DIR / INDEX_FILE))
    reused = _reusable(previous, len(ids), int(x.shape[1]))
    index = build_index(x, cfg, previous)
    build_s = time.perf_counter() - t0
    folder = Path(table_dir) / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # index.json last: a folder with it is complete
    faiss.write_index(index, str(folder / INDEX_FILE))
    quantizer = faiss.downcast_index(index.quantizer)
    meta = {"kind": "userfm.ann", "library": f"faiss {faiss.__version__}", "index": "IVFFlat", "metric": "cosine",
            "users": len(ids), "dim": int(x.shape[1]), "nlist": int(index.nlist), "nprobe": int(index.nprobe),
            "quantizer": "hnsw32" if isinstance(quantizer, faiss.IndexHNSW) else "flat",
            "centroids": f"reused from {previous_dir}" if reused else "trained", "table_version": table_version(ids, x),
            "build_s": round(build_s, 3), "bytes": (folder / INDEX_FILE).stat().st_size}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def read_index(table_dir: str | Path, ids: list[str] | None = None, x: np.ndarray | None = None, version: str | None = None):
    """-> (faiss index, metadata) of ``table_dir/ann``, or (None, None) when the folder has no index.

    With ``ids``/``x`` (the table as loaded; or its ``version``, already computed) the index must have been built
    from exactly that table (same ``table_version``): an index left over from another table raises AnnError rather
    than answer for the wrong rows."""
    import faiss

    folder = Path(table_dir) / INDEX_DIR
    if not (folder / META_FILE).is_file():
        return None, None
    meta = json.loads((folder / META_FILE).read_text())
    if version is None and ids is not None and x is not None:
        version = table_version(ids, x)
    if version is not None and meta.get("table_version") != version:
        raise AnnError(f"{folder}: the index was built from table version {meta.get('table_version')}, the table "
                       f"is {version}; rebuild it with `userfm embed` or drop {folder}")
    index = faiss.read_index(str(folder / INDEX_FILE))
    set_search(index, int(meta["nprobe"]))
    return index, meta


def search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) queries -> ((B, k) cosine scores, (B, k) row numbers; -1 where fewer than k were found)."""
    scores, rows = index.search(normalized(np.atleast_2d(q)), k)
    return scores, rows


def exact_top_k(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """(N, D) table, (B, D) queries -> (B, k) row numbers of the highest cosine, best first (ties by row)."""
    s = normalized(np.atleast_2d(q)) @ normalized(x).T  # (B, N)
    k = min(k, s.shape[1])
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.lexsort((top, -np.take_along_axis(s, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found_i & exact_i| / |exact_i| ((B, k) row numbers each; -1 never matches)."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))
