"""Contrastive losses, a gradient-keeping all-gather, and GradCache. Pure PyTorch (no ``ray``).

Conventions (moco-v3 / sentence-transformers style):

* Losses are pure functions on tensors. They take *local* rows and *global* candidates; the caller
  gathers with :func:`gather_with_grad`, which returns the offset of the local rows in the global
  batch, so the positive of local row ``i`` is global column ``offset + i`` (rank-offset labels).
* Under DDP every rank computes the loss of its own rows against the whole global batch. The gather's
  backward sums the gradient every rank sends to a row, and DDP averages parameter gradients over
  ranks, so the update equals the single-process update on the concatenated batch (tested over a
  2-process gloo group in ``tests/test_losses.py``). With unequal rank batches, pass
  ``global_mean=True`` so the DDP average still weights every row equally.
* GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983; sentence-transformers'
  ``CachedMultipleNegativesRankingLoss``) lets the contrastive batch grow far beyond activation memory:
  CLUE's finding is that batch size must grow with model size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "dist_info",
    "gather_with_grad",
    "average_grads",
    "info_nce",
    "symmetric_info_nce",
    "nt_xent",
    "Temperature",
    "RandState",
    "grad_cache",
]


# --------------------------------------------------------------------------------------------------
# Distributed gather that keeps gradients
# --------------------------------------------------------------------------------------------------


def dist_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows of possibly different counts per rank; backward sums each row's gradient.

    Forward pads every rank's rows to the largest count (all_gather needs equal shapes), gathers and
    trims. Backward all-reduces (SUM) the gradient of the whole gathered tensor, which every rank holds
    in full, and keeps the local slice: the local rows' gradient summed over every rank's loss. Unlike
    ``torch.distributed.nn.all_gather`` this needs only all_reduce, which every backend has.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        n_max = max(sizes)
        padded = x.new_zeros((n_max, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: Tensor, group=None) -> tuple[Tensor, int]:
    """Concatenate ``x`` from every rank, keeping the gradient path to every rank's rows.

    Args:
        x: (n_local, ...) this rank's rows; ``n_local`` may differ between ranks.
        group: process group; default the world.

    Returns:
        ``(x_all, offset)``: x_all (n_global, ...) in rank order, and the index of this rank's first
        row in it (the rank offset for labels). Without torch.distributed: ``(x, 0)``.
    """
    rank, world = dist_info(group)
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    sizes = [int(v.item()) for v in ns]
    return _GatherWithGrad.apply(x, sizes, rank, group), sum(sizes[:rank])


def average_grads(module: nn.Module, group=None) -> None:
    """All-reduce-average the ``.grad`` of ``module``'s parameters over ranks (no-op single process).

    For parameters used outside a DDP forward (an objective head, a learnable temperature that only
    enters the loss), whose gradients DDP does not synchronise.
    """
    _, world = dist_info(group)
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must join every all_reduce
        dist.all_reduce(p.grad, group=group)
        p.grad /= world


def _global_count(n_local: int, device, group=None) -> int:
    rank, world = dist_info(group)
    if world == 1:
        return n_local
    t = torch.tensor([n_local], device=device, dtype=torch.long)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _reduce(per_row: Tensor, global_mean: bool, group=None) -> Tensor:
    """Mean over local rows, or (global_mean) sum * world / n_global so DDP's average is a global mean."""
    if not global_mean:
        return per_row.mean()
    _, world = dist_info(group)
    return per_row.sum() * world / _global_count(per_row.shape[0], per_row.device, group)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def info_nce(
    query: Tensor,
    keys: Tensor,
    temperature: float | Tensor,
    offset: int = 0,
    *,
    normalize: bool = True,
    global_mean: bool = False,
    group=None,
) -> Tensor:
    """One-directional InfoNCE: local query ``i``'s positive is ``keys[offset + i]``, every other key
    is a negative (https://arxiv.org/abs/1807.03748).

    Args:
        query: (n, d) local rows.
        keys: (m, d) candidates, usually the global batch from :func:`gather_with_grad`; m >= offset + n.
        temperature: scalar > 0 (float or 0-d tensor, e.g. from :class:`Temperature`).
        offset: index of the first positive in ``keys`` (the rank offset).
        normalize: L2-normalise both sides first (cosine similarity).
        global_mean: see :func:`_reduce` (for unequal per-rank batches under DDP).

    Returns:
        0-d tensor: mean over query rows of ``-log softmax(q k^T / t)[i, offset + i]``.
    """
    if normalize:
        query, keys = F.normalize(query, dim=-1), F.normalize(keys, dim=-1)
    logits = query @ keys.T / temperature  # (n, m)
    labels = torch.arange(query.shape[0], device=query.device) + offset  # (n,)
    return _reduce(F.cross_entropy(logits, labels, reduction="none"), global_mean, group)


