"""RecBole atomic files -> the canonical event table (``userfm convert recbole SRC OUT``).

Format: https://recbole.io/docs/user_guide/data/atomic_files.html. Every file is tab-separated with a
header of ``field:type`` (token, token_seq, float, float_seq; token_seq and float_seq values are
space-separated). Two layouts are read:

- **atomic**: ``NAME.inter`` (one interaction per row) plus optional ``NAME.item`` and ``NAME.user``.
  Each data row of ``NAME.inter`` becomes one event or one rejected row.
- **pre-split** (as UniSRec ships its benchmarks): ``NAME.train.inter``, ``NAME.valid.inter``,
  ``NAME.test.inter`` with ``user_id:token item_id_list:token_seq item_id:token``; each row is a history
  (oldest first) and the next item. Each user's full sequence is rebuilt from the rows and its items
  become the events (see ``_rebuild``).

Counting, pre-split: a row is not an event, so the manifest's ``rows_read`` counts *sequence items*
(the rebuilt events, plus items rejected for lacking a service) plus rejected rows. ``counts`` shows how
that follows from the files: ``file_rows = rows_as_target + rows_subsumed + rows_rejected`` (a row whose
target is the first word on its position, a consistent row repeating a known position, a rejected row),
and ``sequence_items = rows_as_target + events_from_history_only`` (items that are never a target, such
as each user's first item). Both identities are checked before anything is written.

Time: ``timestamp`` is unix seconds ("real") or, as in many research exports, each user's positions
0..n-1 ("ordinal"); with no timestamp the order is file order ("none"). For ordinal and none, ``ts`` is
2000-01-01T00:00:00Z plus the position in seconds, so order survives and the manifest's ``time`` says
that ts is not a time. Pre-split sequences are ordinal (their positions).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from userfm.data.convert_common import ConvertError, Converted, concat_rejected, rows_as_json
from userfm.data.schema import CATEGORY_TYPE, QUARANTINE_SCHEMA, TS_TYPE
from userfm.data.recbole_files import MAX_REAL_SECONDS, ORDER_EPOCH_MICROS, Options, SPLITS, TIME_MODES, TIME_NOTES, _Items, _Table, _read_items, _read_table, _read_users, _reject, _row_checks


# ---------------------------------------------------------------------------------------------------
# Entry point


def convert_recbole(src: Path, opts: Options) -> Converted:
    """Read the RecBole data set at SRC (a folder, or one of its files) into a ``Converted``."""
    if opts.time not in TIME_MODES:
        raise ConvertError(f"time must be one of {', '.join(TIME_MODES)}; got {opts.time!r}")
    if opts.service is not None and opts.service_field is not None:
        raise ConvertError("give either service (one name for every event) or service_field, not both")
    if opts.service is not None and not opts.service.strip():
        raise ConvertError(f"service must be a non-empty string, got {opts.service!r}")
    folder, name, layout = _find_dataset(src)
    service = opts.service.strip() if opts.service else name
    item_path, user_path = folder / f"{name}.item", folder / f"{name}.user"
    items = _read_items(item_path, opts) if item_path.is_file() else None
    if items is None and opts.service_field is not None:
        raise ConvertError(f"{item_path}: no such file; service_field {opts.service_field!r} is an .item field")
    if items is None and opts.category_field is not None:
        raise ConvertError(f"{item_path}: no such file; category_field {opts.category_field!r} is an .item field")
    attributes, user_counts, user_enc = _read_users(user_path) if user_path.is_file() else (None, {}, None)

    if layout == "atomic":
        res = _convert_atomic(folder / f"{name}.inter", items, service, opts)
    else:
        paths = {s: folder / f"{name}.{s}.inter" for s in SPLITS if (folder / f"{name}.{s}.inter").is_file()}
        res = _convert_presplit(paths, items, service, opts)

    res.details.update(
        layout=layout,
        dataset=name,
        item_fields=None if items is None else items.fields,
        text_fields=None if items is None else items.text_fields,
        category_field=None if items is None else items.category_field,
        service_field=opts.service_field,
        service=None if opts.service_field else service,
    )
    if items is not None:
        res.source_files.append(str(items.path))
        res.encodings[str(items.path)] = items.encoding
        res.counts["duplicate_item_rows"] = items.duplicate_rows
    if user_path.is_file():
        res.source_files.append(str(user_path))
        res.encodings[str(user_path)] = user_enc
        res.counts.update(user_counts)
        if attributes is not None:
            with_events = set(res.events.column("user_id").to_pylist())
            res.counts["attribute_users_without_events"] = int((~attributes["user_id"].isin(with_events)).sum())
    res.attributes = attributes
    return res


def _find_dataset(src: Path) -> tuple[Path, str, str]:
    """(folder, NAME, "atomic" | "pre-split") for SRC, a folder or one of its files."""
    folder = src if src.is_dir() else src.parent
    if src.is_file():
        fname = src.name
        for suffix in (".inter", ".item", ".user"):
            if fname.endswith(suffix) and len(fname) > len(suffix):
                stem = fname[: -len(suffix)]
                break
        else:
            raise ConvertError(f"{src}: not a RecBole atomic file (NAME.inter, NAME.item or NAME.user)")
        split = stem.rsplit(".", 1)
        if suffix == ".inter":
            if len(split) == 2 and split[1] in SPLITS:
                return folder, split[0], "pre-split"
            return folder, stem, "atomic"
        if (folder / f"{stem}.inter").is_file():
            return folder, stem, "atomic"
        if any((folder / f"{stem}.{s}.inter").is_file() for s in SPLITS):
            return folder, stem, "pre-split"
        raise ConvertError(f"{src}: no {stem}.inter (or {stem}.train/valid/test.inter) next to it")
    found = set()
    for p in folder.iterdir():
        if p.is_file() and p.name.endswith(".inter") and len(p.name) > len(".inter"):
            stem = p.name[: -len(".inter")]
            split = stem.rsplit(".", 1)
            found.add((split[0], "pre-split") if len(split) == 2 and split[1] in SPLITS else (stem, "atomic"))
    if not found:
        raise ConvertError(f"{folder}: no RecBole interaction file (NAME.inter, or NAME.train/valid/test.inter)")
    if len(found) > 1:
        listed = ", ".join(f"{n} ({lay})" for n, lay in sorted(found))
        raise ConvertError(f"{folder}: several RecBole data sets: {listed}; pass one of their .inter files")
    name, layout = found.pop()
    return folder, name, layout


# ---------------------------------------------------------------------------------------------------
# Events from (user, item, ts) rows: text, service, category from the item table


def _item_columns(item: np.ndarray, items: _Items | None, service: str, opts: Options) -> dict:
    """Per event: text, service ("" = missing), category, and whether the item was in .item / had text."""
    n = len(item)
    idx = items.ids.get_indexer(item) if items is not None else np.full(n, -1)
    known = idx >= 0
    text = np.full(n, "", dtype=object)
    if items is not None:
        text[known] = items.text[idx[known]]
    no_text = text == ""
    text[no_text] = ["item " + i for i in item[no_text]]
    if opts.service_field is not None:
        svc = np.full(n, "", dtype=object)
        svc[known] = items.service[idx[known]]
    else:
        svc = np.full(n, service, dtype=object)
    if items is not None and items.category is not None:
        category = items.category.take(pa.array(idx, mask=~known))
    else:
        category = pa.nulls(n, CATEGORY_TYPE)
    return {"text": text, "service": svc, "category": category, "known": known, "no_text": no_text}


def _events_table(user, micros, item, cols, value=None) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(user, pa.string()),
            "ts": pa.array(micros, pa.int64()).cast(TS_TYPE),
            "service": pa.array(cols["service"], pa.string()),
            "text": pa.array(cols["text"], pa.string()),
            "item_id": pa.array(item, pa.string()),
            "category": cols["category"],
            "value": pa.nulls(len(user), pa.float64()) if value is None else pa.array(value, from_pandas=True),
        }
    )


def _item_counts(item: np.ndarray, cols: dict, keep: np.ndarray, items: _Items | None) -> dict[str, int]:
    counts = {
        "events_without_text": int(cols["no_text"][keep].sum()),
        "items_without_text": int(pd.unique(item[keep & cols["no_text"]]).size),
    }
    if items is not None:
        counts["events_with_unknown_item"] = int((~cols["known"][keep]).sum())
    return counts


def _missing_service_detail(rejected: pd.DataFrame, items: _Items | None, opts: Options) -> None:
    where = f"in {items.path.name}" if items is not None else "(no .item file)"
    suffix = f" has no {opts.service_field!r} value {where}"
    rejected["detail"] = [d + suffix if r == "missing_service" else d
                          for r, d in zip(rejected["reason"], rejected["detail"])]


# ---------------------------------------------------------------------------------------------------
# Atomic layout


def _looks_ordinal(user: np.ndarray, secs: np.ndarray) -> bool:
    """True when every value is an integer and each user's values are exactly 0..n-1, in any order."""
    if not len(secs) or not (secs == np.floor(secs)).all():
        return False
    g = pd.Series(secs).groupby(user).agg(["min", "max", "nunique", "size"])
    return bool(((g["min"] == 0) & (g["max"] == g["size"] - 1) & (g["nunique"] == g["size"])).all())


