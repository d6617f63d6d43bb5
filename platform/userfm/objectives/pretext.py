"""Pretext objectives: batch building (pure, for Ray Data), augmentations, and loss wiring.

* ``mlm`` (ShopperBERT, https://arxiv.org/abs/2106.00573): mask a fraction of events, predict every
  category level and every time field at the masked positions, average the cross-entropies.
* ``simclr`` (SimCLR variant): two augmented views of one history (time-window crop, item
  replacement, shuffle, event masking) are a positive pair; NT-Xent over the global batch.
* ``clue`` (CLUE, https://arxiv.org/abs/2111.11294): the same user's histories in two services are a
  positive pair (single-service users: earlier vs later half, or skipped); symmetric InfoNCE.

Batch functions (``mlm_batch``, ``simclr_batch``, ``clue_batch``) map sequence rows to a flat dict of
numpy arrays; the two views of a contrastive pair are prefixed ``a.`` and ``b.``. They are pure
functions of (rows, vocabularies, config, seed), so Ray Data ``map_batches`` can run them.
A training step is then ``loss, metrics = loss_and_backward(model, head, to_torch(batch), cfg)``
followed by ``optimizer.step()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from userfm.models.encoders import ITEM_KEYS as ENCODER_ITEM_KEYS, EncoderConfig
from userfm.models.features import IGNORE_INDEX, PAD_ID, Vocabs, _as_table, concat_batches, make_batch, to_torch
from userfm.objectives.losses import Temperature, average_grads, grad_cache, nt_xent, symmetric_info_nce
from userfm.objectives import check_objective, objective_parts
from userfm.objectives.multitask import MultiTaskHead, sub_batch, weighted_sum

ITEM_KEYS = ("service", "category", "text_hash", "item_hash", "tokens", "text_vector")  # what "replace an item" swaps
TIME_KEYS = ("time", "ts")  # stay with the position when an item is replaced
SEQ_LIST_COLUMNS = ("ts", "service", "text", "item_id", "category", "value")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Pretext task settings (one per pretraining run; field names are Tune keys)."""

    objective: str = "clue"  # one of OBJECTIVES, or a weighted sum of them: "clue+future" (userfm.objectives.multitask)
    mask_rate: float = 0.15  # mlm / masked-item: fraction of each user's events masked (at least one)
    temperature: float = 0.07  # simclr/clue: softmax temperature (initial value if learnable)
    learnable_temperature: bool = False  # simclr/clue: learn log(1/t), CLIP-style
    crop_min_fraction: float = 0.6  # simclr: crop window length ~ U[this, 1] x the user's time span
    replace_rate: float = 0.1  # simclr: probability each kept event's item is replaced from the pool
    shuffle_prob: float = 0.5  # simclr: probability a view's event order is shuffled
    event_mask_rate: float = 0.1  # simclr: probability each kept event is masked (>= 1 stays unmasked)
    single_service: str = "time_split"  # clue: users with one service: "time_split" or "skip"
    clue_crop: float = 1.0  # clue: each step, each view keeps a random time window of U[clue_crop, 1] x its span (1 = whole views, the same pair every epoch)
    mini_batch_size: int = 0  # simclr/clue: GradCache mini-batch (rows); 0 = one plain forward
    proj_dim: int = 0  # simclr/clue: output size of SimCLR's projection MLP g(.) the loss is computed on; 0 = no projection
    future_window: int = 16  # future: events after the cut the user embedding predicts (userfm.objectives.future)
    weights: tuple[float, ...] = ()  # a multi-task sum ("clue+future"): each objective's loss weight; () = 1 each

    def __post_init__(self):
        check_objective(self.objective, self.weights)
        if self.mini_batch_size and self.objective not in ("simclr", "clue"):
            raise ValueError(f"mini_batch_size (GradCache) applies to simclr/clue alone, not {self.objective}")
        if self.future_window < 1:
            raise ValueError(f"future_window must be >= 1, got {self.future_window}")
        if self.single_service not in ("time_split", "skip"):
            raise ValueError(f"single_service must be 'time_split' or 'skip', got {self.single_service!r}")
        for name in ("mask_rate", "replace_rate", "shuffle_prob", "event_mask_rate", "crop_min_fraction", "clue_crop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------------
# Batch helpers
# --------------------------------------------------------------------------------------------------


def split_views(batch: Mapping[str, Any]) -> tuple[dict, dict]:
    """``{"a.x": .., "b.x": ..}`` -> ``({"x": ..}, {"x": ..})`` (numpy or torch)."""
    a = {k[2:]: v for k, v in batch.items() if k.startswith("a.")}
    b = {k[2:]: v for k, v in batch.items() if k.startswith("b.")}
    return a, b


def _prefixed(a: Mapping, b: Mapping, **extra) -> dict:
    return {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in b.items()}, **extra}