def symmetric_info_nce(
    a: Tensor,
    b: Tensor,
    temperature: float | Tensor,
    *,
    gather: bool = True,
    normalize: bool = True,
    global_mean: bool = False,
    group=None,
) -> Tensor:
    """CLIP/CLUE symmetric InfoNCE: the average of a->b and b->a, negatives from the global batch.

    Args:
        a: (n, d) local embeddings of view A (e.g. a user's history in one service).
        b: (n, d) local embeddings of view B (the same users, another service); row i pairs with a[i].
        temperature: scalar > 0.
        gather: all-gather candidates across ranks (with gradient) before the loss.

    Returns:
        0-d tensor ``(info_nce(a, b_all) + info_nce(b, a_all)) / 2``.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired views must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if gather:
        a_all, offset = gather_with_grad(a, group)  # (N, d), N = global batch
        b_all, _ = gather_with_grad(b, group)  # (N, d)
    else:
        a_all, b_all, offset = a, b, 0
    kw = dict(normalize=normalize, global_mean=global_mean, group=group)
    return 0.5 * (info_nce(a, b_all, temperature, offset, **kw) + info_nce(b, a_all, temperature, offset, **kw))


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor,
    *,
    gather: bool = True,
    global_mean: bool = False,
    group=None,
) -> Tensor:
    """SimCLR's NT-Xent (https://arxiv.org/abs/2002.05709): each of the 2N views is classified against
    the other 2N - 1 (itself excluded), its positive being the other view of the same user.

    Args:
        z1: (n, d) local embeddings of the first augmented view.
        z2: (n, d) local embeddings of the second view; row i pairs with z1[i].
        temperature: scalar > 0.
        gather: all-gather candidates across ranks (with gradient).

    Returns:
        0-d tensor: mean over the 2n local rows of the cross-entropy.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"paired views must have equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    if gather:
        z1_all, offset = gather_with_grad(z1, group)  # (N, d)
        z2_all, _ = gather_with_grad(z2, group)  # (N, d)
    else:
        z1_all, z2_all, offset = z1, z2, 0
    n, big_n = z1.shape[0], z1_all.shape[0]
    query = torch.cat([z1, z2], dim=0)  # (2n, d)
    keys = torch.cat([z1_all, z2_all], dim=0)  # (2N, d)
    logits = query @ keys.T / temperature  # (2n, 2N)
    local = torch.arange(n, device=z1.device) + offset  # global index of each local user
    self_idx = torch.cat([local, local + big_n])  # (2n,) each row's own column
    labels = torch.cat([local + big_n, local])  # (2n,) the other view of the same user
    logits = logits.masked_fill(
        F.one_hot(self_idx, 2 * big_n).bool(), float("-inf")
    )  # a view is not its own negative
    return _reduce(F.cross_entropy(logits, labels, reduction="none"), global_mean, group)


