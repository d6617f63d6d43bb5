"""Item co-occurrence vectors: what an item *is* from which users take it, learned without labels.

Event texts tell the encoder what an item is about; they cannot tell two items apart whose titles share
their words (the synthetic taste sets, ``SynthConfig.item_signal``; real catalogues' near-duplicate
titles). Which users take an item can. Before pretraining, each training item (keyed by its text hash,
like the MiniLM cache) gets a ``dim``-vector from the item-item co-occurrence of the training users'
histories, factorised as in Levy & Goldberg 2014 ("Neural word embedding as implicit matrix
factorization"; item2vec's SGNS solves the same problem):

    X      (U, I)  binary: user u took item i (among u's last ``max_events`` events, what the encoder sees;
                   every event when it trains on every window, ``PretrainConfig.cooc_windows``)
    C      (I, I)  X^T X without the diagonal (users who took both items)
    PPMI   (I, I)  max(0, log(C_ij * N / (c_i * c_j))),  c_i = sum_j C_ij,  N = sum_ij C_ij
    V      (I, dim) = U_k * sqrt(S_k) of a truncated SVD of PPMI, rows scaled to norm sqrt(dim)

The encoder adds a learned linear map of V[item] to each event's input (``EncoderConfig.cooc_items``);
the table is a frozen buffer saved with the weights, so embed and serve need nothing more. Items with
fewer than ``min_users`` training users (and items first seen after pretraining) get no vector (zeros).

Measured (AMD 2-vCPU box, 10k synthetic users, ``item_signal`` 0.5, age_bracket, logistic on 6k users):
the mean of a user's item vectors at dim 32 reaches 0.517 accuracy, a bag of whole item identities
0.431, TF-IDF of words 0.316 (``experiments/benchmarks/synth_channels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse


@dataclass(frozen=True)
class CoocConfig:
    dim: int = 32  # vector size (truncated-SVD rank); reduced to items - 1 on tiny catalogues
    min_users: int = 2  # items taken by fewer training users get no vector
    max_events: int = 64  # each user's most recent events counted (the encoder's window); 0 = every event
    seed: int = 0  # randomized SVD seed
    key: str = "text"  # what one item is: "text" (the event text's hash) | "item_id" (features.item_hash: its item id)

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.min_users < 1:
            raise ValueError(f"min_users must be >= 1, got {self.min_users}")
        if self.max_events < 0:
            raise ValueError(f"max_events must be >= 0 (0: every event), got {self.max_events}")
        if self.key not in ("text", "item_id"):
            raise ValueError(f"key must be 'text' or 'item_id', got {self.key!r}")


def user_item_matrix(rows: pa.Table, max_events: int = 64, key: str = "text") -> tuple[np.ndarray, sparse.csr_matrix]:
    """Sequence rows (``text`` list column, oldest first; ``item_id`` too for ``key="item_id"``) -> item hashes
    and the binary user x item matrix.

    Returns:
        hashes: (I,) int64, sorted, the key of each column (:func:`userfm.models.features.text_hash` of the text,
        or :func:`userfm.models.features.item_hash`); X: (U, I) float32 CSR of 0/1, one row per input row,
        counting each user's last ``max_events`` events (0: all of them).
    """
    from userfm.models.features import hash_strings, item_hash

    texts = rows.column("text").combine_chunks() if rows.num_rows else pa.array([], pa.list_(pa.string()))
    n = pc.list_value_length(texts).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (U,)
    ends = np.cumsum(n)
    starts = ends - n
    keep_from = starts if max_events == 0 else np.maximum(starts, ends - max_events)  # the last max_events of each row
    row = np.repeat(np.arange(len(n)), n)  # (E,) the row of each flattened event
    idx = np.flatnonzero(np.arange(int(n.sum())) >= keep_from[row])  # kept events, row by row, oldest first
    user = row[idx]
    taken = pa.array(idx, pa.int64())
    flat = texts.flatten().take(taken)
    if key == "item_id":
        h = item_hash(rows.column("item_id").combine_chunks().flatten().take(taken), flat)
    else:
        h = hash_strings(flat)
    hashes, col = np.unique(h, return_inverse=True)
    x = sparse.csr_matrix((np.ones(len(col), np.float32), (user, col)), shape=(len(n), len(hashes)))
    x.data[:] = 1.0  # duplicates summed by the constructor: binary "took it"
    return hashes, x


def ppmi(x: sparse.csr_matrix) -> sparse.csr_matrix:
    """(U, I) binary user x item -> (I, I) positive pointwise mutual information of item co-occurrence.

    Co-occurrence is the number of users who took both items (diagonal dropped); PMI uses the marginals
    of that matrix (module docstring). Pairs that never co-occur are 0 (sparse).
    """
    c = (x.T @ x).tocoo()
    off = c.row != c.col
    c = sparse.coo_matrix((c.data[off].astype(np.float64), (c.row[off], c.col[off])), shape=c.shape)
    total = c.data.sum()
    marg = np.asarray(c.sum(axis=1)).ravel()  # (I,)
    if total == 0:
        return sparse.csr_matrix(c.shape, dtype=np.float32)
    pmi = np.log(c.data * total / (marg[c.row] * marg[c.col]))
    pos = pmi > 0
    return sparse.csr_matrix((pmi[pos].astype(np.float32), (c.row[pos], c.col[pos])), shape=c.shape)


def fit_item_vectors(rows: pa.Table, cfg: CoocConfig = CoocConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Training sequence rows -> ``(hashes (I',) int64 sorted, vectors (I', dim') float32)``.

    Only items with >= ``min_users`` users and a non-empty PPMI row are returned; ``dim'`` is
    ``min(dim, I' - 1)``. Fewer than 2 such items -> empty arrays of shape (0,), (0, 0).
    """
    hashes, x = user_item_matrix(rows, cfg.max_events, cfg.key)
    users_per_item = np.asarray(x.sum(axis=0)).ravel()
    keep = users_per_item >= cfg.min_users
    hashes, x = hashes[keep], x[:, keep]
    p = ppmi(x)
    nonempty = np.diff(p.indptr) > 0
    hashes, p = hashes[nonempty], p[nonempty][:, nonempty]
    v = svd_vectors(p, cfg.dim, cfg.seed)
    return (hashes, v) if v.size else (np.zeros(0, np.int64), v)


