"""The ``masked-item`` objective (BERT4Rec, https://arxiv.org/abs/1904.06690): mask a fraction of each user's
events and predict, from the bidirectional encoder's state at each masked position, the item that was there.

Unlike ``mlm`` (ShopperBERT), which classifies a masked event's category levels and time fields, the target
here is the item itself: its vector on the encoder's own item side (item encoder over the text + hashed item
id + co-occurrence vector, :meth:`userfm.models.encoders.UserEncoder.item_vectors`), so id-only logs (hashed ids)
and text logs get the same objective, and the input and output sides share one item representation. A
masked event shows the encoder only [MASK], its service and its position (``UserEncoder.hidden``).
The loss is the sampled softmax of :mod:`userfm.objectives.future` (in-batch negatives, log-frequency correction, the
same item elsewhere in the batch is no negative) over every masked (user, position) pair of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from userfm.objectives.future import future_loss


def masked_item_loss(states: Tensor, items: Tensor, masked: Tensor, item_keys: Tensor, temperature: float | Tensor,
                     log_q_correction: bool = True) -> tuple[Tensor, float]:
    """Masked-item sampled softmax.

    Args:
        states: (B, L, d) the (projected) encoder state at each event position (event axis without [CLS]).
        items: (B, L, d) each event's item vector, computed from the unmasked item features.
        masked: (B, L) bool, the masked positions (the pairs scored; padding is never masked).
        item_keys: (B, L) int64 item identities (text hashes).
        temperature: scalar > 0.
        log_q_correction: see :func:`userfm.objectives.future.future_loss`.

    Returns:
        (0-d loss: mean over the P masked (user, position) pairs of -log softmax over the P masked items of the
        batch at the pair's own item, in-batch top-1 accuracy), exactly :func:`future_loss` with each masked
        pair a "user" whose window is its own item.
    """
    pred = states[masked]  # (P, d), row-major: user, then position
    if pred.shape[0] == 0:
        return (states.sum() + items.sum()) * 0.0, 0.0
    target = items[masked][:, None]  # (P, 1, d)
    keys = item_keys[masked][:, None]  # (P, 1)
    return future_loss(pred, target, torch.ones_like(keys, dtype=torch.bool), keys, temperature, log_q_correction)