def add_vectors(batch: Mapping[str, np.ndarray], vectors) -> dict:
    """``<view>text_vector`` (B, L, dim) for every ``<view>text_hash`` (B, L) of ``batch`` (``text_hash``,
    ``a.text_hash``, ...), looked up in ``vectors`` (a :class:`userfm.models.minilm.VectorCache`; padding and
    unknown hashes give zeros); ``batch`` unchanged when ``vectors`` is None.

    Pretraining featurizes hashes only and looks the vectors up per step, after the step's crops and masks
    (which move ``text_hash`` with the rest of an item): the same batch as featurizing the vectors, with
    rows of a few hundred bytes instead of two views x 64 events x 384 floats (~200 KB) in Ray's object store.
    """
    out = dict(batch)
    if vectors is not None:
        for k, v in batch.items():
            if k.endswith("text_hash"):
                out[k[: -len("text_hash")] + "text_vector"] = vectors.lookup(v)
    return out


def _gather_events(source: Mapping[str, np.ndarray], item_src, time_src) -> dict:
    """Event (u, j) of the result takes its item (ITEM_KEYS) from ``source[item_src[.][u, j]]`` and its
    time (TIME_KEYS) from ``source[time_src[.][u, j]]``; sources are (user, pos) index arrays (B, L')."""
    out = {}
    for k, v in source.items():
        if k in ("length", "masked"):
            continue
        u, p = item_src if k in ITEM_KEYS else time_src
        out[k] = v[u, p]
    return out


# --------------------------------------------------------------------------------------------------
# MLM (ShopperBERT)
# --------------------------------------------------------------------------------------------------


def mask_events(batch: Mapping[str, np.ndarray], rate: float, rng: np.random.Generator) -> dict:
    """Choose ``max(1, round(rate * n))`` events of each user (n >= 1 events) to mask.

    Returns a new batch with ``masked`` set and the targets: ``mlm_category`` (B, L, C) and
    ``mlm_time`` (B, L, T) hold the input ids at masked positions and ``IGNORE_INDEX`` elsewhere
    (also where a category level is missing), so unmasked positions carry no loss.
    """
    length = batch["length"]
    b, l = batch["service"].shape
    masked = np.zeros((b, l), dtype=bool)
    for u, n in enumerate(length):
        if n:
            k = max(1, int(round(rate * n)))
            masked[u, rng.choice(int(n), size=min(k, int(n)), replace=False)] = True
    out = dict(batch)
    out["masked"] = masked
    cat, time = batch["category"], batch["time"]
    out["mlm_category"] = np.where(masked[..., None] & (cat != PAD_ID), cat, IGNORE_INDEX)
    out["mlm_time"] = np.where(masked[..., None] & (time != PAD_ID), time, IGNORE_INDEX)
    return out