def svd_vectors(p: sparse.csr_matrix, dim: int, seed: int = 0) -> np.ndarray:
    """(I, I) PPMI -> (I, dim') item vectors, dim' = min(dim, I - 1), each row scaled to norm sqrt(dim')
    (an all-zero PPMI row stays zero). Fewer than 2 items -> shape (0, 0)."""
    from sklearn.decomposition import TruncatedSVD

    dim = min(dim, p.shape[0] - 1)
    if dim < 1:
        return np.zeros((0, 0), np.float32)
    svd = TruncatedSVD(dim, algorithm="randomized", random_state=seed).fit(p)
    v = (svd.components_.T * np.sqrt(svd.singular_values_)).astype(np.float32)  # (I, dim); P symmetric: V ~ U
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 0, v / np.maximum(norm, 1e-12) * np.sqrt(dim), 0.0).astype(np.float32)


def histories_matrix(histories: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """Per user, catalog indices -> (U, n_items) binary CSR float32 (an item taken twice counts once)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate([np.asarray(h, np.int64) for h in histories]) if histories else np.zeros(0, np.int64)
    x = sparse.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_items))
    x.data[:] = 1.0  # duplicates were summed by the constructor
    return x


def catalog_vectors(histories: list[np.ndarray], n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Users' item histories (catalog indices) -> (n_items, dim') co-occurrence vectors of the catalog.

    The same PPMI + truncated SVD as :func:`fit_item_vectors`, over a catalog the caller has already indexed
    (evaluate's retrieval heads: the training users' histories). Items that co-occur with nothing stay
    zero; no co-occurrence at all, or fewer than 2 catalog items -> shape (n_items, 0).
    """
    p = ppmi(histories_matrix(histories, n_items))
    v = svd_vectors(p, dim, seed) if p.nnz else np.zeros((0, 0), np.float32)
    return v if v.size else np.zeros((n_items, 0), np.float32)
