"""Row-level validation of raw event batches into the canonical schema (pure Arrow, no Ray).

``validate_batch`` takes whatever a reader produced (typed Parquet columns, all-string CSV columns,
parsed JSON lines) and splits it into canonical kept rows and quarantined rows, each quarantined row
carrying exactly one reason (the first check it fails, in ``REASONS`` order), a detail that names the
field and the bad value, and the raw row as JSON. ``len(kept) + len(quarantined) == len(raw)``
always: nothing is dropped here. Duplicate events are found later, per user, in ``sequences``.

The fast path is vectorized; only rows that fail a vectorized parse are re-parsed one by one, so a
clean batch never touches Python per row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.data.schema import CATEGORY_TYPE, EVENT_SCHEMA, QUARANTINE_SCHEMA, TS_TYPE

# Quarantine reasons, in the order checks run (a row gets the first one it fails).
REASONS = (
    "malformed_row",  # the reader could not make a record of it (bad JSON, not an object)
    "missing_field",  # a required field (user_id, ts, service, text) is absent or null/empty
    "bad_type",  # a field is present but cannot be parsed as its type
    "empty_text",  # text is empty or whitespace only
    "text_too_long",  # text longer than max_text_chars and long_text == "reject"
    "ts_out_of_range",  # ts outside [ts_min, ts_max)
    "unknown_service",  # service not in the configured list
    "duplicate_event",  # an identical event (all fields) was already kept for this user
)

SOURCE_COLUMN = "path"  # the column Ray Data's include_paths=True adds

_TS_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 1e-3}
_EPOCH_TEXT = re.compile(r"-?[0-9]+(\.[0-9]*)?")


@dataclass(frozen=True)
class Rules:
    """The validation part of an ingest config (see ``ingest.IngestConfig`` for the meaning of each)."""

    ts_min: str = "1980-01-01"
    ts_max: str = "2100-01-01"
    numeric_ts_unit: str = "s"
    max_text_chars: int = 512
    long_text: str = "truncate"
    services: tuple[str, ...] | None = None
    category_sep: str = " > "

    def __post_init__(self):
        if self.long_text not in ("truncate", "reject"):
            raise ValueError(f"long_text must be 'truncate' or 'reject', got {self.long_text!r}")
        if self.numeric_ts_unit not in _TS_UNITS:
            raise ValueError(f"numeric_ts_unit must be one of {sorted(_TS_UNITS)}, got {self.numeric_ts_unit!r}")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        lo, hi = parse_ts_bound(self.ts_min, "ts_min"), parse_ts_bound(self.ts_max, "ts_max")
        if lo >= hi:
            raise ValueError(f"ts_min ({self.ts_min}) must be before ts_max ({self.ts_max})")


def parse_ts_bound(text: str, name: str) -> datetime:
    try:
        dt = datetime.fromisoformat(str(text))
    except ValueError:
        raise ValueError(f"{name}: not an ISO date/time: {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


@dataclass
class BatchResult:
    kept: pa.Table  # canonical EVENT_SCHEMA
    quarantined: pa.Table  # QUARANTINE_SCHEMA
    truncated: int  # kept rows whose text was cut to max_text_chars

    def reason_counts(self) -> dict[str, int]:
        if self.quarantined.num_rows == 0:
            return {}
        vc = pc.value_counts(self.quarantined.column("reason")).to_pylist()
        return {d["values"]: int(d["counts"]) for d in vc}


class _Verdicts:
    """First-failure bookkeeping: one reason and one detail per row."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)

    def open(self) -> np.ndarray:
        return np.equal(self.reason, None)

    def flag(self, mask: np.ndarray, reason: str, detail_fn) -> None:
        rows = np.flatnonzero(mask & self.open())
        for i in rows:
            self.reason[i] = reason
            self.detail[i] = detail_fn(int(i))


def _mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean Arrow array -> numpy bool, nulls as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _column(table: pa.Table, name: str) -> pa.Array:
    if name in table.column_names:
        return table.column(name).combine_chunks()
    return pa.nulls(table.num_rows)