class MLMHead(nn.Module):
    """One linear classifier per category level and per time field, over the masked hidden states."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.category = nn.ModuleList(nn.Linear(cfg.d_model, n) for n in cfg.category_sizes)
        self.time = nn.ModuleList(nn.Linear(cfg.d_model, n) for n in cfg.time_sizes)


def mlm_loss(h: Tensor, batch: Mapping[str, Tensor], head: MLMHead, time_fields=None) -> tuple[Tensor, dict]:
    """Average cross-entropy over the 4 + 5 (or however many) prediction tasks.

    Args:
        h: (B, 1 + L, d) encoder hidden states ([CLS] first), from ``UserEncoder.hidden``.
        batch: holds ``mlm_category`` (B, L, C) and ``mlm_time`` (B, L, T) targets (IGNORE_INDEX = no loss).
        head: the classifiers.
        time_fields: names for the metrics (default ``time0``...).

    Returns:
        (loss, metrics): metrics has ``mlm/acc/<task>`` and ``mlm/loss/<task>`` floats. A task with no
        target in the batch (e.g. level 4 missing everywhere) contributes 0 and is left out of the mean.
    """
    h = h[:, 1:]  # (B, L, d) event positions
    tasks = [(f"category{k}", lin, batch["mlm_category"][..., k]) for k, lin in enumerate(head.category)]
    names = list(time_fields) if time_fields else [f"time{j}" for j in range(len(head.time))]
    tasks += [(names[j], lin, batch["mlm_time"][..., j]) for j, lin in enumerate(head.time)]
    losses, metrics = [], {}
    for name, lin, target in tasks:
        sel = target != IGNORE_INDEX  # (B, L)
        if not sel.any():
            continue
        logits = lin(h[sel])  # (n_masked, n_classes)
        t = target[sel]
        ce = F.cross_entropy(logits, t)
        losses.append(ce)
        metrics[f"mlm/loss/{name}"] = ce.item()
        metrics[f"mlm/acc/{name}"] = (logits.argmax(-1) == t).float().mean().item()
    # Keep every head in the graph (DDP needs all parameters used every step): add 0 * their sum.
    zero = sum(p.sum() for p in head.parameters()) * 0.0
    loss = torch.stack(losses).mean() + zero if losses else zero + h.sum() * 0.0
    return loss, metrics


def mlm_batch(rows, vocabs: Vocabs, tokenizer=None, *, mask_rate: float = 0.15, seed: int = 0,
              vectors=None) -> dict[str, np.ndarray]:
    """Rows -> masked batch with targets (see :func:`mask_events`)."""
    batch = add_vectors(make_batch(rows, vocabs, tokenizer), vectors)
    return mask_events(batch, mask_rate, np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------------
# SimCLR views
# --------------------------------------------------------------------------------------------------


def augment(batch: Mapping[str, np.ndarray], cfg: ObjectiveConfig, rng: np.random.Generator,
            pool: Mapping[str, np.ndarray] | None = None) -> dict:
    """One augmented view: crop to a time window -> shuffle -> replace items -> mask events.

    * crop: window length ~ U[crop_min_fraction, 1] x (last - first event time), random start; the kept
      events are a contiguous, time-ordered slice (never empty for a user with events).
    * shuffle: with probability ``shuffle_prob`` the kept events are permuted.
    * replace: each kept event, with probability ``replace_rate``, takes the item (service, category,
      text) of a random event of ``pool`` (default: this batch; pass a corpus-sample batch instead)
      and keeps its own time.
    * mask: each kept event, with probability ``event_mask_rate``, becomes [MASK]; at least one stays.

    Args:
        batch: numpy batch from ``make_batch`` (B users).
        pool: batch of candidate replacement events.
    Returns:
        New batch, same keys; ``length`` <= the original.
    """
    length, ts = batch["length"], batch["ts"]
    b = len(length)
    if pool is None or pool is batch:
        source, pool_offset, pool = batch, 0, batch
    else:  # users [0, b) are this batch, [b, b + len(pool)) the pool
        keys = [k for k in batch if k in pool]
        source, pool_offset = concat_batches([{k: batch[k] for k in keys}, {k: pool[k] for k in keys}]), b
    pool_u, pool_p = np.nonzero(np.arange(pool["service"].shape[1])[None, :] < pool["length"][:, None])
    pool_u = pool_u + pool_offset
    kept = []
    for u, n in enumerate(length):
        n = int(n)
        if n == 0:
            kept.append(np.zeros(0, dtype=np.int64))
            continue
        t = ts[u, :n]
        span = int(t[-1] - t[0])
        width = rng.uniform(cfg.crop_min_fraction, 1.0) * span
        start = t[0] + rng.uniform(0.0, span - width)
        idx = np.nonzero((t >= start) & (t <= start + width))[0]
        if idx.size == 0:  # the window fell in a gap: keep the event nearest its start
            idx = np.array([int(np.argmin(np.abs(t - start)))])
        if rng.random() < cfg.shuffle_prob:
            idx = rng.permutation(idx)
        kept.append(idx)
    width_out = max([len(k) for k in kept] + [1])
    tu = np.repeat(np.arange(b), width_out).reshape(b, width_out)
    tp = np.zeros((b, width_out), dtype=np.int64)
    valid = np.zeros((b, width_out), dtype=bool)
    for u, idx in enumerate(kept):
        tp[u, : len(idx)] = idx
        valid[u, : len(idx)] = True
    iu, ip = tu.copy(), tp.copy()
    replace = valid & (rng.random((b, width_out)) < cfg.replace_rate)
    if len(pool_u):
        pick = rng.integers(0, len(pool_u), size=int(replace.sum()))
        iu[replace], ip[replace] = pool_u[pick], pool_p[pick]
    else:
        replace[:] = False
    masked = valid & (rng.random((b, width_out)) < cfg.event_mask_rate)
    for u, idx in enumerate(kept):
        if len(idx) and masked[u, : len(idx)].all():
            masked[u, int(rng.integers(len(idx)))] = False
    view = _gather_events(source, (iu, ip), (tu, tp))
    for v in view.values():  # gathering pad slots copied event 0: zero them so padding stays padding
        v[~valid] = 0
    view["masked"] = masked
    view["length"] = valid.sum(1).astype(np.int64)
    view["replaced"] = replace
    return view


def simclr_batch(rows, vocabs: Vocabs, tokenizer=None, *, cfg: ObjectiveConfig = ObjectiveConfig("simclr"),
                 seed: int = 0, pool=None, vectors=None) -> dict[str, np.ndarray]:
    """Rows -> two augmented views, keys ``a.*`` and ``b.*``. Users with no events are dropped."""
    batch = add_vectors(make_batch(rows, vocabs, tokenizer), vectors)
    keep = batch["length"] > 0
    batch = {k: v[keep] for k, v in batch.items()}
    return simclr_views(batch, cfg, np.random.default_rng(seed), pool)


def simclr_views(batch: Mapping[str, np.ndarray], cfg: ObjectiveConfig, rng: np.random.Generator,
                 pool: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A featurized batch -> two independently augmented views, keys ``a.*`` and ``b.*``."""
    a, b = augment(batch, cfg, rng, pool), augment(batch, cfg, rng, pool)
    for v in (a, b):
        v.pop("replaced")
    return _prefixed(a, b)