class Temperature(nn.Module):
    """Fixed or learnable softmax temperature.

    Learnable: stored as log(1/t) like CLIP's logit_scale, and clamped to ``t >= min_temperature``
    (CLIP clamps the scale at 100) so it cannot collapse to a degenerate sharp softmax.
    """

    def __init__(self, init: float = 0.07, learnable: bool = False, min_temperature: float = 0.01):
        super().__init__()
        if init <= 0:
            raise ValueError(f"temperature must be > 0, got {init}")
        self.learnable = learnable
        self.min_temperature = min_temperature
        log_scale = torch.tensor(math.log(1.0 / init))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        """The temperature, a 0-d tensor."""
        return 1.0 / self.log_scale.exp().clamp(max=1.0 / self.min_temperature)


# --------------------------------------------------------------------------------------------------
# GradCache
# --------------------------------------------------------------------------------------------------


class RandState:
    """Captures the CPU (and CUDA) random state at construction; ``with`` replays it.

    Leaving the block restores the state that was current before entering, so replaying a mini-batch
    (same dropout masks) does not perturb the stream seen by later code.
    """

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._fork: ContextManager | None = None

    def __enter__(self):
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return self

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)
        self._fork = None


def _split(batch, size: int) -> list:
    """Split a dict of tensors/arrays (or a tensor) into consecutive chunks of ``size`` rows."""
    if isinstance(batch, dict):
        n = len(next(iter(batch.values())))
        return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def grad_cache(
    encode: Callable[[object], Tensor],
    views: Sequence[object],
    loss_fn: Callable[..., Tensor],
    mini_batch_size: int,
    *,
    no_sync: Callable[[], ContextManager] | None = None,
) -> Tensor:
    """Contrastive loss + backward with activation memory of one mini-batch (GradCache).

    Step 1: embed every view in mini-batches with no graph, saving each mini-batch's random state.
    Step 2: loss on the full (detached) embeddings, backward to the embeddings only: the cached gradient.
    Step 3: re-embed each mini-batch with the random state replayed (identical dropout masks), and
            backpropagate the cached gradient through it into the parameters.

    The parameter gradients equal those of ``loss_fn(*[encode(v) for v in views]).backward()`` when the
    plain version embeds in the same mini-batches; parameters used inside ``loss_fn`` (a learnable
    temperature) get their gradient in step 2.

    Args:
        encode: one mini-batch (dict of tensors, or a tensor) -> (m, d) embeddings.
        views: the full local batch of each view, e.g. ``[view_a, view_b]``; row i of each is one user.
        loss_fn: ``loss_fn(emb_view0, emb_view1, ...)`` -> 0-d loss; may gather across ranks.
        mini_batch_size: rows per forward; bounds activation memory.
        no_sync: e.g. ``ddp_model.no_sync``: used for every step-3 backward except the last, so DDP
            all-reduces gradients once per step, not once per mini-batch.

    Returns:
        The loss (detached). Gradients are accumulated in ``.grad``; the caller steps the optimizer.
    """
    # Step 1: embeddings without graph.
    chunks = [_split(v, mini_batch_size) for v in views]
    states: list[list[RandState]] = []
    embs: list[Tensor] = []
    with torch.no_grad():
        for view_chunks in chunks:
            view_states, view_embs = [], []
            for c in view_chunks:
                view_states.append(RandState())
                view_embs.append(encode(c))
            states.append(view_states)
            embs.append(torch.cat(view_embs).detach().requires_grad_())  # (n, d)
    # Step 2: the loss, and its gradient w.r.t. the embeddings.
    loss = loss_fn(*embs)
    loss.backward()
    cached = [_split(e.grad, mini_batch_size) for e in embs]
    # Step 3: replay each mini-batch with its random state and push the cached gradient through it.
    jobs = [(c, s, g) for vc, vs, vg in zip(chunks, states, cached) for c, s, g in zip(vc, vs, vg)]
    for i, (c, state, g) in enumerate(jobs):
        sync = no_sync if (no_sync is not None and i < len(jobs) - 1) else contextlib.nullcontext
        with sync(), state:
            emb = encode(c)  # (m, d)
            emb.backward(g)
    return loss.detach()
