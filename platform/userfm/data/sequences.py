"""Per-user, time-sorted sequences from canonical events (pure Arrow + numpy, no Ray).

The ingest pipeline hash-partitions events by user (``partition_of``) so that every event of a user
lands in one partition, then calls ``build_partition`` on each partition independently: sort once,
drop exact duplicates (quarantined, not lost), and cut list columns out of the sorted table with
offsets (zero-copy ``ListArray.from_arrays``). This is the "partition by hash, group inside each
block with Arrow" design from ray-notes.md: Ray Data's generic groupby is ~20x slower here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from userfm.data.schema import ALL_SCOPE, EVENT_SCHEMA, QUARANTINE_SCHEMA, SEQUENCE_SCHEMA, SPLITS

LIST_COLUMNS = ("ts", "service", "text", "item_id", "category", "value")


def partition_of(user_ids: pa.Array | pa.ChunkedArray, num_partitions: int) -> np.ndarray:
    """Partition index in [0, num_partitions) for each row, the same for a user on every worker.

    Hashes each distinct user once (pandas' SipHash with a fixed key: stable across processes and
    machines, unlike Python's ``hash``), then broadcasts through the dictionary indices.
    """
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    enc = pc.dictionary_encode(user_ids)
    uniq = enc.dictionary.to_numpy(zero_copy_only=False).astype(object)
    h = pd.util.hash_array(uniq, categorize=False) % np.uint64(num_partitions)
    return h.astype(np.int32)[enc.indices.to_numpy(zero_copy_only=False)]


def split_fraction(user_id: str) -> float:
    """Position of a user in [0, 1): first 8 bytes of BLAKE2b(user_id as UTF-8), big-endian / 2**64.

    Documented and library-independent, so any tool can reproduce the split.
    """
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(user_ids: list[str] | pa.Array, fractions: tuple[float, float, float]) -> list[str]:
    """train / val / test for each user id by ``split_fraction`` against cumulative ``fractions``."""
    if isinstance(user_ids, (pa.Array, pa.ChunkedArray)):
        user_ids = user_ids.to_pylist()
    check_fractions(fractions)
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    out = []
    for uid in user_ids:
        f = split_fraction(uid)
        out.append(SPLITS[0] if f < cut_train else SPLITS[1] if f < cut_val else SPLITS[2])
    return out


def check_fractions(fractions) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")


def _ranks(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Dense lexicographic rank of each value (int64), so numpy can sort strings as integers."""
    enc = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    dict_rank = pc.rank(enc.dictionary, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return dict_rank[idx] if len(idx) else np.zeros(0, dtype=np.int64)


def _event_order(events: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row order by (user_id, ts, service, text, item_id, value, category), nulls last; and a mask,
    in that sorted order, of rows whose (user_id, ts) is shared with a neighbour.

    Sorting 7 keys of strings is the slow part of ingest, and ties on (user_id, ts) are rare (same
    second): sort by two integer keys, then fully sort only inside the tie groups. Same result as
    the full sort, at a fraction of the cost.
    """
    n = events.num_rows
    users = _ranks(events.column("user_id"))
    ts = events.column("ts").combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False)
    order = np.lexsort((ts, users))
    su, st = users[order], ts[order]
    same = np.zeros(n, dtype=bool)
    if n > 1:
        eq = (su[1:] == su[:-1]) & (st[1:] == st[:-1])
        same[1:] |= eq
        same[:-1] |= eq
    if same.any():
        pos = np.flatnonzero(same)  # contiguous tie groups, already in (user, ts) order
        rows = order[pos]
        sub = events.take(pa.array(rows))
        sub = sub.append_column("_cat", pc.binary_join(sub.column("category"), "\x1f"))
        keys = ("user_id", "ts", "service", "text", "item_id", "value", "_cat")
        sub_order = pc.sort_indices(sub, sort_keys=[(k, "ascending") for k in keys]).to_numpy()
        order[pos] = rows[sub_order]  # (user, ts) is the primary key, so groups keep their places
    return order, same


@dataclass
class PartitionResult:
    events: pa.Table  # clean events, EVENT_SCHEMA, sorted by user_id, ts
    duplicates: pa.Table  # QUARANTINE_SCHEMA rows for exact duplicates
    sequences: pa.Table  # SEQUENCE_SCHEMA, scope "all", one row per user
    service_sequences: pa.Table  # SEQUENCE_SCHEMA, one row per (user, service)
    stats: dict = field(default_factory=dict)


def _group_offsets(keys: list[pa.Array], n: int) -> np.ndarray:
    """Start offsets of runs of equal key tuples in sorted rows, plus n at the end."""
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for k in keys:
        change |= np.asarray(pc.fill_null(pc.not_equal(k[1:], k[:-1]), True).to_numpy(zero_copy_only=False), bool)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)


def _same_as_previous(cols: list[pa.Array], n: int) -> np.ndarray:
    """Row i equals row i-1 on every column, nulls equal to nulls (row 0: False)."""
    same = np.ones(max(n - 1, 0), dtype=bool)
    for c in cols:
        a, b = c[1:], c[:-1]
        eq = pc.fill_null(pc.equal(a, b), False)
        both_null = pc.and_(a.is_null(), b.is_null())
        same &= np.asarray(pc.or_(eq, both_null).to_numpy(zero_copy_only=False), bool)
    return np.concatenate([[False], same]) if n else np.zeros(0, dtype=bool)


def _sequences(table: pa.Table, offsets: np.ndarray, max_events: int, splits: dict[str, str], scope: pa.Array | None) -> pa.Table:
    """One sequence row per group [offsets[g], offsets[g+1]) of a sorted table, keeping the last
    ``max_events`` rows of each group."""
    n_groups = len(offsets) - 1
    sizes = np.diff(offsets)
    starts = offsets[:-1]
    # keep rows whose distance to the group end is <= max_events (the most recent ones)
    ends = np.repeat(offsets[1:], sizes)
    keep = (ends - np.arange(table.num_rows)) <= max_events
    kept = table.filter(pa.array(keep)) if not keep.all() else table
    new_sizes = np.minimum(sizes, max_events)
    list_offsets = pa.array(np.concatenate([[0], np.cumsum(new_sizes)]).astype(np.int32))
    users = table.column("user_id").take(pa.array(starts))
    cols = {
        "user_id": users,
        "split": pa.array([splits[u] for u in users.to_pylist()], pa.string()),
        "scope": scope if scope is not None else pa.array([ALL_SCOPE] * n_groups, pa.string()),
        "n_events": pa.array(sizes, pa.int64()),
    }
    for name in LIST_COLUMNS:
        values = kept.column(name).combine_chunks()
        cols[name] = pa.ListArray.from_arrays(list_offsets, values)
    return pa.Table.from_pydict(cols, schema=SEQUENCE_SCHEMA)


def build_partition(
    events: pa.Table, *, max_events: int, fractions: tuple[float, float, float], source: str = ""
) -> PartitionResult:
    """Dedupe, sort and group one partition's events (all events of each of its users).

    Args:
        events: (n) EVENT_SCHEMA rows; must hold every event of each user in it.
        max_events: keep the most recent ``max_events`` events per sequence.
        fractions: train/val/test fractions for ``assign_split``.
        source: label for quarantined duplicate rows.
    """
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    events = events.select(list(EVENT_SCHEMA.names)).cast(EVENT_SCHEMA)
    n = events.num_rows
    order, tied = _event_order(events)
    t = events.take(pa.array(order))
    # Exact duplicates share (user, ts), so they only occur inside tie groups: compare those rows.
    dup = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(tied)
    if len(idx):
        sub = t.take(pa.array(idx))
        cols = [sub.column(c).combine_chunks() for c in ("user_id", "ts", "service", "text", "item_id", "value")]
        cols.append(pc.binary_join(sub.column("category"), "\x1f").combine_chunks())
        dup[idx] = _same_as_previous(cols, len(idx))  # tie groups are contiguous runs in t
    dups = t.filter(pa.array(dup))
    clean = t.filter(pa.array(~dup)) if dup.any() else t

    dup_records = dups.to_pylist()
    duplicates = pa.Table.from_pydict(
        {
            "source": [source] * len(dup_records),
            "reason": ["duplicate_event"] * len(dup_records),
            "detail": [f"duplicate of an earlier identical event of user {r['user_id']!r}" for r in dup_records],
            "raw": [json.dumps(r, default=str, ensure_ascii=False) for r in dup_records],
        },
        schema=QUARANTINE_SCHEMA,
    )

    m = clean.num_rows
    user_col = clean.column("user_id").combine_chunks()
    offsets = _group_offsets([user_col], m)
    users = user_col.take(pa.array(offsets[:-1])).to_pylist() if m else []
    split_list = assign_split(users, fractions)
    splits = dict(zip(users, split_list))
    seq_all = _sequences(clean, offsets, max_events, splits, None)

    # per-service: the same rows ordered by (user, service, ts); stable, so ties keep the order above
    svc_order = np.lexsort((_ranks(clean.column("service")), _ranks(user_col)))
    by_svc = clean.take(pa.array(svc_order))
    svc_col = by_svc.column("service").combine_chunks()
    svc_offsets = _group_offsets([by_svc.column("user_id").combine_chunks(), svc_col], m)
    scope = svc_col.take(pa.array(svc_offsets[:-1])) if m else pa.array([], pa.string())
    seq_svc = _sequences(by_svc, svc_offsets, max_events, splits, scope)

    sizes = np.diff(offsets)
    stats = {
        "rows_in": n,
        "events_kept": m,
        "duplicates": int(dup.sum()),
        "users": len(users),
        "users_by_split": {s: split_list.count(s) for s in SPLITS},
        "events_in_sequences": int(np.minimum(sizes, max_events).sum()),
        "events_beyond_max_events": int(np.maximum(sizes - max_events, 0).sum()),
        "user_service_sequences": seq_svc.num_rows,
        "events_by_service": {
            d["values"]: int(d["counts"]) for d in pc.value_counts(clean.column("service")).to_pylist()
        }
        if m
        else {},
    }
    return PartitionResult(clean, duplicates, seq_all, seq_svc, stats)


def _flatten_sequences(sequences: pa.Table) -> tuple[pa.Table, pa.Table, np.ndarray, np.ndarray]:
    """Sequence rows -> (rows cast to SEQUENCE_SCHEMA, one row per event with user_id + list columns,
    each event's row index, events per row)."""
    sequences = sequences.select(list(SEQUENCE_SCHEMA.names)).cast(SEQUENCE_SCHEMA)
    lengths = pc.list_value_length(sequences.column("ts")).to_numpy(zero_copy_only=False)
    lengths = np.nan_to_num(lengths.astype(float)).astype(np.int64)
    parents = np.repeat(np.arange(sequences.num_rows), lengths)
    cols = {"user_id": sequences.column("user_id").take(pa.array(parents))}
    for name in LIST_COLUMNS:
        cols[name] = pc.list_flatten(sequences.column(name))
    return sequences, pa.table(cols), parents, lengths


def service_rows(sequences: pa.Table) -> pa.Table:
    """Combined ("all") sequence rows -> one row per (user, service) with that service's events.

    Each output row keeps its events in the order they had in the combined row (time order), so a
    training batch can pair a user's services (CLUE) from one row per user, without needing every
    by_service row of that user to land in the same batch.
    """
    sequences, flat, parents, lengths = _flatten_sequences(sequences)
    order = np.lexsort((_ranks(flat.column("service")), parents))  # stable: time order kept
    flat = flat.take(pa.array(order))
    svc = flat.column("service").combine_chunks()
    offsets = _group_offsets([pa.array(parents[order]), svc], flat.num_rows)
    splits = dict(zip(sequences.column("user_id").to_pylist(), sequences.column("split").to_pylist()))
    scope = svc.take(pa.array(offsets[:-1])) if flat.num_rows else pa.array([], pa.string())
    return _sequences(flat, offsets, max(int(lengths.max(initial=1)), 1), splits, scope)


def keep_services(rows: pa.Table, services: tuple[str, ...] | list[str]) -> pa.Table:
    """Sequence rows with only the events whose ``service`` is one of ``services`` (per row, order kept).

    Every list column keeps the same entries (one per event); ``n_events`` becomes the count kept. Rows
    stay (a user with no event of those services keeps an empty history). Needs the ``service`` list column;
    any other columns may be missing.
    """
    if "service" not in rows.column_names:
        raise ValueError("keep_services needs the sequences' service column")
    svc = rows.column("service").combine_chunks()
    keep = pc.fill_null(pc.is_in(svc.flatten(), value_set=pa.array(list(services), pa.string())), False)
    keep = keep.to_numpy(zero_copy_only=False)
    off = svc.offsets.to_numpy().astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(keep)])
    kept = cum[off[1:] - off[0]] - cum[off[:-1] - off[0]]  # (n,) events kept per row
    new_off = pa.array(np.concatenate([[0], np.cumsum(kept)]).astype(np.int32))
    take = pa.array(np.flatnonzero(keep), pa.int64())
    cols = {}
    for name in rows.column_names:
        col = rows.column(name)
        if name == "n_events":
            col = pa.array(kept, col.type)
        elif pa.types.is_list(col.type):
            arr = col.combine_chunks()
            col = pa.ListArray.from_arrays(new_off, arr.flatten().take(take), type=arr.type,
                                           mask=arr.is_null() if arr.null_count else None)
        cols[name] = col
    return pa.table(cols, schema=rows.schema)


def restrict_services(sequences: pa.Table, services: tuple[str, ...] | list[str]) -> pa.Table:
    """Combined ("all") sequence rows -> the same rows holding only events of ``services``.

    Event order is kept; ``n_events`` becomes the kept count; users left with no event are dropped.
    This is how an encoder is pretrained on services A, B only, for cross-service transfer to C.
    """
    kept = keep_services(sequences, services)
    return kept.filter(pc.greater(kept.column("n_events"), 0))


def cut_lists(rows: pa.Table, cut, n_events) -> pa.Table:
    """Every list column of ``rows`` cut, per row, to its entries ``[start, end)``.

    ``cut(lengths) -> (starts, ends)`` maps a column's (n,) row lengths to (n,) int arrays with
    0 <= start <= end <= length; ``n_events(column) -> column`` rewrites that column if the table has it. Null
    lists stay null. Pure Arrow/numpy: one ``take`` per list column, no copy of the kept values beyond it.
    """
    cols = {}
    for name in rows.column_names:
        col = rows.column(name)
        if name == "n_events":
            col = n_events(col)
        elif pa.types.is_list(col.type):
            arr = col.combine_chunks()
            off = arr.offsets.to_numpy()
            starts, ends = cut(np.diff(off))
            keep = ends - starts
            new_off = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
            idx = np.repeat(off[:-1] + starts - new_off[:-1], keep) + np.arange(new_off[-1])
            col = pa.ListArray.from_arrays(pa.array(new_off), arr.values.take(pa.array(idx, pa.int64())), type=arr.type,
                                           mask=arr.is_null() if arr.null_count else None)
        cols[name] = col
    return pa.table(cols, schema=rows.schema)


def drop_last_events(rows: pa.Table, n: int) -> pa.Table:
    """Sequence rows without each user's last ``n`` events (lists are time-sorted, oldest first).

    Every list column loses its last ``n`` entries per row (fewer when the row is shorter); ``n_events``
    drops by the same amount, never below 0.
    """
    if n <= 0:
        return rows
    return cut_lists(rows, lambda lengths: (0, np.maximum(lengths - n, 0)),
                      n_events=lambda col: pc.max_element_wise(pc.subtract(col, n), 0))


def history_rows(rows: pa.Table, holdout: int = 0, service: str = "") -> pa.Table:
    """The history a model reads: each row without its last ``holdout`` events, then (``service`` set) only
    that service's events (:func:`drop_last_events`, :func:`keep_services`)."""
    rows = drop_last_events(rows, holdout)
    return keep_services(rows, (service,)) if service else rows


def window_bounds(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``width``-event window of histories of ``lengths`` (n,), newest first, consecutive windows sharing
    one event: ``[n - width, n)``, ``[n - 2 width + 1, n - width + 1)``, ... down to the oldest, so each event
    but a history's first is a next-event target in exactly one window, and a history of at most ``width``
    events is one window, itself.

    Returns (row, start, end), each (n_windows,): the history each window cuts, and its ``[start, end)``.
    """
    if width < 2:
        raise ValueError(f"windows need width >= 2 (an event and its next), got {width}")
    lengths = np.asarray(lengths, np.int64)
    count = 1 + np.maximum(0, -(-(lengths - width) // (width - 1)))  # 1 + ceil((n - width) / (width - 1)), n > width
    row = np.repeat(np.arange(len(lengths)), count)
    k = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)  # window index within its history
    end = lengths[row] - k * (width - 1)
    return row, np.maximum(end - width, 0), end


def history_windows(rows: pa.Table, width: int) -> pa.Table:
    """Sequence rows -> one row per ``width``-event window of each history (:func:`window_bounds` over the
    ``ts`` lists): every list column cut the same way, ``n_events`` the window's length, other columns
    repeated. Pretraining's event objectives read every event this way, not only each user's last ``width``."""
    lengths = pc.list_value_length(rows.column("ts")).fill_null(0).to_numpy(zero_copy_only=False)
    row, start, end = window_bounds(lengths, width)
    rows = rows.take(pa.array(row, pa.int64()))
    n = lengths[row]  # a null list column (length 0) stays empty
    return cut_lists(rows, lambda have: (np.where(have == n, start, 0), np.where(have == n, end, 0)),
                     n_events=lambda col: pa.array(end - start, pa.int64()))
