"""Reading RecBole atomic files for ``userfm convert recbole``: the ``field:type`` headers, the ``.inter`` /
``.item`` / ``.user`` tables with each row checked (bad rows kept with their reason), and the converter's options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from userfm.data.convert_common import ConvertError, read_text, split_rejects
from userfm.data.schema import CATEGORY_TYPE, QUARANTINE_SCHEMA


TYPES = ("token", "token_seq", "float", "float_seq")
SPLITS = ("train", "valid", "test")  # UniSRec's (and RecBole's benchmark_filename) suffixes, in time order
TIME_MODES = ("auto", "real", "ordinal")
CATEGORY_DEFAULTS = ("categories", "category")
TEXT_JOIN = " | "
# The clock of order-only events (time "ordinal" / "none"): 2000-01-01T00:00:00Z + position seconds. Inside
# ingest's valid range (ts_min 1980), and far from any real log's dates in a mixed input.
ORDER_EPOCH_MICROS = 946_684_800 * 1_000_000
# 9999-12-31T23:59:59Z: a "unix time" past it is not a time (and would overflow microsecond timestamps).
MAX_REAL_SECONDS = 253_402_300_799

TIME_NOTES = {
    "real": "ts is the timestamp field read as unix seconds (UTC)",
    "ordinal": "ts is synthetic: 2000-01-01T00:00:00Z plus the event's position in its user's sequence, in "
    "seconds; the source gives order only (no calendar time, hour or gaps)",
    "none": "ts is synthetic: 2000-01-01T00:00:00Z plus the row's position among its user's rows in the file, "
    "in seconds; the source has no timestamp, so file order is the only order",
}


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``convert recbole`` was asked for (see ``cli.py``)."""

    service: str | None = None  # fixed service name; default: the data set NAME
    service_field: str | None = None  # .item token field whose value is the service
    category_field: str | None = None  # .item field whose words are the category; default categories/category
    time: str = "auto"  # auto | real | ordinal


@dataclasses.dataclass
class _Table:
    """One atomic file as read: header, rows with the header's field count, and the rows without."""

    path: Path
    types: dict[str, str]  # field -> type, in header order
    encoding: str
    frame: pd.DataFrame  # one str column per field, values stripped
    lineno: np.ndarray  # line number of each frame row (the header is line 1)
    bad_count: pd.DataFrame  # rejected rows (QUARANTINE columns) whose field count is wrong
    blank_lines: int


@dataclasses.dataclass
class _Items:
    """The .item table, one row per item id."""

    path: Path
    encoding: str
    fields: list[str]  # header order
    ids: pd.Index
    text: np.ndarray  # object: "title | other token_seq fields", "" when the item has none
    service: np.ndarray | None  # object: the --service-field value ("" when empty), None without the option
    category: pa.Array | None  # list<string> per item (null when empty), None without a category field
    text_fields: list[str]
    category_field: str | None
    duplicate_rows: int


# ---------------------------------------------------------------------------------------------------
# Reading atomic files


def _parse_header(line: str, path: Path) -> dict[str, str]:
    line = line.lstrip("\ufeff").rstrip("\r")
    if not line.strip():
        raise ConvertError(f"{path}: line 1: no header; expected tab-separated field:type columns "
                           f"(types: {', '.join(TYPES)})")
    types: dict[str, str] = {}
    for col in line.split("\t"):
        col = col.strip()
        name, colon, typ = col.rpartition(":")
        if not colon or not name.strip():
            raise ConvertError(f"{path}: line 1: field {col!r} has no :type; a RecBole header is field:type "
                               f"per column (types: {', '.join(TYPES)})")
        name, typ = name.strip(), typ.strip()
        if typ not in TYPES:
            raise ConvertError(f"{path}: line 1: field {name!r}: unknown type {typ!r}; "
                               f"expected one of {', '.join(TYPES)}")
        if name in types:
            raise ConvertError(f"{path}: line 1: field {name!r} appears twice in the header")
        types[name] = typ
    return types


