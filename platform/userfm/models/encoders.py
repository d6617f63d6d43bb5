"""Item encoders (one event -> one vector), the user encoder, named sizes, parameter/FLOP formulas.

Architecture (ShopperBERT https://arxiv.org/abs/2106.00573, CLUE https://arxiv.org/abs/2111.11294):

    event  --item encoder-->  e_i (d)                      one of three, ``EncoderConfig.item_encoder``:
        "category": sum of per-level category embeddings (+ projected frozen text vector)  ShopperBERT
        "text":     BPE tokens -> item transformer -> mean pool                              CLUE
        "minilm":   frozen MiniLM vector -> linear + LayerNorm (UniSRec-style adaptor)       SimCLR variant
        + item-id emb (optional, ``item_id_buckets``): a learned vector per hashed item identity, so
          items whose texts share their words (and text vectors nearly) can still be told apart
        + co-occurrence vector (optional, ``cooc_items``): Linear(frozen PPMI-SVD vector of the item, from
          which training users took it; :mod:`userfm.models.cooc`), a buffer saved with the weights
    x_i = e_i (or [MASK] if masked) + service emb + sum of time-field embs + position emb
    [CLS] x_1 .. x_L  --user transformer (pre-LN)-->  h_0 .. h_L
    user embedding = h_0 (pooling "cls") or mean(h_1..h_L) (pooling "mean"), then optional Linear to out_dim

Model code is plain ``nn.Module`` composition (no inheritance beyond nn.Module); sizes are builder
functions returning a frozen :class:`EncoderConfig` that serialises to JSON and travels with the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ITEM_ENCODERS = ("category", "text", "minilm")
POOLINGS = ("cls", "mean", "last")

ITEM_KEYS = {"text": "text_hash", "item_id": "item_hash"}  # EncoderConfig.item_key -> the batch key it reads


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild a user encoder (saved as JSON next to its safetensors)."""

    item_encoder: str = "category"  # "category" | "text" | "minilm" (see module docstring)
    d_model: int = 64  # width of item and user transformers
    n_layers: int = 2  # user transformer layers
    n_heads: int = 4  # attention heads (user and item transformer)
    d_ff: int = 256  # feed-forward width (user and item transformer)
    dropout: float = 0.1  # dropout probability everywhere
    max_events: int = 128  # events per user = position embeddings - 1 ([CLS])
    pooling: str = "cls"  # "cls" | "mean" | "last" (the state after the last event; the ``next`` objective's)
    causal: bool = False  # each event attends to [CLS] and the events before it only (the ``next`` objective)
    out_dim: int = 0  # user embedding size; 0 = d_model with no output projection
    n_services: int = 8  # service vocabulary incl. pad/unk (features.Vocabs.n_services)
    category_sizes: tuple[int, ...] = (64, 256, 1024, 4096)  # per-level vocab incl. pad/unk
    time_sizes: tuple[int, ...] = (12, 14, 33, 9, 26)  # per time field vocab incl. pad/unk
    text_vector_dim: int = 0  # frozen text vector size (384 for MiniLM); "minilm" needs it, "category" may add it
    text_vocab: int = 8192  # BPE vocabulary ("text" item encoder only)
    max_text_tokens: int = 32  # tokens per event incl. <bos> ("text" only)
    item_layers: int = 1  # item transformer layers ("text" only)
    item_id_buckets: int = 0  # > 0: add a learned embedding of each event's item identity (item key mod buckets) to e_i
    cooc_items: int = 0  # > 0: rows of the frozen item co-occurrence table (userfm.models.cooc), keyed by the item key
    item_key: str = "text"  # the item identity of the id table and the co-occurrence table: "text" (text_hash, models
    #                         saved before 2026-12-06) | "item_id" (item_hash: the event's item id, else its text)
    cooc_dim: int = 0  # its vector size; e_i += Linear(cooc_dim, d, no bias)(vector), zeros for items not in it

    def __post_init__(self):
        if self.item_encoder not in ITEM_ENCODERS:
            raise ValueError(f"item_encoder must be one of {ITEM_ENCODERS}, got {self.item_encoder!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.item_id_buckets < 0:
            raise ValueError(f"item_id_buckets must be >= 0, got {self.item_id_buckets}")
        if self.item_key not in ITEM_KEYS:
            raise ValueError(f"item_key must be one of {ITEM_KEYS}, got {self.item_key!r}")
        if self.cooc_items < 0 or self.cooc_dim < 0 or bool(self.cooc_items) != bool(self.cooc_dim):
            raise ValueError(f"cooc_items and cooc_dim must both be > 0 or both 0, got {self.cooc_items}, {self.cooc_dim}")
        if self.item_encoder == "minilm" and self.text_vector_dim <= 0:
            raise ValueError("item_encoder 'minilm' needs text_vector_dim > 0 (384 for all-MiniLM-L6-v2)")

    @property
    def embed_dim(self) -> int:
        """Size of the user embedding."""
        return self.out_dim or self.d_model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EncoderConfig":
        d = json.loads(text)
        for k in ("category_sizes", "time_sizes"):
            d[k] = tuple(d[k])
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _transformer(cfg: EncoderConfig, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
    )
    # Pre-LN needs a final LayerNorm; nested tensors off: identical code path in train and eval.
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(cfg.d_model), enable_nested_tensor=False)


