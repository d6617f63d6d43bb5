"""One training loop for the small models evaluation fits (heads, SASRec): mini-batches, a val loss per
epoch, stop after ``patience`` epochs without improvement, best epoch's weights returned.

Nothing here imports ``ray``; torch is imported on use.
"""

from __future__ import annotations

import math
from typing import Callable


def early_stopped_fit(model, n: int, batch_loss: Callable, val_loss: Callable[[], float], *, lr: float,
                      weight_decay: float, batch_size: int, max_epochs: int, patience: int,
                      gen, on_epoch: Callable[[int, float, float], None] | None = None
                      ) -> tuple[dict, int, float, int]:
    """AdamW over shuffled mini-batches of ``n`` rows (``batch_loss(idx) -> loss`` for a (b,) index tensor,
    ``batch_size`` rows each), ``val_loss()`` once per epoch under ``no_grad`` in eval mode;
    ``on_epoch(epoch, mean training loss, val loss)`` after each (progress on long fits).

    Returns (best epoch's state dict, best epoch, best val loss, epochs run); the final state when no
    val loss was finite.
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_loss, best_state, best_epoch, bad, epochs = math.inf, None, 0, 0, 0
    for epoch in range(max_epochs):
        epochs = epoch + 1
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_epoch is not None:  # the mean training loss costs a host sync per step: only when reported
                total, steps = total + float(loss.detach()), steps + 1
        model.eval()
        with torch.no_grad():
            val = float(val_loss())
        if on_epoch is not None:
            on_epoch(epoch, total / max(steps, 1), val)
        if val < best_loss - 1e-6:
            best_loss, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    return best_state or model.state_dict(), best_epoch, best_loss, epochs