def _read_table(path: Path, required: tuple[str, ...]) -> _Table:
    """Read one atomic file; ConvertError for a bad header or a missing required field."""
    text, encoding = read_text(path)
    lines = text.split("\n")  # not splitlines(): it also splits on \x0b, \x1c, \u2028... inside titles
    types = _parse_header(lines[0], path)
    for name in required:
        if name not in types:
            raise ConvertError(f"{path}: line 1: no {name!r} field (header: {lines[0].strip()!r})")
    body = pd.Series(lines[1:], dtype=object).str.rstrip("\r")
    lineno = np.arange(2, len(lines) + 1)
    blank = body.str.strip() == ""
    # The empty string after the last newline is not a line of the file.
    blank_lines = int(blank.sum()) - (1 if len(body) and body.iloc[-1] == "" else 0)
    body, lineno = body[~blank.to_numpy()], lineno[~blank.to_numpy()]
    n_fields = body.str.count("\t").to_numpy() + 1
    fits = n_fields == len(types)
    names = list(types)
    if fits.any():
        frame = body[fits].str.split("\t", expand=True)
        frame.columns = names
        frame = frame.apply(lambda c: c.str.strip()).reset_index(drop=True)
    else:
        frame = pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
    bad = pd.DataFrame(
        {
            "source": str(path),
            "reason": "wrong_field_count",
            "detail": [f"line {n}: {k} tab-separated fields, the header has {len(names)} ({', '.join(names)})"
                       for n, k in zip(lineno[~fits], n_fields[~fits])],
            "raw": [json.dumps(s, ensure_ascii=False) for s in body[~fits]],
        },
        columns=QUARANTINE_SCHEMA.names,
    )
    return _Table(path, types, encoding, frame, lineno[fits], bad, blank_lines)


def _bad_floats(col: pd.Series, seq: bool) -> pd.Series:
    """True where a float (or float_seq) value is not a finite number; "" is a missing value, not bad."""
    if seq:
        words = col.str.split().explode()
        num = pd.to_numeric(words, errors="coerce").astype(np.float64)
        bad_word = words.notna() & ~np.isfinite(num)
        return bad_word.groupby(level=0).any().reindex(col.index, fill_value=False)
    num = pd.to_numeric(col, errors="coerce").astype(np.float64)
    return (col != "") & ~np.isfinite(num)


def _row_checks(table: _Table, ids: tuple[str, ...]) -> list[tuple[str, pd.Series, str, pd.Series]]:
    """The ``split_rejects`` checks every data row gets: ids present, float fields numeric."""
    frame = table.frame
    checks = [(f"missing_{f}", frame[f] == "", f, frame[f]) for f in ids]
    for name, typ in table.types.items():
        if typ in ("float", "float_seq"):
            checks.append(("bad_float", _bad_floats(frame[name], typ == "float_seq"), name, frame[name]))
    return checks


def _reject(table: _Table, checks: list) -> tuple[np.ndarray, pd.DataFrame]:
    """``split_rejects`` with the line number in front of each detail ("line 7: timestamp='x'")."""
    keep, rejected = split_rejects(table.frame, checks, str(table.path))
    lines = table.lineno[~keep]
    rejected["detail"] = [f"line {n}: {d}" for n, d in zip(lines, rejected["detail"])]
    return keep, rejected