class CategoryItemEncoder(nn.Module):
    """ShopperBERT item: sum of one embedding per category level (+ projected frozen text vector).

    Summing (rather than concatenating and projecting) keeps the width independent of the number of
    levels; a missing level is id 0, whose embedding is fixed at zero (padding_idx).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.levels = nn.ModuleList(nn.Embedding(n, cfg.d_model, padding_idx=0) for n in cfg.category_sizes)
        self.text_proj = nn.Linear(cfg.text_vector_dim, cfg.d_model) if cfg.text_vector_dim else None

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """category (B, L, C) [+ text_vector (B, L, text_vector_dim)] -> (B, L, d)."""
        cat = batch["category"]
        out = sum(emb(cat[..., k]) for k, emb in enumerate(self.levels))
        if self.text_proj is not None:
            out = out + self.text_proj(batch["text_vector"].float())
        return out


class TextItemEncoder(nn.Module):
    """CLUE item: BPE tokens -> token + position embeddings -> item transformer -> mean over tokens.

    Only real events are encoded (padding events are skipped, not computed and masked).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.text_vocab, cfg.d_model, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_text_tokens, cfg.d_model)
        self.transformer = _transformer(cfg, cfg.item_layers)
        self.d_model = cfg.d_model

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """tokens (B, L, K) -> (B, L, d); events with length <= position are zeros."""
        tokens = batch["tokens"]
        b, l, k = tokens.shape
        valid = torch.arange(l, device=tokens.device)[None, :] < batch["length"][:, None]  # (B, L)
        tok = tokens[valid]  # (E, K), E = real events
        pad = tok == 0  # (E, K); <bos> at position 0 guarantees >= 1 real token per event
        x = self.tokens(tok) + self.positions.weight[:k]  # (E, K, d)
        h = self.transformer(x, src_key_padding_mask=pad)  # (E, K, d)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)  # (E, d)
        out = h.new_zeros(b, l, self.d_model)
        out[valid] = pooled
        return out


