"""Sequence rows -> padded numpy arrays: the pure batch function Ray Data's ``map_batches`` runs.

Input: rows of ``schema.SEQUENCE_SCHEMA`` (a ``pyarrow.Table`` or a dict of column lists), one row per
(user, scope), events time-sorted oldest first. Output of :func:`make_batch` (B users, L = max events
in the batch, capped at ``max_events``; events are left-aligned, the most recent ``max_events`` kept):

=============  ===============  ==========================================================
key            shape, dtype     meaning
=============  ===============  ==========================================================
length         (B,) int64       real events per user (0..L)
service        (B, L) int64     service id, 0 = padding, 1 = unknown service
category       (B, L, C) int64  id of each category level (C = levels); 0 = level missing
time           (B, L, T) int64  id of each time field (year, month, ...); 0 = padding
ts             (B, L) int64     event time, microseconds since the epoch (UTC); 0 = padding
text_hash      (B, L) int64     :func:`text_hash` of the text (frozen-vector key)
item_hash      (B, L) int64     :func:`item_hash`: the event's item identity (its item id, else its text)
masked         (B, L) bool      event replaced by the [MASK] input (MLM, SimCLR masking)
tokens         (B, L, K) int64  BPE ids of the text (only with a tokenizer); 0 = padding
=============  ===============  ==========================================================

Vocabularies (services, every category level, years) are fitted on the training corpus by
:func:`fit_vocabs` and saved as JSON. In every vocabulary id 0 is padding/absent and id 1 is UNK.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD_ID, UNK_ID = 0, 1
N_SPECIAL = 2  # ids 0 (pad) and 1 (unk) precede every vocabulary's entries
IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
LEVEL_SEP = "\x1f"  # joins a category path prefix: level k's key is the path up to level k

# Fixed-range time fields: number of values. "year" is fitted (the years seen in the corpus);
# "recency" is log2(1 + hours before the user's last event), in ``recency_buckets`` buckets.
FIXED_TIME_FIELDS = {"month": 12, "day": 31, "weekday": 7, "hour": 24}
TIME_FIELDS = ("year", *FIXED_TIME_FIELDS, "recency")
CALENDAR_FIELDS = ("year", *FIXED_TIME_FIELDS)  # the default: every calendar field, no recency
BATCH_KEYS = ("length", "service", "category", "time", "ts", "text_hash", "item_hash", "masked", "tokens")
EVENT_KEYS = ("service", "category", "time", "ts", "text_hash", "item_hash", "masked", "tokens", "text_vector")


@dataclass(frozen=True)
class FeatureConfig:
    """What :func:`make_batch` extracts from each event."""

    max_events: int = 128  # events kept per user (the most recent), = the user transformer's context
    category_levels: int = 4  # category path levels used (ShopperBERT: 4)
    time_fields: tuple[str, ...] = CALENDAR_FIELDS  # subset of TIME_FIELDS
    recency_buckets: int = 16  # buckets of log2(1 + hours before the last event), if "recency" is used
    max_text_tokens: int = 32  # BPE tokens per event text incl. <bos> (trainable text encoder)
    min_count: int = 1  # categories seen fewer times map to UNK

    def __post_init__(self):
        if any(f not in TIME_FIELDS for f in self.time_fields) or len(set(self.time_fields)) != len(self.time_fields):
            raise ValueError(f"time_fields must be distinct names from {TIME_FIELDS}, got {list(self.time_fields)}")
        if self.max_events < 1 or self.category_levels < 0 or self.max_text_tokens < 1:
            raise ValueError("max_events and max_text_tokens must be >= 1, category_levels >= 0")


@dataclass(frozen=True)
class Vocabs:
    """Fitted vocabularies (entries only; ids are ``N_SPECIAL + index``). JSON round-trips exactly."""

    config: FeatureConfig
    services: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]  # per level: path prefixes joined with LEVEL_SEP
    years: tuple[int, ...]

    # ---- sizes the model needs (vocabulary size including the 2 special ids) ----
    @property
    def n_services(self) -> int:
        return N_SPECIAL + len(self.services)

    @property
    def category_sizes(self) -> tuple[int, ...]:
        return tuple(N_SPECIAL + len(level) for level in self.categories)

    @property
    def time_sizes(self) -> tuple[int, ...]:
        sizes = {"year": len(self.years), "recency": self.config.recency_buckets, **FIXED_TIME_FIELDS}
        return tuple(N_SPECIAL + sizes[f] for f in self.config.time_fields)

    # ---- lookups ----
    @cached_property
    def _service_index(self) -> dict[str, int]:
        return {s: N_SPECIAL + i for i, s in enumerate(self.services)}

    @cached_property
    def _category_index(self) -> list[dict[str, int]]:
        return [{c: N_SPECIAL + i for i, c in enumerate(level)} for level in self.categories]

    @cached_property
    def _year_lookup(self) -> tuple[int, np.ndarray]:
        """(first year, ids by year offset) for vectorised year -> id."""
        if not self.years:
            return 0, np.zeros(0, dtype=np.int64)
        lo, hi = min(self.years), max(self.years)
        table = np.full(hi - lo + 1, UNK_ID, dtype=np.int64)
        for i, y in enumerate(self.years):
            table[y - lo] = N_SPECIAL + i
        return lo, table

    # ---- JSON ----
    def to_json(self) -> str:
        return json.dumps(
            {
                "config": dataclasses.asdict(self.config),
                "services": list(self.services),
                "categories": [list(level) for level in self.categories],
                "years": list(self.years),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> "Vocabs":
        d = json.loads(text)
        cfg = d["config"]
        cfg["time_fields"] = tuple(cfg["time_fields"])
        return cls(
            config=FeatureConfig(**cfg),
            services=tuple(d["services"]),
            categories=tuple(tuple(level) for level in d["categories"]),
            years=tuple(d["years"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabs":
        return cls.from_json(Path(path).read_text())


# --------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------


def _as_table(rows: pa.Table | Mapping[str, Any]) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    cols = {}
    for k, v in rows.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            v = list(v)  # Ray Data's numpy batches hold lists as object arrays
        cols[k] = v
    return pa.table(cols)


@dataclass
class _Flat:
    """The kept events of a batch, flattened: event e belongs to user ``user[e]`` at ``pos[e]``."""

    n_users: int
    length: np.ndarray  # (B,)
    user: np.ndarray  # (E,)
    pos: np.ndarray  # (E,)
    take: np.ndarray  # (E,) index into the flattened list columns
    n_all: np.ndarray  # (B,) events per row before truncation


def _flatten(rows: pa.Table, max_events: int) -> _Flat:
    ts = rows.column("ts").combine_chunks()
    n_all = pc.fill_null(pc.list_value_length(ts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_all)[:-1]]).astype(np.int64)
    length = np.minimum(n_all, max_events)
    user = np.repeat(np.arange(len(n_all)), length)
    first = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    pos = np.arange(int(length.sum()), dtype=np.int64) - np.repeat(first, length)
    take = np.repeat(starts + n_all - length, length) + pos  # the most recent events
    return _Flat(len(n_all), length, user, pos, take, n_all)


def _flat_values(rows: pa.Table, name: str, n_all: np.ndarray) -> pa.Array | None:
    """The flattened per-event values of list column ``name``, aligned with ``ts`` (None if absent).

    A null list in one row (the field was not recorded for that user) becomes that many null values,
    so the flattened column stays aligned with the flattened ``ts``.
    """
    if name not in rows.column_names:
        return None
    col = rows.column(name).combine_chunks()
    if col.null_count:
        lists = col.to_pylist()
        col = pa.array([v if v is not None else [None] * int(n) for v, n in zip(lists, n_all)], col.type)
    values = col.flatten()
    if len(values) != int(n_all.sum()):
        raise ValueError(f"column {name!r}: lists are not the same lengths as 'ts'")
    return values


def _event_us(values: pa.Array) -> np.ndarray:
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.timestamp("us", tz=values.type.tz)).cast(pa.int64())
    return values.to_numpy(zero_copy_only=False).astype(np.int64)


def text_hash(texts) -> np.ndarray:
    """blake2b-64 of each UTF-8 text as int64 (the MiniLM cache key); ``None`` hashes as ``""``."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b((t or "").encode("utf-8"), digest_size=8).digest(), "little", signed=True)
            for t in texts
        ],
        dtype=np.int64,
    )


