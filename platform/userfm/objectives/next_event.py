"""The ``next`` objective (SASRec, https://arxiv.org/abs/1808.09781; HSTU's next-event task): a causal encoder
reads the events in order and the state after each event predicts the next event's item.

The encoder runs with ``causal=True`` (each event attends to [CLS] and the events before it) and the user
embedding is the state after the last event (``pooling="last"``), so the embedding served downstream is what
the objective trained to predict the next item from. The item side is the encoder's own item vectors (as in
:mod:`userfm.objectives.future`), so the input and output sides share one item representation; the loss is the same
in-batch sampled softmax with log-frequency correction over every (position, next item) pair of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from userfm.objectives.future import future_loss


def next_loss(states: Tensor, items: Tensor, length: Tensor, item_keys: Tensor, temperature: float | Tensor,
              log_q_correction: bool = True) -> tuple[Tensor, float]:
    """Next-item sampled softmax over a causal encoder's states.

    Args:
        states: (B, L, d) the (projected) state after each event (event axis without [CLS]).
        items: (B, L, d) each event's item vector.
        length: (B,) events per user; positions t < length - 1 predict the item at t + 1.
        item_keys: (B, L) int64 item identities (text hashes).
        temperature: scalar > 0.
        log_q_correction: see :func:`userfm.objectives.future.future_loss`.

    Returns:
        (0-d loss: mean over the P (user, position) pairs of -log softmax over the P next items of the batch at
        the pair's own next item, in-batch top-1 accuracy), exactly :func:`future_loss` with each pair a
        "user" whose window is its one next item.
    """
    b, l = states.shape[:2]
    has_next = torch.arange(l, device=states.device)[None, :] < (length[:, None] - 1)  # (B, L)
    nxt = torch.roll(has_next, 1, dims=1)  # the targets: positions 1 .. length - 1
    if l:
        nxt[:, 0] = False
    pred = states[has_next]  # (P, d)
    target = items[nxt][:, None]  # (P, 1, d): same order (row-major: user, then position)
    keys = item_keys[nxt][:, None]  # (P, 1)
    if pred.shape[0] == 0:
        return (states.sum() + items.sum()) * 0.0, 0.0
    return future_loss(pred, target, torch.ones_like(keys, dtype=torch.bool), keys, temperature, log_q_correction)