def _convert_atomic(path: Path, items: _Items | None, service: str, opts: Options) -> Converted:
    table = _read_table(path, ("user_id", "item_id"))
    frame, types = table.frame, table.types
    for f in ("timestamp", "rating"):
        if f in types and types[f] != "float":
            raise ConvertError(f"{path}: line 1: field {f!r} is {types[f]}; expected float")
    user = frame["user_id"].to_numpy(dtype=object)
    item = frame["item_id"].to_numpy(dtype=object)
    checks = _row_checks(table, ("user_id", "item_id"))

    # Time. A row's position counts every row of its user that has a usable user id and time, so one
    # rejected row (a missing item id, say) leaves a gap, not a shifted order or a failed detection.
    has_user = user != ""
    if "timestamp" not in types:
        if opts.time != "auto":
            raise ConvertError(f"{path}: line 1: no 'timestamp' field, so time {opts.time!r} cannot apply "
                               "(the order is the file order: use auto)")
        mode = "none"
        pos = np.zeros(len(frame), dtype=np.int64)
        pos[has_user] = pd.Series(user[has_user]).groupby(user[has_user]).cumcount().to_numpy()
        micros = ORDER_EPOCH_MICROS + pos * 1_000_000
    else:
        raw_ts = frame["timestamp"]
        secs = pd.to_numeric(raw_ts, errors="coerce").astype(np.float64).to_numpy()
        usable = has_user & np.isfinite(secs)
        checks.append(("missing_timestamp", raw_ts == "", "timestamp", raw_ts))
        if opts.time == "auto":
            mode = "ordinal" if _looks_ordinal(user[usable], secs[usable]) else "real"
        else:
            mode = opts.time
        micros = np.zeros(len(frame), dtype=np.int64)
        if mode == "real":
            checks.append(("bad_timestamp", pd.Series(usable & (np.abs(secs) > MAX_REAL_SECONDS)), "timestamp", raw_ts))
            ok = usable & (np.abs(secs) <= MAX_REAL_SECONDS)
            micros[ok] = np.round(secs[ok] * 1e6).astype(np.int64)
        else:
            # rank within the user, ties in file order; for values that are already 0..n-1 it is the value
            ranks = pd.Series(secs[usable]).groupby(user[usable]).rank(method="first").to_numpy() - 1
            micros[usable] = ORDER_EPOCH_MICROS + ranks.astype(np.int64) * 1_000_000

    cols = _item_columns(item, items, service, opts)
    if opts.service_field is not None:
        checks.append(("missing_service", pd.Series(cols["service"] == ""), "item_id", frame["item_id"]))
    keep, rejected = _reject(table, checks)
    _missing_service_detail(rejected, items, opts)

    value = None
    if "rating" in types:
        value = pd.to_numeric(frame["rating"], errors="coerce").astype(np.float64).to_numpy()[keep]
    kept_cols = {k: (v.filter(pa.array(keep)) if isinstance(v, pa.Array) else v[keep]) for k, v in cols.items()}
    events = _events_table(user[keep], micros[keep], item[keep], kept_cols, value)

    counts = {"blank_lines": table.blank_lines}
    counts.update(_item_counts(item, cols, keep, items))
    kept = pd.DataFrame({"u": user[keep], "i": item[keep], "t": micros[keep]})
    counts["duplicate_events"] = int(kept.duplicated().sum())  # same user, item and time: kept, logs repeat
    return Converted(
        variant="recbole-atomic",
        events=events,
        rejected=concat_rejected([table.bad_count, rejected]),
        rows_read=len(frame) + len(table.bad_count),
        source_files=[str(path)],
        encodings={str(path): table.encoding},
        counts=counts,
        time=mode,
        time_note=TIME_NOTES[mode],
        details={
            "inter_fields": list(types),
            "timestamp_field": "timestamp" if "timestamp" in types else None,
            "value_field": "rating" if "rating" in types else None,
            "counting": "rows_read = data rows of the .inter file = events_written + rejected_total",
        },
    )