# --------------------------------------------------------------------------------------------------
# CLUE pairs
# --------------------------------------------------------------------------------------------------


def clue_pairs(rows, single_service: str = "time_split", seed: int = 0) -> tuple[dict, dict, dict]:
    """Pair each user's histories in two services; single-service users get an earlier/later split.

    Args:
        rows: SEQUENCE_SCHEMA rows of any scopes; all rows of a user must be in the same call.
        single_service: "time_split" (earlier half vs later half, needs >= 2 events) or "skip".
        seed: picks which two services when a user has more than two.

    Returns:
        ``(rows_a, rows_b, stats)``: two dicts of column lists, row i of each is the same user
        (``rows_a["pair_kind"]``: 0 cross-service, 1 time split); stats counts ``cross_service``, ``time_split`` and ``skipped`` users.
    """
    tab = _as_table(rows)
    cols = [c for c in SEQ_LIST_COLUMNS if c in tab.column_names]
    d = tab.select(["user_id", "scope", *cols]).to_pydict()
    by_user: dict[str, dict[str, int]] = {}
    for i, (u, s) in enumerate(zip(d["user_id"], d["scope"])):
        if d["ts"][i]:
            by_user.setdefault(u, {})[s] = i
    rng = np.random.default_rng(seed)
    out_a = {"user_id": [], "pair_kind": [], **{c: [] for c in cols}}
    out_b = {"user_id": [], **{c: [] for c in cols}}
    stats = {"cross_service": 0, "time_split": 0, "skipped": 0}
    for u in sorted(by_user):  # sorted: the result does not depend on row order
        scopes = by_user[u]
        services = sorted(s for s in scopes if s != "all")
        if len(services) >= 2:
            s1, s2 = rng.choice(len(services), size=2, replace=False)
            ia, ib = scopes[services[s1]], scopes[services[s2]]
            sa = sb = slice(None)
            stats["cross_service"] += 1
        else:
            i = scopes[services[0]] if services else scopes.get("all")
            n = len(d["ts"][i]) if i is not None else 0
            if single_service == "skip" or n < 2:
                stats["skipped"] += 1
                continue
            ia = ib = i
            sa, sb = slice(0, n // 2), slice(n // 2, n)
            stats["time_split"] += 1
        out_a["user_id"].append(u)
        out_a["pair_kind"].append(0 if ia != ib else 1)
        out_b["user_id"].append(u)
        for c in cols:
            va, vb = d[c][ia], d[c][ib]
            out_a[c].append(va[sa] if va is not None else None)
            out_b[c].append(vb[sb] if vb is not None else None)
    return out_a, out_b, stats


def crop_views(batch: Mapping[str, np.ndarray], min_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CLUE pairs -> the same pairs with each view cut to a random time window of U[min_fraction, 1] x its
    span (``augment``'s crop alone: no shuffle, replacement or masking), so that a user's pair differs from
    epoch to epoch and the encoder cannot memorise the training pairs. ``pair_kind`` is dropped."""
    crop = ObjectiveConfig("clue", crop_min_fraction=min_fraction, replace_rate=0.0, shuffle_prob=0.0, event_mask_rate=0.0)
    a, b = split_views(batch)
    views = []
    for v in (a, b):
        out = augment(v, crop, rng) if min_fraction < 1.0 else dict(v)
        out.pop("replaced", None)
        views.append(out)
    return _prefixed(*views)


def clue_batch(rows, vocabs: Vocabs, tokenizer=None, *, single_service: str = "time_split", seed: int = 0,
               vectors=None) -> dict[str, np.ndarray]:
    """Rows -> paired views ``a.*``/``b.*`` plus ``pair_kind`` (B,) int64: 0 cross-service, 1 time split."""
    ra, rb, stats = clue_pairs(rows, single_service, seed)
    a = add_vectors(make_batch(ra, vocabs, tokenizer), vectors)
    b = add_vectors(make_batch(rb, vocabs, tokenizer), vectors)
    return _prefixed(a, b, pair_kind=np.asarray(ra["pair_kind"], dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# Loss wiring
# --------------------------------------------------------------------------------------------------


class ContrastiveHead(nn.Module):
    """simclr/clue's own parameters: the temperature and SimCLR's projection MLP g(.)
    (https://arxiv.org/abs/2002.05709, Sec. 4.2): the loss compares g(z), while downstream tasks read the
    encoder's z itself, which keeps information the contrastive task would otherwise discard.
    ``proj_dim = 0``: no projection (the loss compares z)."""

    def __init__(self, d_in: int, proj_dim: int, temperature: float, learnable: bool = False):
        super().__init__()
        self.temperature = Temperature(temperature, learnable=learnable)
        self.projection = (nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, proj_dim))
                           if proj_dim else nn.Identity())

    def forward(self, z: Tensor) -> Tensor:
        """(n, d_in) -> (n, proj_dim) (or (n, d_in) without a projection)."""
        return self.projection(z)


class FutureHead(nn.Module):
    """future's own parameters: the temperature and a linear map of the user embedding into the item-vector
    space (the encoder's ``item_vectors``, d_model wide) its targets live in."""

    def __init__(self, d_in: int, d_item: int, temperature: float, learnable: bool = False):
        super().__init__()
        self.temperature = Temperature(temperature, learnable=learnable)
        self.projection = nn.Linear(d_in, d_item)

    def forward(self, z: Tensor) -> Tensor:
        """(n, d_in) -> (n, d_item)."""
        return self.projection(z)


def build_head(cfg: ObjectiveConfig, encoder_cfg: EncoderConfig) -> nn.Module:
    """The objective's own parameters: :class:`MLMHead` (mlm), :class:`ContrastiveHead` (simclr/clue) or
    :class:`FutureHead` (future); a multi-task sum: a :class:`MultiTaskHead` of each objective's own."""
    if "+" in cfg.objective:
        return MultiTaskHead({p: build_head(dataclasses.replace(cfg, objective=p, weights=()), encoder_cfg)
                              for p in objective_parts(cfg.objective)})
    if cfg.objective == "mlm":
        return MLMHead(encoder_cfg)
    if cfg.objective == "future":
        return FutureHead(encoder_cfg.embed_dim, encoder_cfg.d_model, cfg.temperature, cfg.learnable_temperature)
    if cfg.objective in ("next", "masked-item"):  # every (next / masked) state predicts an item (d_model -> item space)
        return FutureHead(encoder_cfg.d_model, encoder_cfg.d_model, cfg.temperature, cfg.learnable_temperature)
    return ContrastiveHead(encoder_cfg.embed_dim, cfg.proj_dim, cfg.temperature, cfg.learnable_temperature)


def _retrieval_acc(za: Tensor, zb: Tensor) -> float:
    """Local top-1 of a -> b among the local batch (a cheap health signal, not the loss)."""
    sim = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T
    return (sim.argmax(-1) == torch.arange(len(za), device=za.device)).float().mean().item()


def loss_and_backward(
    model: nn.Module,
    head: nn.Module,
    batch: Mapping[str, Tensor],
    cfg: ObjectiveConfig,
    *,
    no_sync: Callable[[], ContextManager] | None = None,
    time_fields=None,
) -> tuple[Tensor, dict]:
    """One training step's loss and gradients (the caller zeroes grads before and steps after).

    Args:
        model: the user encoder, possibly DDP-wrapped: ``model(batch) -> (B, d)``;
            ``model(batch, return_hidden=True) -> (z, h, valid)`` for mlm.
        head: from :func:`build_head`. Do not DDP-wrap it: it is used outside the encoder's forward
            (GradCache step 2 has no DDP forward at all), so its gradients are averaged here instead.
        batch: tensors; mlm: the output of :func:`mlm_batch`; simclr/clue: ``a.*``/``b.*`` views.
        cfg: the objective config; ``mini_batch_size > 0`` uses GradCache for simclr/clue.
        no_sync: ``ddp_model.no_sync`` for GradCache's intermediate backwards.

    Returns:
        (loss detached, metrics dict of floats).
    """
    if cfg.objective not in ("simclr", "clue") or cfg.mini_batch_size <= 0:
        loss, metrics = pretext_loss(model, head, batch, cfg, time_fields)
        loss.backward()
        average_grads(head)
        return loss.detach(), {"loss": loss.item(), **metrics}

    a, b = _model_views(batch)
    pair_loss = symmetric_info_nce if cfg.objective == "clue" else nt_xent
    seen: dict[str, float] = {}

    def loss_fn(za: Tensor, zb: Tensor) -> Tensor:
        seen["acc"] = _retrieval_acc(za.detach(), zb.detach())
        return pair_loss(head(za), head(zb), head.temperature())

    loss = grad_cache(model, [a, b], loss_fn, cfg.mini_batch_size, no_sync=no_sync)
    average_grads(head)
    return loss, {"loss": loss.item(), "temperature": float(head.temperature().detach()), f"{cfg.objective}/top1": seen["acc"]}


def _model_views(batch: Mapping[str, Tensor]) -> tuple[dict, dict]:
    """The a/b views as encoder inputs (augmentation bookkeeping such as ``replaced`` removed)."""
    a, b = split_views(batch)
    return ({k: v for k, v in a.items() if k != "replaced"}, {k: v for k, v in b.items() if k != "replaced"})


def _item_key(model: nn.Module) -> str:
    """The batch key of the encoder's item identity (``EncoderConfig.item_key``): what counts as the same target."""
    return ENCODER_ITEM_KEYS[getattr(model, "module", model).config.item_key]


def pretext_loss(
    model: nn.Module, head: nn.Module, batch: Mapping[str, Tensor], cfg: ObjectiveConfig, time_fields=None
) -> tuple[Tensor, dict]:
    """One batch's pretext loss, forward only (the graph is kept: backprop it to train, or call under
    ``torch.no_grad()`` for a validation loss).

    mlm: the averaged masked-prediction cross-entropy (``+ 0 * z`` keeps the pooling/output layer in
    DDP's graph); simclr/clue: one forward over both views (padded to the wider), so DDP sees one
    forward per backward, then NT-Xent / symmetric InfoNCE over the global batch.

    Returns:
        (0-d loss tensor, metrics: per-task mlm losses/accuracies, or temperature and in-batch top-1).
    """
    if "+" in cfg.objective:  # each objective on its own step inputs (``<name>/...``), with its own head
        parts = objective_parts(cfg.objective)
        losses, metrics = [], {}
        for name in parts:
            loss, m = pretext_loss(model, head[name], sub_batch(batch, name),
                                   dataclasses.replace(cfg, objective=name, weights=()), time_fields)
            losses.append(loss)
            metrics.update({(k if "/" in k else f"{name}/{k}"): v for k, v in m.items()})  # clue/temperature, ...
            metrics[f"{name}/loss"] = float(loss.detach())
        return weighted_sum(torch.stack(losses), cfg.weights), metrics
    if cfg.objective == "mlm":
        z, h, _ = model(batch, return_hidden=True)  # h: (B, 1+L, d)
        loss, metrics = mlm_loss(h, batch, head, time_fields)
        return loss + 0.0 * z.sum(), metrics
    if cfg.objective == "future":  # history before the cut (a) -> every item of the window after it (b)
        from userfm.objectives.future import future_loss

        a, b = _model_views(batch)
        z, items = model(a, items=b)  # (B, d), (B, W, d_model)
        valid = torch.arange(items.shape[1], device=items.device)[None, :] < b["length"][:, None]
        loss, acc = future_loss(head(z), items, valid, b[_item_key(model)], head.temperature())
        return loss, {"temperature": float(head.temperature().detach()), "future/top1": acc}
    if cfg.objective == "next":  # the causal state after each event -> the next event's item
        from userfm.objectives.next_event import next_loss

        z, h, valid, items = model(batch, return_hidden=True, items=batch)  # h: (B, 1+L, d), items: (B, L, d)
        loss, acc = next_loss(head(h[:, 1:]), items, batch["length"], batch[_item_key(model)], head.temperature())
        return loss + 0.0 * z.sum(), {"temperature": float(head.temperature().detach()), "next/top1": acc}
    if cfg.objective == "masked-item":  # the state at each masked event -> the item that was there (BERT4Rec)
        from userfm.objectives.masked_item import masked_item_loss

        z, h, valid, items = model(batch, return_hidden=True, items=batch)  # items: from the unmasked features
        loss, acc = masked_item_loss(head(h[:, 1:]), items, batch["masked"], batch[_item_key(model)], head.temperature())
        return loss + 0.0 * z.sum(), {"temperature": float(head.temperature().detach()), "masked-item/top1": acc}
    a, b = _model_views(batch)
    n = len(a["length"])
    z = model(_concat_torch([a, b]))  # (2n, d)
    za, zb = z[:n], z[n:]
    acc = _retrieval_acc(za.detach(), zb.detach())
    pair_loss = symmetric_info_nce if cfg.objective == "clue" else nt_xent
    loss = pair_loss(head(za), head(zb), head.temperature())
    return loss, {"temperature": float(head.temperature().detach()), f"{cfg.objective}/top1": acc}


def _concat_torch(views: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    width = max(v["service"].shape[1] for v in views)
    out = {}
    for k in views[0]:
        parts = []
        for v in views:
            x = v[k]
            if k != "length" and x.dim() >= 2 and x.shape[1] < width:
                pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
                x = F.pad(x, pad)
            parts.append(x)
        out[k] = torch.cat(parts)
    return out