def _clean_string(arr: pa.Array) -> pa.Array:
    """Any scalar column -> trimmed strings, empty -> null."""
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_floating(arr.type):
        # 17850.0 from a float column is the id "17850", not "17850.0"
        as_int = pc.cast(arr, pa.int64(), safe=False)
        integral = pc.equal(pc.cast(as_int, arr.type), arr)
        arr = pc.if_else(integral, pc.cast(as_int, pa.string()), pc.cast(arr, pa.string()))
    elif not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    arr = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _parse_ts_scalar(v: Any, unit_us: float) -> int | None:
    """One raw timestamp -> microseconds since epoch (UTC), or None if it cannot be parsed."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return int((v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp() * 1_000_000)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None if not math.isfinite(v) else int(v * unit_us)
    s = str(v).strip()
    if _EPOCH_TEXT.fullmatch(s):  # an epoch number written as text (ASCII digits only: '²'.isdigit())
        return int(float(s) * unit_us)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp() * 1_000_000)


def _parse_ts(arr: pa.Array, unit: str) -> tuple[pa.Array, np.ndarray]:
    """Raw ts column -> (timestamp[us, UTC] with nulls where unparseable, bad mask of non-null inputs)."""
    n = len(arr)
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    t = arr.type
    if pa.types.is_timestamp(t):
        out = arr.cast(pa.timestamp("us", tz=t.tz)) if t.tz else pc.assume_timezone(arr.cast(pa.timestamp("us")), "UTC")
        return out.cast(TS_TYPE), np.zeros(n, dtype=bool)
    if pa.types.is_date(t):
        return pc.assume_timezone(arr.cast(pa.timestamp("us")), "UTC").cast(TS_TYPE), np.zeros(n, dtype=bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        vals = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        us = vals * _TS_UNITS[unit]
        bad = present & ~np.isfinite(us)
        us = np.where(np.isfinite(us), us, 0).astype(np.int64)
        out = pa.array(us, pa.int64(), mask=~present | bad).cast(TS_TYPE)
        return out, bad
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
        for target in (TS_TYPE, pa.timestamp("us")):  # "...Z"/"+02:00" strings, then naive ones
            try:
                out = pc.cast(s, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            if target.tz is None:
                out = pc.assume_timezone(out, "UTC")
            return out.cast(TS_TYPE), np.zeros(n, dtype=bool)
    # Slow path: a mixed or messy column. Parse row by row, flag what fails.
    unit_us = _TS_UNITS[unit]
    parsed = [_parse_ts_scalar(v, unit_us) for v in arr.to_pylist()]
    bad = np.array([p is None for p in parsed], dtype=bool) & present
    return pa.array(parsed, pa.int64()).cast(TS_TYPE), bad


def _parse_value(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Raw value column -> (float64, bad mask)."""
    n = len(arr)
    if pa.types.is_null(arr.type):
        return pa.nulls(n, pa.float64()), np.zeros(n, dtype=bool)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
        return arr.cast(pa.float64()), np.zeros(n, dtype=bool)
    s = _clean_string(arr) if not pa.types.is_boolean(arr.type) else arr
    try:
        return pc.cast(s, pa.float64()), np.zeros(n, dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out, bad = [], np.zeros(n, dtype=bool)
    for i, v in enumerate(s.to_pylist()):
        try:
            out.append(None if v is None else float(v))
        except (TypeError, ValueError):
            out.append(None)
            bad[i] = True
    return pa.array(out, pa.float64()), bad


def _parse_category(arr: pa.Array, sep: str) -> tuple[pa.Array, np.ndarray]:
    """Raw category column (list or "A > B > C" string or JSON list string) -> list<string>, bad mask."""
    n = len(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(n, CATEGORY_TYPE), np.zeros(n, dtype=bool)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type) or pa.types.is_null(t.value_type)
    ):
        out = arr.cast(CATEGORY_TYPE)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
        s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
        json_like = _mask(pc.starts_with(s, "["))
        if json_like.any():
            vals, bad = [], np.zeros(n, dtype=bool)
            for i, v in enumerate(s.to_pylist()):
                if v is not None and json_like[i]:
                    try:
                        parsed = json.loads(v)
                        if not isinstance(parsed, list):
                            raise ValueError
                        vals.append([str(x) for x in parsed])
                    except ValueError:
                        vals.append(None)
                        bad[i] = True
                else:
                    vals.append(None if v is None else v.split(sep))
            out = pa.array(vals, CATEGORY_TYPE)
        else:
            out, bad = pc.split_pattern(s, sep), np.zeros(n, dtype=bool)
        return _tidy_category(out), bad
    else:
        vals, bad = [], np.zeros(n, dtype=bool)
        for i, v in enumerate(arr.to_pylist()):
            if v is None or (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v)):
                vals.append(None if v is None else [str(x) for x in v])
            else:
                vals.append(None)
                bad[i] = True
        out = pa.array(vals, CATEGORY_TYPE)
        return _tidy_category(out), bad
    return _tidy_category(out), np.zeros(n, dtype=bool)