class FrozenVectorItemEncoder(nn.Module):
    """SimCLR-variant/UniSRec item: a frozen sentence vector (MiniLM, cached) -> linear + LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.text_vector_dim, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """text_vector (B, L, text_vector_dim) -> (B, L, d)."""
        return self.norm(self.proj(batch["text_vector"].float()))


_ITEM_ENCODER_CLASSES = {"category": CategoryItemEncoder, "text": TextItemEncoder, "minilm": FrozenVectorItemEncoder}


class UserEncoder(nn.Module):
    """Events of one user -> one embedding. Input: a batch from ``features.make_batch`` as tensors."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.item = _ITEM_ENCODER_CLASSES[cfg.item_encoder](cfg)
        self.item_ids = nn.Embedding(cfg.item_id_buckets, d) if cfg.item_id_buckets else None
        self.cooc = nn.Linear(cfg.cooc_dim, d, bias=False) if cfg.cooc_items else None
        if cfg.cooc_items:  # filled by set_cooc before training; saved and loaded with the weights
            self.register_buffer("cooc_hashes", torch.zeros(cfg.cooc_items, dtype=torch.int64))
            self.register_buffer("cooc_vectors", torch.zeros(cfg.cooc_items, cfg.cooc_dim))
        self.services = nn.Embedding(cfg.n_services, d, padding_idx=0)
        self.times = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in cfg.time_sizes)
        self.positions = nn.Embedding(cfg.max_events + 1, d)  # position 0 is [CLS]
        self.cls = nn.Parameter(torch.zeros(d))
        self.mask_vector = nn.Parameter(torch.zeros(d))  # input of a masked event (item and time hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = _transformer(cfg, cfg.n_layers)
        self.out = nn.Linear(d, cfg.out_dim) if cfg.out_dim else None
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.mask_vector, std=0.02)
        if self.item_ids is not None:  # an id pretraining never (or barely) trained adds ~nothing: its item is its text and
            nn.init.normal_(self.item_ids.weight, std=0.02)  # co-occurrence parts (the default N(0, 1) gave every cold item a
            #                                                 random vector of norm ~sqrt(d) that outweighed them)

    def hidden(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Last hidden states and the validity mask.

        Returns:
            h: (B, 1 + L, d), position 0 is [CLS]; valid: (B, 1 + L) bool, True for [CLS] and real events.
        """
        service = batch["service"]
        b, l = service.shape
        if l > self.config.max_events:
            raise ValueError(f"{l} events per user > max_events {self.config.max_events}")
        valid_ev = torch.arange(l, device=service.device)[None, :] < batch["length"][:, None]  # (B, L)
        x = self.item_vectors(batch)  # (B, L, d)
        time = batch["time"]
        for j, emb in enumerate(self.times):
            x = x + emb(time[..., j])
        masked = batch.get("masked")
        if masked is not None:
            # A masked event shows only [MASK] + its service and position: item and time are targets.
            x = torch.where(masked.unsqueeze(-1), self.mask_vector.expand_as(x), x)
        x = x + self.services(service)
        x = torch.cat([self.cls.expand(b, 1, -1), x], dim=1) + self.positions.weight[: l + 1]  # (B, 1+L, d)
        valid = torch.cat([valid_ev.new_ones(b, 1), valid_ev], dim=1)  # (B, 1+L)
        causal = (torch.ones(l + 1, l + 1, dtype=torch.bool, device=x.device).triu(1) if self.config.causal else None)
        h = self.transformer(self.drop(x), mask=causal, src_key_padding_mask=~valid)  # (B, 1+L, d)
        return h, valid

    def item_vectors(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, L, d): each event's item part of the input (item encoder + hashed item id + co-occurrence
        vector; no time, service or position): the item representation the ``future`` objective scores."""
        x = self.item(batch)  # (B, L, d)
        key = batch[ITEM_KEYS[self.config.item_key]] if self.item_ids is not None or self.cooc is not None else None  # (B, L)
        if self.item_ids is not None:  # hashed item identity; padding (hash 0) is masked out by the callers
            x = x + self.item_ids(torch.remainder(key, self.config.item_id_buckets))
        if self.cooc is not None:
            x = x + self.cooc(self.cooc_lookup(key))
        return x

    def set_cooc(self, hashes, vectors) -> None:
        """Fill the co-occurrence table: hashes (cooc_items,) sorted int64, vectors (cooc_items, cooc_dim)."""
        hashes, vectors = torch.as_tensor(hashes, dtype=torch.int64), torch.as_tensor(vectors, dtype=torch.float32)
        if self.cooc is None or tuple(vectors.shape) != tuple(self.cooc_vectors.shape) or hashes.shape != self.cooc_hashes.shape:
            raise ValueError(f"co-occurrence table of shape {tuple(vectors.shape)} does not fit cooc_items="
                             f"{self.config.cooc_items}, cooc_dim={self.config.cooc_dim}")
        if len(hashes) > 1 and not bool((hashes[1:] > hashes[:-1]).all()):
            raise ValueError("co-occurrence hashes must be sorted and unique")
        self.cooc_hashes.copy_(hashes)
        self.cooc_vectors.copy_(vectors)

    def cooc_lookup(self, text_hash: Tensor) -> Tensor:
        """(B, L) int64 text hashes -> (B, L, cooc_dim) table rows; zeros for hashes not in the table."""
        pos = torch.searchsorted(self.cooc_hashes, text_hash.contiguous()).clamp(max=self.config.cooc_items - 1)
        hit = (self.cooc_hashes[pos] == text_hash).unsqueeze(-1)
        return torch.where(hit, self.cooc_vectors[pos], torch.zeros((), dtype=self.cooc_vectors.dtype, device=text_hash.device))

    def pool(self, h: Tensor, valid: Tensor) -> Tensor:
        """(B, 1+L, d), (B, 1+L) -> (B, embed_dim). Mean pooling over a user with no events uses [CLS]."""
        if self.config.pooling == "cls":
            z = h[:, 0]
        elif self.config.pooling == "last":  # position n holds event n - 1 ([CLS] is 0): the state after the last event
            z = h[torch.arange(h.shape[0], device=h.device), valid[:, 1:].sum(1)]
        else:
            ev = valid[:, 1:].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
            n = ev.sum(1)  # (B, 1)
            z = torch.where(n > 0, (h[:, 1:] * ev).sum(1) / n.clamp(min=1), h[:, 0])
        return self.out(z) if self.out is not None else z

    def forward(self, batch: Mapping[str, Tensor], return_hidden: bool = False, items: Mapping[str, Tensor] | None = None):
        """Batch of users -> (B, embed_dim) user embeddings.

        With ``return_hidden`` -> ``(z, h, valid)`` (see :meth:`hidden`), so objectives that read hidden
        states (MLM) still call the module through DDP's forward. With ``items`` (a batch of events) ->
        ``(z, item_vectors(items))`` (with ``return_hidden``: ``(z, h, valid, item_vectors(items))``), for the same
        reason (the ``future`` and ``next`` objectives' targets).
        """
        h, valid = self.hidden(batch)
        z = self.pool(h, valid)
        if items is not None:
            return (z, h, valid, self.item_vectors(items)) if return_hidden else (z, self.item_vectors(items))
        return (z, h, valid) if return_hidden else z


def build_user_encoder(cfg: EncoderConfig) -> UserEncoder:
    return UserEncoder(cfg)


# --------------------------------------------------------------------------------------------------
# Named sizes
# --------------------------------------------------------------------------------------------------

# name: (d_model, n_layers, n_heads, item_layers). d_ff = 4 * d_model throughout.
_SIZES = {
    "tiny": (32, 2, 2, 1),
    "small": (128, 4, 4, 1),
    "base": (256, 6, 8, 2),
    "large": (512, 8, 8, 2),
    # CLUE (AAAI'23) reports 725M parameters with a byte-level BPE item transformer and a service
    # transformer, but not their shapes (no code was released). This shape gives 724.3M parameters
    # (formula below, tested): 24 user + 1 item layers of width 1536 (708.3M non-embedding) plus a
    # 10k BPE vocabulary. Documented, never run here (2.9 GB of fp32 weights alone).
    "clue-725m": (1536, 24, 16, 1),
}


def _named(name: str, vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    d, n_layers, n_heads, item_layers = _SIZES[name]
    kw: dict = dict(d_model=d, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d, item_layers=item_layers)
    if name == "clue-725m":
        kw.update(item_encoder="text", text_vocab=10_000, pooling="mean", max_events=256)
    if vocabs is not None:
        kw.update(
            n_services=vocabs.n_services,
            category_sizes=vocabs.category_sizes,
            time_sizes=vocabs.time_sizes,
            max_events=vocabs.config.max_events,
            max_text_tokens=vocabs.config.max_text_tokens,
        )
    if tokenizer is not None:
        kw["text_vocab"] = tokenizer.vocab_size
    kw.update(overrides)
    return EncoderConfig(**kw)


def tiny(vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """d 32, 2 layers, 2 heads: tests and smoke runs."""
    return _named("tiny", vocabs, tokenizer, **overrides)


def small(vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """d 128, 4 layers, 4 heads."""
    return _named("small", vocabs, tokenizer, **overrides)


def base(vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """d 256, 6 layers, 8 heads, 2 item layers."""
    return _named("base", vocabs, tokenizer, **overrides)


def large(vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """d 512, 8 layers, 8 heads, 2 item layers."""
    return _named("large", vocabs, tokenizer, **overrides)


def clue_725m(vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """CLUE-scale: d 1536, 24 user + 1 item layers, text item encoder, mean pooling (not run here)."""
    return _named("clue-725m", vocabs, tokenizer, **overrides)


SIZES = {"tiny": tiny, "small": small, "base": base, "large": large, "clue-725m": clue_725m}


def config_for(name: str, vocabs=None, tokenizer=None, **overrides) -> EncoderConfig:
    """Named size -> config, e.g. ``config_for("small", vocabs, item_encoder="minilm", text_vector_dim=384)``."""
    if name not in SIZES:
        raise ValueError(f"unknown size {name!r}; known: {sorted(SIZES)}")
    return SIZES[name](vocabs, tokenizer, **overrides)


# --------------------------------------------------------------------------------------------------
# Parameter and FLOP accounting
# --------------------------------------------------------------------------------------------------


def _layer_params(d: int, f: int) -> int:
    # attention in/out projections 4d^2 + 4d, feed-forward 2df + f + d, two LayerNorms 4d
    return 4 * d * d + 2 * d * f + 9 * d + f


def expected_num_params(cfg: EncoderConfig, non_embedding: bool = False) -> int:
    """Parameter count by formula (tested equal to the built model's).

    Non-embedding parameters follow Kaplan et al. (https://arxiv.org/abs/2001.08361): everything but
    lookup tables (token, category, service, time, position embeddings) and the [CLS]/[MASK] vectors.
    Returns the total, or with ``non_embedding=True`` the non-embedding count.
    """
    d, f = cfg.d_model, cfg.d_ff
    dense = cfg.n_layers * _layer_params(d, f) + 2 * d  # user transformer + final LayerNorm
    emb = cfg.n_services * d + sum(cfg.time_sizes) * d + (cfg.max_events + 1) * d + 2 * d  # + cls, mask
    emb += cfg.item_id_buckets * d
    dense += cfg.cooc_dim * d if cfg.cooc_items else 0  # the projection; the table itself is a frozen buffer
    if cfg.item_encoder == "category":
        emb += sum(cfg.category_sizes) * d
        dense += (cfg.text_vector_dim * d + d) if cfg.text_vector_dim else 0
    elif cfg.item_encoder == "text":
        emb += cfg.text_vocab * d + cfg.max_text_tokens * d
        dense += cfg.item_layers * _layer_params(d, f) + 2 * d
    else:  # minilm
        dense += cfg.text_vector_dim * d + d + 2 * d
    if cfg.out_dim:
        dense += d * cfg.out_dim + cfg.out_dim
    return dense if non_embedding else dense + emb


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of ``model``; ``non_embedding`` drops nn.Embedding tables and [CLS]/[MASK] vectors."""
    total = sum(p.numel() for p in model.parameters())
    if not non_embedding:
        return total
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    emb += sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-1] in ("cls", "mask_vector"))
    return total - emb


def flops_per_sample(cfg: EncoderConfig, n_events: int | None = None, n_tokens: int | None = None,
                     training: bool = True) -> float:
    """Estimated FLOPs to process one user (forward, or forward + backward when ``training``).

    Kaplan et al.'s estimate per token of a transformer: forward = 2 * N + 2 * n_layers * n_ctx * d
    (N non-embedding weights; the second term is QK^T and attention-weighted V). Backward = 2 x forward,
    so training = 3 x forward = 6N + 6 n_layers n_ctx d per token. Here, per user:

        user transformer: T = n_events + 1 tokens ([CLS]):  2 * N_user * T + 2 * n_layers * T^2 * d
        text items:       n_events x (2 * N_item * K + 2 * item_layers * K^2 * d), K = n_tokens
        category/minilm:  2 * text_vector_dim * d * n_events (frozen-vector projection; lookups are free)
        co-occurrence:    2 * cooc_dim * d * n_events (its projection)
        output proj:      2 * d * out_dim

    GradCache adds one more forward: multiply by 4/3 for a cached step. Defaults: full context.
    """
    d, f = cfg.d_model, cfg.d_ff
    n_ev = cfg.max_events if n_events is None else n_events
    k = cfg.max_text_tokens if n_tokens is None else n_tokens
    t = n_ev + 1
    fwd = 2 * cfg.n_layers * _layer_params(d, f) * t + 2 * cfg.n_layers * t * t * d
    if cfg.item_encoder == "text":
        fwd += n_ev * (2 * cfg.item_layers * _layer_params(d, f) * k + 2 * cfg.item_layers * k * k * d)
    elif cfg.text_vector_dim:
        fwd += 2 * cfg.text_vector_dim * d * n_ev
    if cfg.cooc_items:
        fwd += 2 * cfg.cooc_dim * d * n_ev
    if cfg.out_dim:
        fwd += 2 * d * cfg.out_dim
    return float(3 * fwd if training else fwd)


# --------------------------------------------------------------------------------------------------
# Save / load (safetensors + JSON, never pickle)
# --------------------------------------------------------------------------------------------------


def save_encoder(path: str | Path, model: UserEncoder, vocabs=None, tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``vocabs.json``, ``tokenizer.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    (path / "config.json").write_text(model.config.to_json())
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    if vocabs is not None:
        vocabs.save(path / "vocabs.json")
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path


def load_encoder(path: str | Path, device: str = "cpu"):
    """-> ``(model in eval mode, vocabs or None, tokenizer or None)`` from :func:`save_encoder`'s folder."""
    from safetensors.torch import load_file

    from userfm.models.features import Vocabs
    from userfm.models.tokenizer import TextTokenizer

    path = Path(path)
    cfg = EncoderConfig.from_json((path / "config.json").read_text())
    model = UserEncoder(cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
    model.to(device).eval()
    vocabs = Vocabs.load(path / "vocabs.json") if (path / "vocabs.json").exists() else None
    tok = TextTokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
    return model, vocabs, tok
