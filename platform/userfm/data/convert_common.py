"""What every format converter shares (:mod:`userfm.data.convert` for MovieLens, Online Retail and Amazon reviews,
:mod:`userfm.data.recbole` for RecBole atomic files): the error type, what a converter hands to the writer, text
decoding, and the quarantine of rejected rows (every row read is kept or rejected with a reason).

Below both converters, so neither imports the other's module for these.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from userfm.errors import UserfmError
from userfm.data.schema import QUARANTINE_SCHEMA

# Tried in order. Latin-1 decodes any byte string, so it is the last resort; a latin-1 file almost
# never happens to be valid UTF-8, so "UTF-8 first" also reads the old latin-1 MovieLens files right
# (and still reads copies someone re-saved as UTF-8, which "latin-1 always" would turn into mojibake).
ENCODINGS = ("utf-8", "latin-1")

class ConvertError(UserfmError, ValueError):
    """Bad input: the message names the file (and the field or row when it applies)."""


@dataclasses.dataclass
class Converted:
    """What one format converter hands to ``_write``."""

    variant: str
    events: pa.Table  # canonical columns, not yet sorted
    rejected: pd.DataFrame  # columns of QUARANTINE_SCHEMA
    rows_read: int  # event-bearing rows/records read (dimension tables such as movies are not counted)
    source_files: list[str]
    encodings: dict[str, str]  # file -> encoding it was decoded with
    attributes: pd.DataFrame | None = None  # user_id + label columns
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # format-specific counters
    time: str = "real"  # what ts is: "real", "ordinal" (positions) or "none" (file order); manifest "time"
    time_note: str = "ts is when the event happened (UTC), from the source's own timestamps"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # format-specific facts (manifest "details")


def read_text(path: Path) -> tuple[str, str]:
    """The file's text and the encoding that decoded it; ConvertError naming the file if unreadable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read: {exc}") from exc
    for enc in ENCODINGS:
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")


def rows_as_json(frame: pd.DataFrame) -> list[str]:
    """Each row as the JSON object it was read as (the ``raw`` column of rejected.parquet).

    A Python loop, but over rejected rows only. ``DataFrame.to_json`` would be faster but writes "/"
    as "\\/", which makes every date in Online Retail's raw rows harder to read.
    """
    clean = frame.astype(object).where(frame.notna(), None)
    return [json.dumps(r, ensure_ascii=False, default=str) for r in clean.to_dict("records")]


def split_rejects(
    raw: pd.DataFrame, checks: list[tuple[str, pd.Series, str, pd.Series]], source: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """Apply row checks in order (a row gets the first reason that fails); return (keep mask, rejected).

    Args:
        raw: the rows as read, used for the JSON ``raw`` column.
        checks: (reason, bad mask, field name, field values) aligned with ``raw``; the detail of a
            rejected row reads "field='value'" and is only built for rejected rows.
    """
    reason = np.full(len(raw), None, dtype=object)
    detail = np.full(len(raw), None, dtype=object)
    for name, bad, field, values in checks:
        hit = bad.to_numpy(dtype=bool) & (reason == None)  # noqa: E711 (elementwise on an object array)
        reason[hit] = name
        detail[hit] = [f"{field}={plain(v)!r}" for v in values.to_numpy(dtype=object)[hit]]
    keep = reason == None  # noqa: E711
    rejected = pd.DataFrame(
        {"source": source, "reason": reason[~keep], "detail": detail[~keep], "raw": rows_as_json(raw[~keep])},
        columns=QUARANTINE_SCHEMA.names,
    )
    return keep, rejected


def plain(v: Any) -> Any:
    """NaN/NaT -> None and numpy scalars -> Python, so details read "CustomerID=None", not "nan"."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def empty_rejected() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in QUARANTINE_SCHEMA.names})


def concat_rejected(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else empty_rejected()
