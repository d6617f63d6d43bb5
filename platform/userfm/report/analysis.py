"""The numbers behind the report's figures, pure numpy / scikit-learn: metrics logs, per-user modes, cluster
keywords (TF-IDF), k-NN label agreement against its chance level, 2-D projections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.report.common import ReportError


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` by step; a step logged twice (a resumed run) keeps its last row."""
    rows: dict[int, dict] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}: line {i} is not JSON") from None
        if "step" in row:
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def mode_by_row(parents: np.ndarray, values: pa.Array, n_rows: int) -> np.ndarray:
    """The most frequent value per row (ties: smallest value), None for rows with no value.

    Args:
        parents: (M,) row index of each value; values: (M,) strings (nulls ignored).
    Returns:
        (n_rows,) object array.
    """
    out = np.full(n_rows, None, dtype=object)
    t = pa.table({"p": pa.array(np.asarray(parents, np.int64)), "v": values}).filter(pc.is_valid(values))
    if not t.num_rows:
        return out
    g = t.group_by(["p", "v"]).aggregate([([], "count_all")]).sort_by([("p", "ascending"), ("count_all", "descending"), ("v", "ascending")])
    p = g.column("p").to_numpy()
    first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    out[p[first]] = np.array(g.column("v").to_pylist(), dtype=object)[first]
    return out


def cluster_keywords(docs: list[str], labels: np.ndarray, k: int, top: int) -> list[list[tuple[str, float]]]:
    """Top keywords of each cluster: mean TF-IDF vector of the cluster's users minus that of all users.

    Each user's event text is one document (sublinear tf, l2-normalised rows); a word ranks high when the
    cluster's users use it much more than users overall, so words that every template repeats ("new",
    "size") sink while a cluster's theme ("dividend", "stocks") rises.

    Args:
        docs: (N,) one text per user; labels: (N,) cluster index in [0, k).
    Returns:
        k lists of (word, weight > 0), highest first, at most ``top`` each.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:  # words of 3+ letters used by 2+ users; English stop words out
        tv = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b", min_df=min(2, len(docs)), sublinear_tf=True)
        x = tv.fit_transform(docs)  # (N, terms) sparse
    except ValueError:  # empty vocabulary
        return [[] for _ in range(k)]
    vocab = tv.get_feature_names_out()
    overall = np.asarray(x.mean(0)).ravel()
    out = []
    for c in range(k):
        m = labels == c
        lift = (np.asarray(x[m].mean(0)).ravel() - overall) if m.any() else np.zeros_like(overall)
        idx = [i for i in np.argsort(-lift, kind="stable")[:top] if lift[i] > 0]
        out.append([(str(vocab[i]), float(lift[i])) for i in idx])
    return out


def knn_agreement(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Mean share of each point's k nearest neighbours (cosine) sharing its label, and the chance level.

    Args:
        x: (N, D) embeddings; labels: (N,) hashable labels, None = unknown (left out).
    Returns:
        (agreement, chance = sum over labels of share^2); NaN when fewer than k + 1 labelled points.
    """
    from sklearn.neighbors import NearestNeighbors

    keep = np.array([v is not None for v in labels])
    x, labels = x[keep], labels[keep]
    if len(x) <= k:
        return float("nan"), float("nan")
    _, share = np.unique(labels.astype(str), return_counts=True)
    chance = float(((share / share.sum()) ** 2).sum())
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(xn).kneighbors(xn, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean()), chance


def project_2d(x: np.ndarray, method: str, perplexity: float, seed: int, iters: int = 500) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) with UMAP (``method`` umap, or auto when installed) or t-SNE; returns the method used."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine geometry, as the losses use
    if method in ("auto", "umap"):
        try:
            import umap  # optional
        except ImportError:
            if method == "umap":
                raise ReportError("map_method=umap but the umap-learn package is not installed") from None
        else:
            return umap.UMAP(n_components=2, random_state=seed).fit_transform(xn), "UMAP"
    if len(xn) < 5:
        return np.c_[xn[:, 0], xn[:, 1] if xn.shape[1] > 1 else np.zeros(len(xn))], "raw"
    from sklearn.manifold import TSNE

    p = float(min(perplexity, (len(xn) - 1) / 3))
    return TSNE(n_components=2, perplexity=p, init="pca", learning_rate="auto", max_iter=iters,
                random_state=seed).fit_transform(xn), "t-SNE"