# ---------------------------------------------------------------------------------------------------
# Pre-split layout (UniSRec): rebuild each user's sequence from history + target rows


@dataclasses.dataclass
class _Row:
    order: int  # read order over all split files
    split: str
    lineno: int
    frame_row: int  # row of its split's frame (for the raw JSON of a rejected row)
    user: str
    hist: tuple[str, ...]
    target: str

    @property
    def window(self) -> tuple[str, ...]:
        return self.hist + (self.target,)


def _rebuild(rows: list[_Row], cap: int) -> tuple[list[str], list[_Row], dict[int, str]]:
    """One user's rows, in read order -> (sequence, origin row of each item, status of each row by order).

    A row whose history is shorter than ``cap`` (the longest history in the files) is a prefix: its
    target sits at position len(history). The longest prefix window (history + target) is the reference
    start; the other prefix rows must be its prefixes. A row with a history of exactly ``cap`` items may
    be cut to the last ``cap`` items (UniSRec keeps 50): it extends the sequence by its target when its
    history equals the sequence's last ``cap`` items, or when the sequence is a prefix of its window.

    Status: "target" (the first row giving its position), "subsumed" (a consistent row whose position is
    already given), "inconsistent" (contradicts the sequence, or cannot be placed in it).
    """
    prefix = [r for r in rows if len(r.hist) < cap or cap == 0]
    capped = [r for r in rows if cap and len(r.hist) == cap]
    seq: list[str] = []
    origin: list[_Row] = []
    pos_of: dict[int, int] = {}  # row order -> position of its target, for rows placed in the sequence

    if prefix:
        ref = max(prefix, key=lambda r: (len(r.hist), r.order))  # ties: the later row (later split)
        seq, origin = list(ref.window), [ref] * len(ref.window)
        for r in prefix:
            if seq[: len(r.hist) + 1] == list(r.window):
                pos_of[r.order] = len(r.hist)
    elif capped:
        # No uncut row: start from the window whose history no other window ends with (the earliest).
        ends = {r.window[1:] for r in capped}
        head = next((r for r in capped if r.hist not in ends), capped[0])
        seq, origin = list(head.hist), [head] * len(head.hist)

    by_hist: dict[tuple[str, ...], collections.deque] = collections.defaultdict(collections.deque)
    for r in capped:
        by_hist[r.hist].append(r)
    placed: set[int] = set()
    while True:
        if len(seq) >= cap and by_hist.get(tuple(seq[-cap:])):
            nxt = by_hist[tuple(seq[-cap:])].popleft()
        else:  # an uncut row longer than the sequence so far (the rows in between are missing)
            nxt = next((r for r in capped if r.order not in placed and len(r.window) > len(seq)
                        and list(r.window[: len(seq)]) == seq), None)
            if nxt is None:
                break
            by_hist[nxt.hist].remove(nxt)
            gap = list(nxt.hist[len(seq):])
            seq, origin = seq + gap, origin + [nxt] * len(gap)
        placed.add(nxt.order)
        seq.append(nxt.target)
        origin.append(nxt)
        pos_of[nxt.order] = len(seq) - 1

    # Leftover capped rows that repeat a window already in the sequence are consistent.
    leftovers = [r for r in capped if r.order not in placed]
    if leftovers:
        windows = {tuple(seq[i - cap: i + 1]): i for i in range(cap, len(seq))}
        for r in leftovers:
            if r.window in windows:
                pos_of[r.order] = windows[r.window]
    status: dict[int, str] = {}
    claimed: set[int] = set()
    for r in rows:
        p = pos_of.get(r.order)
        if p is None:
            status[r.order] = "inconsistent"
        elif p in claimed:
            status[r.order] = "subsumed"
        else:
            claimed.add(p)
            status[r.order] = "target"
    return seq, origin, status


