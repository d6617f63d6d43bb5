"""The SASRec yardstick for next-item retrieval, trained from scratch on the task's training users.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018): item-id embeddings plus learned
positions, causal self-attention blocks, and the state after each position scores every item through the
same (tied) item embeddings. Trained here with the full softmax over the catalog at every position
(cross-entropy, as in Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than
SASRec?", RecSys 2023, which beats the original one-negative BCE), early-stopped on the val users'
held-out-item loss (or their mean reciprocal rank in the full catalog ranking; ``select``), best epoch
restored. What a recommender-systems engineer trains when asked for a next-item model; RecBole's own SASRec
cannot be installed beside this stack (RecBole 1.2.1 requires ray <= 2.6.3).

    x     (B, L)      item ids + 1, left-padded with 0, the user's last L items (oldest first)
    h     (B, L, d)   causal transformer over item + position embeddings (pre-norm blocks)
    logit (B, L, I)   h @ E[1:].T: position t scores the item at t + 1

Nothing here imports ``ray``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


SELECT = ("mrr", "loss")


def mean_reciprocal_rank(scores: np.ndarray, target: np.ndarray) -> float:
    """Mean of 1 / (1 + rank) of each row's target in its full ranking, ties counted against the target
    (``metrics.target_rank``). scores: (n, I); target: (n,) item indices. 1.0 = every target ranked first."""
    from userfm.eval.metrics import target_rank

    return float(np.mean(1.0 / (1.0 + target_rank(np.asarray(scores), np.asarray(target)))))


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # most recent items read (SASRec's n: 50 on sparse sets, 200 on MovieLens-1M)
    dim: int = 64  # item embedding and hidden size
    layers: int = 2  # self-attention blocks
    heads: int = 1  # attention heads (the paper's single head)
    dropout: float = 0.2
    lr: float = 1e-3  # Adam
    batch_size: int = 128  # users per step
    max_epochs: int = 200
    patience: int = 5  # epochs without a better val criterion before stopping (best weights restored)
    select: str = "mrr"  # the val criterion early stopping watches, on the val users' held-out items: "mrr" (their
    #                       mean reciprocal rank in the full catalog ranking, ties against: a ranking criterion, as
    #                       SASRec's paper validates on NDCG@10 / HR@10 and RecBole on MRR@10) | "loss" (their
    #                       cross-entropy; the default before 2026-12-07). Leave-one-out (docs/benchmarks.md): on the
    #                       Amazon Arts history the val loss is lowest at epoch 2 and rises while the val MRR climbs for
    #                       25 epochs (0.009 -> 0.024; HR@10 0.016 -> 0.046); MovieLens 0.025 (epoch 8) vs 0.027 (epoch
    #                       24), the merged Amazon set 0.005 either way
    windows: bool = True  # train on every max_len + 1 window of each sequence (userfm.data.sequences.window_bounds), not
    #                        only its last: every item but a user's first is a target once, as RecBole's prefix
    #                        augmentation makes it; the paper keeps the last n (MovieLens latest-small: the last 51 of
    #                        each user's items are 29 % of them). Default since 2026-12-08, chosen on validation
    seed: int = 0

    def __post_init__(self):
        if self.max_len < 1 or self.dim < 1 or self.layers < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"SASRec: max_len, dim, layers, heads must be >= 1 and dim divisible by heads, got {self}")
        if self.select not in SELECT:
            raise ValueError(f"SASRec: select must be one of {SELECT}, got {self.select!r}")


def pad_sequences(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """Per user, catalog indices (oldest first) -> (n, max_len) int64 of index + 1, left-padded with 0, the
    last ``max_len`` items kept."""
    out = np.zeros((len(seqs), max_len), np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, np.int64)[-max_len:]
        if len(s):
            out[i, max_len - len(s):] = s + 1
    return out


def _model(n_items: int, cfg: SASRecConfig):
    import torch
    from torch import nn

    class SASRec(nn.Module):
        def __init__(self):
            super().__init__()
            self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
            self.pos = nn.Embedding(cfg.max_len, cfg.dim)
            block = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim, cfg.dropout, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.dim)
            self.drop = nn.Dropout(cfg.dropout)
            self.register_buffer("causal", torch.triu(torch.full((cfg.max_len, cfg.max_len), float("-inf")), 1))
            nn.init.normal_(self.items.weight, std=cfg.dim ** -0.5)
            with torch.no_grad():
                self.items.weight[0].zero_()

        def states(self, x):  # (B, L) -> (B, L, d)
            h = self.items(x) * math.sqrt(cfg.dim) + self.pos.weight[None]
            h = self.drop(h * (x > 0).unsqueeze(-1))
            h = self.blocks(h, mask=self.causal, src_key_padding_mask=None, is_causal=True)
            return self.norm(h)

        def logits(self, h):  # (..., d) -> (..., I): tied output, padding row dropped
            return h @ self.items.weight[1:].T

    return SASRec()


def fit_sasrec(train_seqs: list[np.ndarray], val_hist: list[np.ndarray], val_y: np.ndarray, n_items: int,
               cfg: SASRecConfig = SASRecConfig(), progress: Callable[[str], None] | None = None
               ) -> tuple[object, dict]:
    """Train on the training sequences' last ``max_len + 1`` items (every window of them with ``cfg.windows``;
    every position predicts the next item), early-stop on the val
    users' held-out item given their history (``cfg.select``). Returns (model in eval mode, info: epochs,
    best_epoch (counted from 0), select, and the best epoch's ``val_mrr`` or ``val_loss``). ``progress``
    gets one line per epoch (the training loss and the val criterion)."""
    import torch
    import torch.nn.functional as F

    from userfm.train.early_stop import early_stopped_fit

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.windows:
        from userfm.data.sequences import window_bounds

        row, start, end = window_bounds(np.array([len(s) for s in train_seqs]), cfg.max_len + 1)
        train_seqs = [np.asarray(train_seqs[r])[a:b] for r, a, b in zip(row, start, end)]
    seqs = pad_sequences(train_seqs, cfg.max_len + 1)  # (n, L + 1): inputs are [:, :-1], targets [:, 1:]
    seqs = torch.from_numpy(seqs[(seqs > 0).sum(1) >= 2])  # users with at least one (input, next) pair
    xv = torch.from_numpy(pad_sequences(val_hist, cfg.max_len))
    yv = torch.from_numpy(np.asarray(val_y, np.int64))
    model = _model(n_items, cfg)

    def batch_loss(idx):
        s = seqs[idx]
        x, y = s[:, :-1], s[:, 1:]
        keep = (x > 0) & (y > 0)  # positions with an input item and a next item
        return F.cross_entropy(model.logits(model.states(x)[keep]), y[keep] - 1)

    sign = -1.0 if cfg.select == "mrr" else 1.0  # early stopping minimises sign x criterion: a higher MRR is better

    def val_criterion() -> float:
        logits = model.logits(model.states(xv)[:, -1])
        if cfg.select == "loss":
            return sign * float(F.cross_entropy(logits, yv))
        return sign * mean_reciprocal_rank(logits.double().numpy(), yv.numpy())

    # Adam (AdamW without weight decay), as the paper trains it
    state, best_epoch, best, epochs = early_stopped_fit(model, len(seqs), batch_loss, val_criterion, lr=cfg.lr,
                                                        weight_decay=0.0, batch_size=cfg.batch_size,
                                                        max_epochs=cfg.max_epochs, patience=cfg.patience, gen=gen,
                                                        on_epoch=None if progress is None else lambda e, tr, v: progress(
                                                            f"[sasrec] epoch {e + 1}: train loss {tr:.4f}, val {cfg.select} "
                                                            f"{sign * v:.4f}"))
    model.load_state_dict(state)
    model.eval()
    best = sign * best if math.isfinite(best) else None
    return model, {"epochs": epochs, "best_epoch": best_epoch, "select": cfg.select, f"val_{cfg.select}": best,
                   "params": int(sum(p.numel() for p in model.parameters())), "train_rows": len(seqs)}


def sasrec_scorer(model, hist: list[np.ndarray], max_len: int):
    """``score_fn(rows) -> (len(rows), I)``: the state after each user's last item scores every item."""
    import torch

    x = torch.from_numpy(pad_sequences(hist, max_len))

    def score(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.logits(model.states(x[torch.from_numpy(np.asarray(rows))])[:, -1]).double().numpy()

    return score
