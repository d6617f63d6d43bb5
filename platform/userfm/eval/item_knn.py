"""The item-kNN yardstick for next-item retrieval: item-item cosine over the user's last items.

What a recommender-systems engineer tries right after popularity (Sarwar et al., "Item-based
collaborative filtering recommendation algorithms", WWW 2001; RecBole's ``ItemKNN``). No training, no
pretraining, no text: which items the training users took together.

    X      (U, I)  binary: training user u took item i (their whole history, held-out item included, as
                   the popularity baseline counts them)
    S      (I, I)  cosine of item columns: S_ij = |users(i) & users(j)| / sqrt(|users(i)| |users(j)|),
                   S_ii = 0 (an item does not recommend itself)
    q_u    (I,)    1 for each distinct item among user u's last ``last`` items (0 = all of them)
    score  (I,)    q_u @ S + 1e-9 * pop / max(pop)

Popularity (training users' item counts) only breaks ties: items no recent item co-occurs with would
otherwise all tie at 0, and ties count against the held-out item. How many last items to read is
chosen on the val users (``EvalConfig.item_knn_last``), never on test.

Nothing here imports ``ray`` or ``torch``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import sparse

from userfm.models.cooc import histories_matrix

TIE_BREAK = 1e-9  # popularity's weight: below any difference of two cosine sums worth ranking by


def item_cosine(histories: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """Training users' item histories (catalog indices) -> (I, I) CSR float32 item-item cosine, diagonal 0."""
    x = histories_matrix(histories, n_items)
    co = (x.T @ x).tocsr()  # (I, I) users who took both
    users = co.diagonal().astype(np.float64)  # (I,) users who took each item
    co.setdiag(0.0)
    co.eliminate_zeros()
    inv = np.where(users > 0, 1.0 / np.sqrt(np.maximum(users, 1.0)), 0.0)
    return sparse.csr_matrix(sparse.diags(inv) @ co @ sparse.diags(inv), dtype=np.float32)


def recent_items(histories: list[np.ndarray], n_items: int, last: int) -> sparse.csr_matrix:
    """(n, I) binary CSR: each user's distinct items among their last ``last`` (0 = all) items."""
    return histories_matrix([h[-last:] if last else h for h in histories], n_items)


def knn_scorer(sim: sparse.csr_matrix, histories: list[np.ndarray], last: int,
               popularity: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A ``score_fn(rows) -> (len(rows), I)`` for :func:`userfm.eval.heads.retrieval_ranks`.

    Args:
        sim: (I, I) item-item similarity from :func:`item_cosine`.
        histories: per scored user, catalog indices of their items, oldest first (the held-out one excluded).
        last: how many of the most recent items to read (0 = all).
        popularity: (I,) training item counts, the tie-break.
    """
    q = recent_items(histories, sim.shape[0], last)
    tie = TIE_BREAK * np.asarray(popularity, np.float64) / max(float(np.max(popularity, initial=0.0)), 1.0)

    def score(rows: np.ndarray) -> np.ndarray:
        return (q[rows] @ sim).toarray().astype(np.float64) + tie

    return score