def _convert_presplit(paths: dict[str, Path], items: _Items | None, service: str, opts: Options) -> Converted:
    if opts.time == "real":
        first = next(iter(paths.values()))
        raise ConvertError(f"{first}: pre-split sequences have positions, not times: time 'real' cannot apply")
    tables: dict[str, _Table] = {}
    rejected_parts: list[pd.DataFrame] = []
    rows: list[_Row] = []
    counts: dict[str, int] = {}
    for split, path in paths.items():
        table = _read_table(path, ("user_id", "item_id_list", "item_id"))
        if table.types["item_id_list"] != "token_seq":
            raise ConvertError(f"{path}: line 1: field 'item_id_list' is {table.types['item_id_list']}; "
                               "expected token_seq")
        tables[split] = table
        keep, rejected = _reject(table, _row_checks(table, ("user_id", "item_id")))
        rejected_parts += [table.bad_count, rejected]
        counts[f"rows_{split}"] = len(table.frame) + len(table.bad_count)
        counts["blank_lines"] = counts.get("blank_lines", 0) + table.blank_lines
        hist = table.frame["item_id_list"].str.split().to_numpy(dtype=object)
        users = table.frame["user_id"].to_numpy(dtype=object)
        targets = table.frame["item_id"].to_numpy(dtype=object)
        for i in np.flatnonzero(keep):
            rows.append(_Row(len(rows), split, int(table.lineno[i]), int(i), users[i], tuple(hist[i]), targets[i]))

    cap = max((len(r.hist) for r in rows), default=0)
    by_user: dict[str, list[_Row]] = collections.defaultdict(list)
    for r in rows:
        by_user[r.user].append(r)

    ev_user, ev_item, ev_pos, ev_origin = [], [], [], []
    bad_rows: dict[str, list[tuple[_Row, str, int]]] = collections.defaultdict(list)
    tally = collections.Counter()
    for u, urows in by_user.items():
        seq, origin, status = _rebuild(urows, cap)
        tally.update(status.values())
        ev_user += [u] * len(seq)
        ev_item += seq
        ev_pos += range(len(seq))
        ev_origin += origin
        for r in urows:
            if status[r.order] == "inconsistent":
                bad_rows[r.split].append((r, u, len(seq)))
    for split, bad in bad_rows.items():
        raw = rows_as_json(tables[split].frame.iloc[[r.frame_row for r, _, _ in bad]])
        rejected_parts.append(pd.DataFrame({
            "source": str(paths[split]),
            "reason": "inconsistent_sequence",
            "detail": [f"line {r.lineno}: item_id_list + item_id is not a prefix or window of user {u!r}'s "
                       f"sequence of {n} items rebuilt from the split files" for r, u, n in bad],
            "raw": raw,
        }, columns=QUARANTINE_SCHEMA.names))

    rows_rejected = sum(len(p) for p in rejected_parts)
    item = np.array(ev_item, dtype=object)
    user = np.array(ev_user, dtype=object)
    pos = np.array(ev_pos, dtype=np.int64)
    cols = _item_columns(item, items, service, opts)
    keep = np.ones(len(item), dtype=bool)
    if opts.service_field is not None:
        keep = cols["service"] != ""
        where = f"in {items.path.name}" if items is not None else "(no .item file)"
        lost = np.flatnonzero(~keep)
        rejected_parts.append(pd.DataFrame({
            "source": [str(paths[ev_origin[i].split]) for i in lost],
            "reason": "missing_service",
            "detail": [f"line {ev_origin[i].lineno}: position {pos[i]}: item_id={item[i]!r} has no "
                       f"{opts.service_field!r} value {where}" for i in lost],
            "raw": [json.dumps({"user_id": user[i], "position": int(pos[i]), "item_id": item[i]}, ensure_ascii=False)
                    for i in lost],
        }, columns=QUARANTINE_SCHEMA.names))
    kept_cols = {k: (v.filter(pa.array(keep)) if isinstance(v, pa.Array) else v[keep]) for k, v in cols.items()}
    events = _events_table(user[keep], ORDER_EPOCH_MICROS + pos[keep] * 1_000_000, item[keep], kept_cols)

    file_rows = sum(counts[f"rows_{s}"] for s in paths)
    as_target = tally["target"]
    history_only = len(item) - as_target
    counts.update(
        file_rows=file_rows,
        rows_as_target=as_target,
        rows_subsumed=tally["subsumed"],
        rows_rejected=rows_rejected,
        sequence_items=len(item),
        events_from_history_only=history_only,
        history_cap=cap,
    )
    if file_rows != as_target + tally["subsumed"] + rows_rejected:  # a bug here, not bad input
        raise RuntimeError(f"recbole pre-split: file rows {file_rows} != target {as_target} + subsumed "
                           f"{tally['subsumed']} + rejected {rows_rejected}")
    counts.update(_item_counts(item, cols, keep, items))
    return Converted(
        variant="recbole-presplit",
        events=events,
        rejected=concat_rejected(rejected_parts),
        rows_read=len(item) + rows_rejected,
        source_files=[str(p) for p in paths.values()],
        encodings={str(p): t.encoding for p, t in zip(paths.values(), tables.values())},
        counts=counts,
        time="ordinal",
        time_note=TIME_NOTES["ordinal"],
        details={
            "splits": list(paths),
            "inter_fields": list(next(iter(tables.values())).types),
            "counting": "rows_read = sequence_items + rows_rejected = events_written + rejected_total; "
            "file_rows = rows_as_target + rows_subsumed + rows_rejected; "
            "sequence_items = rows_as_target + events_from_history_only",
        },
    )