def _tidy_category(arr: pa.Array) -> pa.Array:
    """Trim path elements, drop empty ones, empty path -> null."""
    arr = arr.cast(CATEGORY_TYPE)
    if len(arr) == 0:
        return arr
    flat = pc.utf8_trim_whitespace(pc.list_flatten(arr))
    parents = pc.list_parent_indices(arr)
    keep = pc.and_(pc.is_valid(flat), pc.not_equal(flat, ""))
    flat, parents = flat.filter(keep), parents.filter(keep)
    counts = np.bincount(parents.to_numpy(zero_copy_only=False), minlength=len(arr))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    empty = counts == 0
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(empty), type=CATEGORY_TYPE)


def _raw_json(table: pa.Table, rows: np.ndarray) -> list[str]:
    if len(rows) == 0:
        return []
    sub = table.take(pa.array(rows, pa.int64()))
    cols = [c for c in sub.column_names if c not in (SOURCE_COLUMN, "_malformed", "_line")]
    records = sub.select(cols).to_pylist()
    lines = sub.column("_line").to_pylist() if "_line" in sub.column_names else [None] * len(records)
    # a malformed record is kept as the exact line that was read, anything else as its parsed fields
    return [line if line is not None else json.dumps(r, default=str, ensure_ascii=False) for r, line in zip(records, lines)]


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def validate_batch(raw: pa.Table, rules: Rules, *, source: str | None = None) -> BatchResult:
    """Split a raw batch into canonical kept rows and quarantined rows.

    Args:
        raw: (n rows) any columns; the canonical ones are looked up by name. A ``path`` column (Ray
            Data's ``include_paths``) names each row's source file; else ``source`` is used.
        rules: validation rules.
        source: the file name for every row when ``raw`` has no ``path`` column.
    Returns:
        kept (EVENT_SCHEMA) + quarantined (QUARANTINE_SCHEMA), with ``len(kept) + len(quarantined) == n``.
    """
    n = raw.num_rows
    v = _Verdicts(n)
    if "_malformed" in raw.column_names:  # set by readers that could not parse a record at all
        malformed = _mask(raw.column("_malformed").combine_chunks())
        v.flag(malformed, "malformed_row", lambda i: "row could not be parsed as a record")
    raw_cols = {name: _column(raw, name) for name in EVENT_SCHEMA.names}

    user_id = _clean_string(raw_cols["user_id"])
    service = _clean_string(raw_cols["service"])
    text_in = raw_cols["text"]
    text = pc.cast(text_in.dictionary_decode() if pa.types.is_dictionary(text_in.type) else text_in, pa.string())
    for name, arr in (("user_id", user_id), ("service", service), ("text", text), ("ts", raw_cols["ts"])):
        missing = _mask(arr.is_null())
        if name not in raw.column_names:
            v.flag(missing, "missing_field", lambda i, name=name: f"{name}: column is missing from the input")
        else:
            v.flag(missing, "missing_field", lambda i, name=name: f"{name}: required field is null or empty")

    ts, ts_bad = _parse_ts(raw_cols["ts"], rules.numeric_ts_unit)
    raw_ts = raw_cols["ts"]
    v.flag(ts_bad, "bad_type", lambda i: f"ts: cannot parse {_show(raw_ts[i].as_py())} as a timestamp")
    value, value_bad = _parse_value(raw_cols["value"])
    raw_value = raw_cols["value"]
    v.flag(value_bad, "bad_type", lambda i: f"value: cannot parse {_show(raw_value[i].as_py())} as a number")
    category, cat_bad = _parse_category(raw_cols["category"], rules.category_sep)
    raw_cat = raw_cols["category"]
    v.flag(cat_bad, "bad_type", lambda i: f"category: cannot parse {_show(raw_cat[i].as_py())} as a path")
    item_id = _clean_string(raw_cols["item_id"])

    stripped = pc.utf8_trim_whitespace(text)
    v.flag(_mask(pc.equal(stripped, "")), "empty_text", lambda i: "text: empty or whitespace only")
    lengths = pc.utf8_length(stripped)
    too_long = _mask(pc.greater(lengths, rules.max_text_chars))
    truncated = 0
    if rules.long_text == "reject":
        v.flag(too_long, "text_too_long", lambda i: f"text: {lengths[i].as_py()} chars > max_text_chars={rules.max_text_chars}")
    else:
        truncated = int((too_long & v.open()).sum())
        if too_long.any():
            stripped = pc.utf8_slice_codeunits(stripped, 0, rules.max_text_chars)

    lo = pa.scalar(parse_ts_bound(rules.ts_min, "ts_min"), TS_TYPE)
    hi = pa.scalar(parse_ts_bound(rules.ts_max, "ts_max"), TS_TYPE)
    out_of_range = _mask(pc.or_(pc.less(ts, lo), pc.greater_equal(ts, hi)))
    v.flag(
        out_of_range,
        "ts_out_of_range",
        lambda i: f"ts: {ts[i].as_py().isoformat()} outside [{rules.ts_min}, {rules.ts_max})",
    )
    if rules.services is not None:
        unknown = ~_mask(pc.is_in(service, value_set=pa.array(list(rules.services), pa.string())))
        unknown &= ~_mask(service.is_null())
        v.flag(unknown, "unknown_service", lambda i: f"service: {service[i].as_py()!r} not in {list(rules.services)}")

    ok = v.open()
    keep_idx = pa.array(np.flatnonzero(ok), pa.int64())
    kept = pa.Table.from_arrays(
        [a.take(keep_idx) for a in (user_id, ts, service, stripped, item_id, category, value)],
        schema=EVENT_SCHEMA,
    )
    bad_rows = np.flatnonzero(~ok)
    if SOURCE_COLUMN in raw.column_names:
        sources = raw.column(SOURCE_COLUMN).take(pa.array(bad_rows, pa.int64())).to_pylist()
    else:
        sources = [source] * len(bad_rows)
    quarantined = pa.Table.from_arrays(
        [
            pa.array(sources, pa.string()),
            pa.array(v.reason[bad_rows].tolist(), pa.string()),
            pa.array(v.detail[bad_rows].tolist(), pa.string()),
            pa.array(_raw_json(raw, bad_rows), pa.string()),
        ],
        schema=QUARANTINE_SCHEMA,
    )
    assert kept.num_rows + quarantined.num_rows == n
    return BatchResult(kept=kept, quarantined=quarantined, truncated=truncated)


def parse_json_lines(lines: Sequence[str] | pa.Array) -> pa.Table:
    """JSON lines -> a raw table for ``validate_batch``; lines that are not JSON objects are kept as
    rows with ``_malformed = True`` and the line under ``_line``, so they reach the quarantine."""
    if isinstance(lines, (pa.Array, pa.ChunkedArray)):
        lines = lines.to_pylist()
    records, malformed, bad_lines = [], [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except (TypeError, ValueError):
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
            malformed.append(False)
            bad_lines.append(None)
        else:
            records.append({})
            malformed.append(True)
            bad_lines.append(line)
    cols: dict[str, list] = {}
    for name in EVENT_SCHEMA.names:
        cols[name] = [r.get(name) for r in records]
    arrays = {}
    for name, vals in cols.items():
        try:
            arrays[name] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # mixed types in one field (e.g. a number here, a string there): keep them as text,
            # validate_batch parses and flags per row
            arrays[name] = pa.array([None if x is None else (x if isinstance(x, str) else json.dumps(x)) for x in vals])
    arrays["_malformed"] = pa.array(malformed, pa.bool_())
    arrays["_line"] = pa.array(bad_lines, pa.string())
    return pa.table(arrays)