def _dimension_rows(table: _Table, key: str) -> tuple[pd.DataFrame, np.ndarray, int]:
    """A .item/.user table's rows, one per key: ConvertError (file, line, field) on a bad row.

    Returns (frame, line numbers, identical duplicate rows dropped).
    """
    path = table.path
    if len(table.bad_count):
        first = table.bad_count.iloc[0]
        raise ConvertError(f"{path}: {first['detail']}")
    frame, lineno = table.frame, table.lineno
    empty = (frame[key] == "").to_numpy()
    if empty.any():
        raise ConvertError(f"{path}: line {lineno[empty][0]}: field {key!r} is empty")
    same = frame.duplicated().to_numpy()  # the whole row repeated: harmless, keep the first
    frame, lineno = frame[~same], lineno[~same]
    clash = frame.duplicated(key, keep=False).to_numpy()
    if clash.any():
        k = frame[key].to_numpy()[clash][0]
        first, second = lineno[frame[key].to_numpy() == k][:2]
        raise ConvertError(f"{path}: line {second}: field {key!r}: {k!r} is also on line {first} "
                           "with different content")
    return frame.reset_index(drop=True), lineno, int(same.sum())


def _normalise_words(col: pd.Series) -> pd.Series:
    return col.str.replace(r"\s+", " ", regex=True).str.strip()


def _read_items(path: Path, opts: Options) -> _Items:
    table = _read_table(path, ("item_id",))
    frame, lineno, dupes = _dimension_rows(table, "item_id")
    types = table.types

    # Title first (a token title is still a title), then the other word fields in header order.
    text_fields = [f for f, t in types.items() if f == "title" and t in ("token", "token_seq")]
    text_fields += [f for f, t in types.items() if t == "token_seq" and f != "title"]
    text = pd.Series("", index=frame.index)
    for f in text_fields:
        part = _normalise_words(frame[f])
        text = text.where(part == "", text.where(text == "", text + TEXT_JOIN) + part)

    service = None
    if opts.service_field is not None:
        f = opts.service_field
        if f not in types:
            raise ConvertError(f"{path}: line 1: no field {f!r} for service_field (fields: {', '.join(types)})")
        if types[f] != "token":
            raise ConvertError(f"{path}: line 1: field {f!r} is {types[f]}; service_field needs a token field")
        service = frame[f].to_numpy(dtype=object)

    cat_field = opts.category_field
    if cat_field is None:
        cat_field = next((f for f in CATEGORY_DEFAULTS if f in types), None)
    elif cat_field not in types:
        raise ConvertError(f"{path}: line 1: no field {cat_field!r} for category_field (fields: {', '.join(types)})")
    category = None
    if cat_field is not None:
        if types[cat_field] not in ("token", "token_seq"):
            raise ConvertError(f"{path}: line 1: field {cat_field!r} is {types[cat_field]}; "
                               "category_field needs a token or token_seq field")
        words = frame[cat_field].str.split()
        category = pa.array([w if w else None for w in words], CATEGORY_TYPE)

    return _Items(
        path=path,
        encoding=table.encoding,
        fields=list(types),
        ids=pd.Index(frame["item_id"]),
        text=text.to_numpy(dtype=object),
        service=service,
        category=category,
        text_fields=text_fields,
        category_field=cat_field,
        duplicate_rows=dupes,
    )


def _read_users(path: Path) -> tuple[pd.DataFrame | None, dict[str, int], str]:
    """The .user fields other than user_id as attribute columns: token(_seq) -> str, float -> float."""
    table = _read_table(path, ("user_id",))
    frame, lineno, dupes = _dimension_rows(table, "user_id")
    counts = {"duplicate_user_rows": dupes}
    if len(table.types) == 1:
        return None, counts, table.encoding
    attrs = pd.DataFrame({"user_id": frame["user_id"]})
    for name, typ in table.types.items():
        if name == "user_id":
            continue
        col = frame[name]
        if typ == "float":
            bad = _bad_floats(col, seq=False).to_numpy()
            if bad.any():
                raise ConvertError(f"{path}: line {lineno[bad][0]}: field {name!r}: not a number: {col[bad].iloc[0]!r}")
            attrs[name] = pd.to_numeric(col, errors="coerce").astype(np.float64)  # "" -> NaN (checked above)
        else:  # token, and the _seq types kept as their space-separated text
            attrs[name] = col.astype(str)
    return attrs, counts, table.encoding