ITEM_KEY_PREFIX = "\x1fitem:"  # hashed before an item id, so an id never collides with an equal text


def _strings(values) -> pa.Array:
    """An Arrow string array of ``values`` (an Arrow array or chunked array, or a Python sequence; None stays null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == pa.string() else values.cast(pa.string())
    return pa.array(list(values), pa.string())


def hash_strings(values) -> np.ndarray:
    """:func:`text_hash` of every value (null as ""), computed once per distinct value: a pass in Arrow, not a
    Python call per event."""
    arr = _strings(values)
    if not len(arr):
        return np.zeros(0, np.int64)
    enc = pc.dictionary_encode(pc.fill_null(arr, ""))
    return text_hash(enc.dictionary.to_pylist())[enc.indices.to_numpy(zero_copy_only=False)]


def item_hash(item_ids, texts) -> np.ndarray:
    """The item identity of each event as int64: :func:`text_hash` of ``ITEM_KEY_PREFIX + item_id`` where the
    event has an item id, else the hash of its text (an event without an id is the item its text names).

    One item is one key even when its events' texts differ (MovieLens texts carry the rating: one film is up
    to 10 texts). Each distinct key is hashed once. Arrow arrays or Python sequences, of equal length.
    """
    ids, txt = _strings(item_ids), _strings(texts)
    if not len(ids):
        return np.zeros(0, np.int64)
    keys = pc.if_else(pc.is_null(ids), pc.fill_null(txt, ""), pc.binary_join_element_wise(ITEM_KEY_PREFIX, ids, ""))
    return hash_strings(keys)


def _time_values(us: np.ndarray, last_us: np.ndarray, fields: tuple[str, ...], recency_buckets: int) -> dict:
    """Raw (not yet id-mapped) value of each time field, 0-based except year."""
    dt = us.astype("datetime64[us]")
    days = dt.astype("datetime64[D]").astype(np.int64)
    out = {}
    for f in fields:
        if f == "year":
            out[f] = dt.astype("datetime64[Y]").astype(np.int64) + 1970
        elif f == "month":
            out[f] = dt.astype("datetime64[M]").astype(np.int64) % 12
        elif f == "day":
            out[f] = (dt.astype("datetime64[D]") - dt.astype("datetime64[M]")).astype(np.int64)
        elif f == "weekday":
            out[f] = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        elif f == "hour":
            out[f] = (us // 3_600_000_000) % 24
        elif f == "recency":
            hours = np.maximum(last_us - us, 0) / 3.6e9
            out[f] = np.minimum(np.floor(np.log2(1.0 + hours)).astype(np.int64), recency_buckets - 1)
    return out


def _category_keys(paths: list, levels: int) -> list[list[str | None]]:
    """Per event, the key of each level (path prefix) or None where the path is shorter."""
    out = []
    for p in paths:
        p = p or []
        out.append([LEVEL_SEP.join(p[: k + 1]) if k < len(p) else None for k in range(levels)])
    return out


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def _value_counts(values: pa.Array) -> dict:
    """value -> count over a flat Arrow array (nulls counted under None)."""
    vc = pc.value_counts(values)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def fit_vocabs(rows: pa.Table | Mapping[str, Any], config: FeatureConfig = FeatureConfig()) -> Vocabs:
    """Fit service, category-level and year vocabularies on the corpus ``rows``.

    Pass scope-"all" rows of the training split (each event once). Entries are sorted by descending
    count, then by value, so the result is deterministic regardless of row order.
    """
    table = _as_table(rows)
    flat = _flatten(table, max_events=2**62)  # every event counts when fitting
    n = len(flat.take)
    # counted per distinct value in Arrow (one pass over the events), then expanded in Python per distinct value only
    services = Counter()
    svc = _flat_values(table, "service", flat.n_all)
    if svc is not None:
        services.update(_value_counts(svc))
    levels = [Counter() for _ in range(config.category_levels)]
    cat = _flat_values(table, "category", flat.n_all)
    if cat is not None and config.category_levels and len(cat):
        # a path's elements joined with a separator no key contains; paths that join alike group together
        joined = pc.dictionary_encode(pc.binary_join(pc.fill_null(cat, pa.scalar([], cat.type)), LEVEL_SEP + "\x1e"))
        _, first, counts = np.unique(joined.indices.to_numpy(zero_copy_only=False), return_index=True, return_counts=True)
        paths = cat.take(pa.array(first)).to_pylist()  # one event's path per distinct path
        for keys, c in zip(_category_keys(paths, config.category_levels), counts.tolist()):
            for k, key in enumerate(keys):
                if key is not None:
                    levels[k][key] += c
    years: list[int] = []
    if "year" in config.time_fields and n:
        us = _event_us(_flat_values(table, "ts", flat.n_all))
        years = np.unique(us.astype("datetime64[us]").astype("datetime64[Y]").astype(np.int64) + 1970).tolist()

    def order(counter: Counter, min_count: int = 1) -> tuple:
        items = [(k, c) for k, c in counter.items() if k is not None and c >= min_count]
        return tuple(k for k, _ in sorted(items, key=lambda kc: (-kc[1], kc[0])))

    return Vocabs(
        config=config,
        services=order(services),
        categories=tuple(order(c, config.min_count) for c in levels),
        years=tuple(int(y) for y in years),
    )


# --------------------------------------------------------------------------------------------------
# The batch function
# --------------------------------------------------------------------------------------------------


def make_batch(
    rows: pa.Table | Mapping[str, Any],
    vocabs: Vocabs,
    tokenizer=None,
    *,
    max_events: int | None = None,
) -> dict[str, np.ndarray]:
    """Sequence rows -> dict of padded numpy arrays (see the module docstring for keys and shapes).

    Pure and picklable-argument-only, so it runs inside Ray Data ``map_batches`` (pass ``vocabs`` and
    ``tokenizer`` through ``fn_kwargs``). Rows keep their order: row i of the input is user i.

    Args:
        rows: SEQUENCE_SCHEMA rows (at least ``ts``; other list columns optional).
        vocabs: fitted vocabularies; their config says which features to build.
        tokenizer: a :class:`userfm.models.tokenizer.TextTokenizer`; adds ``tokens`` when given.
        max_events: overrides ``vocabs.config.max_events``.
    """
    cfg = vocabs.config
    table = _as_table(rows)
    flat = _flatten(table, max_events or cfg.max_events)
    b, n_ev = flat.n_users, len(flat.take)
    width = int(flat.length.max()) if b else 0
    idx = pa.array(flat.take, pa.int64())

    def column(name):
        values = _flat_values(table, name, flat.n_all)
        return None if values is None else values.take(idx)

    def scatter(values: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full((b, width, *values.shape[1:]), fill, dtype=dtype)
        out[flat.user, flat.pos] = values
        return out

    us = _event_us(column("ts")) if n_ev else np.zeros(0, np.int64)
    batch: dict[str, np.ndarray] = {"length": flat.length.astype(np.int64), "ts": scatter(us, 0, np.int64)}

    svc = column("service")
    svc_ids = np.full(n_ev, UNK_ID, dtype=np.int64)
    if svc is not None:
        svc_ids = np.array([vocabs._service_index.get(s, UNK_ID) for s in svc.to_pylist()], dtype=np.int64)
    batch["service"] = scatter(svc_ids, PAD_ID, np.int64)

    levels = cfg.category_levels
    cat_ids = np.zeros((n_ev, levels), dtype=np.int64)
    cat = column("category")
    if cat is not None and levels:
        for e, keys in enumerate(_category_keys(cat.to_pylist(), levels)):
            for k, key in enumerate(keys):
                if key is not None:
                    cat_ids[e, k] = vocabs._category_index[k].get(key, UNK_ID)
    batch["category"] = scatter(cat_ids, PAD_ID, np.int64)

    # Time fields, id = N_SPECIAL + value; years outside the fitted ones -> UNK.
    last_us = np.zeros(b, np.int64)
    if n_ev:
        ends = np.cumsum(flat.length) - 1
        last_us[flat.length > 0] = us[ends[flat.length > 0]]
    raw = _time_values(us, last_us[flat.user], cfg.time_fields, cfg.recency_buckets)
    time_ids = np.zeros((n_ev, len(cfg.time_fields)), dtype=np.int64)
    for j, f in enumerate(cfg.time_fields):
        if f == "year":
            lo, lut = vocabs._year_lookup
            off = raw[f] - lo
            ok = (off >= 0) & (off < len(lut))
            time_ids[:, j] = UNK_ID
            time_ids[ok, j] = lut[off[ok]]
        else:
            time_ids[:, j] = N_SPECIAL + raw[f]
    batch["time"] = scatter(time_ids, PAD_ID, np.int64)

    text = column("text")
    text = _strings(text) if text is not None else pa.array([""] * n_ev, pa.string())
    batch["text_hash"] = scatter(hash_strings(text), 0, np.int64)
    ids = column("item_id")
    batch["item_hash"] = scatter(item_hash(ids if ids is not None else pa.nulls(n_ev, pa.string()), text), 0, np.int64)
    batch["masked"] = np.zeros((b, width), dtype=bool)
    if tokenizer is not None:
        toks = tokenizer.encode_batch(text.to_pylist(), cfg.max_text_tokens)
        batch["tokens"] = scatter(toks, 0, np.int64)
    return batch


def event_mask(batch: Mapping[str, Any]):
    """(B, L) True where a real event sits (from ``length``); works for numpy arrays and tensors."""
    length = batch["length"]
    width = batch["service"].shape[1]
    if isinstance(length, np.ndarray):
        return np.arange(width)[None, :] < length[:, None]
    import torch

    return torch.arange(width, device=length.device)[None, :] < length[:, None]


def to_torch(batch: Mapping[str, Any], device: str = "cpu") -> dict:
    """numpy batch -> dict of tensors (int64/bool/float32 kept)."""
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def pad_events(batch: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Pad the event axis (axis 1) of every (B, L, ...) array to ``width`` with zeros (= padding ids);
    per-user arrays (B,) such as ``length`` are left as they are."""
    out = {}
    for k, v in batch.items():
        if v.ndim >= 2 and v.shape[1] < width:
            v = np.pad(v, [(0, 0), (0, width - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
        out[k] = v
    return out


def concat_batches(batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack batches along users, padding the event axis to the widest."""
    width = max(b["service"].shape[1] for b in batches)
    padded = [pad_events(b, width) for b in batches]
    return {k: np.concatenate([b[k] for b in padded]) for k in batches[0]}


def _view_prefixes(batch: Mapping[str, Any]) -> list[str]:
    """"" for a plain batch; "a.", "b." for a two-view batch (simclr views, clue pairs)."""
    return [k[: -len("length")] for k in batch if k.endswith("length")]


def trim_events(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut the event axis of each view to its longest real history (at least 1 event).

    Ray Data stores fixed-width rows (``pad_events`` to ``max_events``); a step only needs the width of
    its longest user. Padding is masked out in every model, so outputs are unchanged; the work saved
    is the user transformer's, which is quadratic in the width.
    """
    out = dict(batch)
    for p in _view_prefixes(batch):
        width = max(1, int(np.max(batch[p + "length"], initial=0)))
        for k, v in batch.items():
            if k.startswith(p) and k != p + "length" and (p or "." not in k) and v.ndim >= 2:
                out[k] = v[:, :width]
    return out


def batch_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B,) the longest view of each row: what a step pads to."""
    return np.max(np.stack([batch[p + "length"] for p in _view_prefixes(batch)]), axis=0)


def bucket_by_length(batches, group: int, seed: int):
    """Regroup a stream of equal-size batches so rows of similar length share a batch.

    Takes ``group`` batches at a time, sorts their rows by :func:`batch_lengths` (random tie-breaks),
    cuts them back into ``group`` batches of the same size and yields those in a random order. The
    number and size of batches are unchanged and the result depends only on the input stream and
    ``seed``, so a resumed run that skips k batches replays the same ones. ``group`` <= 1 passes through.
    """
    if group <= 1:
        yield from batches
        return
    rng = np.random.default_rng(seed)
    buf: list[Mapping[str, np.ndarray]] = []

    def flush():
        size = len(buf[0][next(iter(buf[0]))])
        rows = {k: np.concatenate([b[k] for b in buf]) for k in buf[0]}  # fixed-width rows
        lengths = batch_lengths(rows)
        order = np.lexsort((rng.random(len(lengths)), lengths))
        chunks = [order[i * size:(i + 1) * size] for i in range(len(buf))]
        for j in rng.permutation(len(chunks)):
            yield {k: v[chunks[j]] for k, v in rows.items()}

    for b in batches:
        buf.append(b)
        if len(buf) == group:
            yield from flush()
            buf = []
    if buf:
        yield from flush()
