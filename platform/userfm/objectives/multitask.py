"""Multi-task pretraining: a weighted sum of objectives (``objective: [clue, future]``, spelled ``clue+future``).

Every objective of the sum trains the one encoder on its own view of the same step's users:

* the rows are featurized once, as CLUE pairs when ``clue`` is in the sum, else as whole histories;
* each other objective reads whole histories: with ``clue`` in the sum, the pair's two views stacked as
  2B histories (:func:`stack_views`; a single-service user's earlier and later half, or a two-service user's
  two services), since the pairs are what the rows hold;
* each objective's step inputs sit under its own key prefix (``future/a.length``) and it keeps its own head
  (:class:`MultiTaskHead`); the loss is :func:`weighted_sum` of the objectives' losses.

Pure helpers, no Ray and no encoder here: :mod:`userfm.objectives.pretext` does the wiring.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn


def weighted_sum(losses: Tensor, weights: tuple[float, ...] = ()) -> Tensor:
    """The multi-task loss.

    Args:
        losses: (K,) each objective's 0-d loss, stacked.
        weights: K weights; () = 1 each.

    Returns:
        0-d ``sum_k weights[k] * losses[k]`` (a plain sum, not a mean: adding an objective adds its gradient
        to the others' at their own scale).
    """
    if not weights:
        return losses.sum()
    if len(weights) != losses.shape[0]:
        raise ValueError(f"{losses.shape[0]} objectives but {len(weights)} weights")
    return (losses * torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)).sum()


def sub_batch(batch: Mapping[str, object], name: str) -> dict:
    """The keys under ``name/`` with the prefix removed: one objective's step inputs."""
    p = name + "/"
    return {k[len(p):]: v for k, v in batch.items() if k.startswith(p)}


def stack_views(pairs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLUE pair rows (``a.*``/``b.*``, B rows, equal widths as Ray Data stores them) -> 2B whole-history rows:
    rows 0..B-1 are the ``a`` views, rows B..2B-1 the ``b`` views. Per-pair arrays (``pair_kind``) are dropped."""
    a = {k[2:]: v for k, v in pairs.items() if k.startswith("a.")}
    b = {k[2:]: v for k, v in pairs.items() if k.startswith("b.")}
    if set(a) != set(b):
        raise ValueError(f"the two views hold different keys: {sorted(set(a) ^ set(b))}")
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.ndim >= 2 and va.shape[1] != vb.shape[1]:  # pad the narrower view's event axis
            w = max(va.shape[1], vb.shape[1])
            va, vb = (np.pad(v, [(0, 0), (0, w - v.shape[1])] + [(0, 0)] * (v.ndim - 2)) for v in (va, vb))
        out[k] = np.concatenate([va, vb])
    return out


class MultiTaskHead(nn.Module):
    """One head per objective of the sum, by name (``head.heads["future"]``)."""

    def __init__(self, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    def __getitem__(self, name: str) -> nn.Module:
        return self.heads[name]
