"""The ``future`` objective (PinnerFormer's dense all-action loss, https://arxiv.org/abs/2205.04507): the user
embedding of a history cut at a random point predicts every item of the window that follows the cut.

Each step, each user's events are cut at a random position c (1 <= c < n): view ``a`` is the history before
the cut (what the encoder reads, pooled into the user embedding as at inference), view ``b`` the next
``window`` events (the targets). A target's representation is the encoder's own item vector (item encoder +
hashed item id + co-occurrence vector, no time, no position): the input and the output side share it, so an
id-only log (hashed item ids) gets a real model. The loss is a sampled softmax over the batch's targets
(in-batch negatives) with the log-frequency correction of sampled softmax (Yi et al., RecSys 2019): each
candidate's logit is lowered by the log of its share of the batch's targets, so popular items are not
pushed down merely for being frequent negatives. Candidates with the positive's own item id are not
negatives (a popular item is the target of many users in one batch).

Pure functions: :func:`future_views` (numpy, per step) and :func:`future_loss` (torch).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def future_views(batch: Mapping[str, np.ndarray], window: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One featurized batch (B, L, ...) -> views ``a.*`` (events before a random cut, width L) and ``b.*`` (the
    ``window`` events from the cut on, width ``window``), both left-aligned with their own ``length``.

    The cut c of a user with n >= 2 events is uniform in [1, n - 1]; a user with one event keeps it in ``a``
    and has no targets (``b.length`` 0). Per-user arrays other than ``length`` are dropped; ``a.masked`` is all
    False (as in CLUE's views, it keeps the encoder's [MASK] vector in the DDP graph).
    """
    length = np.asarray(batch["length"], dtype=np.int64)
    b, width = batch["service"].shape
    cut = np.where(length >= 2, 1 + np.floor(rng.random(b) * np.maximum(length - 1, 1)).astype(np.int64), length)
    n_future = np.minimum(length - cut, window)
    users = np.arange(b)[:, None]
    pos_a = np.minimum(np.arange(width)[None, :], np.maximum(cut - 1, 0)[:, None])  # (B, L): padding repeats the last
    pos_b = np.minimum(cut[:, None] + np.arange(window)[None, :], np.maximum(length - 1, 0)[:, None])  # (B, W)
    a, fut = {}, {}
    for k, v in batch.items():
        if k in ("length", "masked") or v.ndim < 2:
            continue
        a[k] = v[users, pos_a]
        fut[k] = v[users, pos_b]
    valid_a = np.arange(width)[None, :] < cut[:, None]
    valid_b = np.arange(window)[None, :] < n_future[:, None]
    for view, valid in ((a, valid_a), (fut, valid_b)):
        for k, v in view.items():  # padding positions hold padding ids, as make_batch writes them
            mask = valid.reshape(valid.shape + (1,) * (v.ndim - 2))
            view[k] = np.where(mask, v, 0).astype(v.dtype)
    a["length"], fut["length"] = cut, n_future
    a["masked"] = np.zeros((b, width), bool)  # nothing masked; the encoder's [MASK] vector stays in DDP's graph
    return {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in fut.items()}}


def future_loss(user: Tensor, items: Tensor, valid: Tensor, item_keys: Tensor, temperature: float | Tensor,
                log_q_correction: bool = True) -> tuple[Tensor, float]:
    """Dense all-action sampled softmax with in-batch negatives.

    Args:
        user: (B, d) user embeddings (projected to the item space).
        items: (B, W, d) item vectors of each user's future window.
        valid: (B, W) bool, real targets (False: padding).
        item_keys: (B, W) int64 item identities (text hashes): candidates with the positive's key are not
            negatives, and the log-frequency correction counts keys.
        temperature: scalar > 0; both sides are L2-normalised (cosine logits / temperature).
        log_q_correction: subtract log(count of the candidate's key / number of targets) from its logit.

    Returns:
        (0-d loss: mean over the P real (user, target) pairs of -log softmax over the P candidates at the
        pair's own target, in-batch top-1 accuracy of those pairs as a float). With no real pair the loss
        is 0 (connected to the graph).
    """
    flat = items[valid]  # (P, d) candidates = every real target of the batch
    owner = torch.arange(user.shape[0], device=user.device)[:, None].expand_as(valid)[valid]  # (P,)
    keys = item_keys[valid]  # (P,)
    p = flat.shape[0]
    if p == 0:
        return (user.sum() + items.sum()) * 0.0, 0.0
    u = F.normalize(user, dim=-1)[owner]  # (P, d): each pair's user
    logits = u @ F.normalize(flat, dim=-1).T / temperature  # (P, P): pair i's user against candidate j
    if log_q_correction:
        _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        logits = logits - torch.log(counts[inverse].to(logits.dtype) / p)[None, :]
    same = keys[:, None] == keys[None, :]
    eye = torch.eye(p, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))  # the same item elsewhere in the batch is no negative
    target = torch.arange(p, device=logits.device)
    loss = F.cross_entropy(logits, target)
    acc = float((logits.detach().argmax(-1) == target).float().mean())
    return loss, acc

