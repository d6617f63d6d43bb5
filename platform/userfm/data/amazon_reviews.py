"""``userfm convert amazon-reviews``: the Amazon review dumps (JSON lines, plain or gzipped; the 2014, 2018
and 2023 layouts) to the canonical event table, one review per event, every unusable record kept with its reason."""

from __future__ import annotations

import datetime
import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from userfm.data.convert_common import (
    ConvertError,
    Converted,
    empty_rejected,
)
from userfm.data.schema import CATEGORY_TYPE, EVENT_SCHEMA, QUARANTINE_SCHEMA, TS_TYPE

AMAZON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
REVIEW_SNIPPET_CHARS = 200  # fallback text when a review has no summary/title
MAX_JSON_RECORD_CHARS = 16 << 20  # a "record" this long is a broken file, not a review


# ---------------------------------------------------------------------------------------------------
# Amazon reviews (2014 / 2018 / 2023 dumps)


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzipped UTF-8 text file (gzip is detected by its magic bytes, not the suffix)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_json_values(lines: Iterable[str]) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, value, None) per top-level JSON value, or (line, None, text) for text that is not JSON.

    Reads both JSON lines and objects pretty-printed one after another. A record is decoded once a
    line closes it ("}" at the end); a line starting with "{" or "[" in column 0 while an earlier
    record is still open means that record was broken, so it is given up and parsing resynchronises.
    """
    decoder = json.JSONDecoder()
    pending, start = "", 0
    for lineno, line in enumerate(lines, start=1):
        if line.startswith(("{", "[")) and pending.strip():
            yield start, None, pending
            pending = ""
        if not pending.strip():
            pending, start = "", lineno
        pending += line
        if not line.rstrip().endswith(("}", "]")) and len(pending) < MAX_JSON_RECORD_CHARS:
            continue
        pos = 0
        while True:  # one line may close several values ("}{", JSON lines without newlines...)
            while pos < len(pending) and pending[pos].isspace():
                pos += 1
            if pos == len(pending):
                pending = ""
                break
            try:
                value, pos = decoder.raw_decode(pending, pos)
            except json.JSONDecodeError:
                pending = pending[pos:]
                break
            yield start, value, None
        if len(pending) >= MAX_JSON_RECORD_CHARS:
            yield start, None, pending[:1000]
            pending = ""
    if pending.strip():
        yield start, None, pending


def _clean_str(v: Any) -> str | None:
    """A non-empty id string, or None. Numbers become their integer text (JSON ids are sometimes ints)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else str(v)
    if isinstance(v, str):
        return v.strip() or None
    return None


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if np.isfinite(f) else None


def _one_line(v: Any) -> str:
    return " ".join(v.split()) if isinstance(v, str) else ""


def _review_category(rec: dict) -> list[str] | None:
    """The item's category path, root first: 2018 ``category`` (a list), 2014 ``categories`` (a list of
    paths: the first is used), 2023 ``main_category`` (a string)."""
    for key in ("category", "categories", "main_category"):
        v = rec.get(key)
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and v and isinstance(v[0], list):
            v = next((p for p in v if isinstance(p, list) and p), [])
        if isinstance(v, list):
            path = [s.strip() for s in v if isinstance(s, str) and s.strip()]
            if path:
                return path
    return None


def _review_event(rec: dict, service: str) -> tuple[dict | None, str | None, str | None]:
    """One review -> (event row, None, None), or (None, reason, detail) when it cannot be an event."""
    user = _clean_str(rec.get("reviewerID", rec.get("user_id")))
    if user is None:
        return None, "missing_user_id", "no reviewerID/user_id"
    item = _clean_str(rec.get("parent_asin")) or _clean_str(rec.get("asin"))
    if item is None:
        return None, "missing_item_id", "no asin/parent_asin"
    # 2014/2018: unixReviewTime in seconds (reviewTime "09 13, 2009" as a fallback); 2023: timestamp in ms.
    if rec.get("unixReviewTime") is not None:
        secs, field = _as_number(rec["unixReviewTime"]), "unixReviewTime"
    elif rec.get("timestamp") is not None:
        ms = _as_number(rec["timestamp"])
        secs, field = (None if ms is None else ms / 1000.0), "timestamp"
    elif isinstance(rec.get("reviewTime"), str):
        try:
            when = datetime.datetime.strptime(rec["reviewTime"].strip(), "%m %d, %Y")
            secs = when.replace(tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            secs = None
        field = "reviewTime"
    else:
        return None, "missing_timestamp", "no unixReviewTime/timestamp/reviewTime"
    if secs is None:
        return None, "bad_timestamp", f"{field}={rec.get(field)!r}"
    raw_rating = rec.get("overall", rec.get("rating"))
    rating = _as_number(raw_rating)
    if raw_rating is not None and rating is None:
        return None, "bad_rating", f"rating={raw_rating!r}"

    head = _one_line(rec.get("summary")) or _one_line(rec.get("title"))
    if not head:
        head = (_one_line(rec.get("reviewText")) or _one_line(rec.get("text")))[:REVIEW_SNIPPET_CHARS].rstrip()
    text = head or f"item {item}"
    if rating is not None:
        text += f" | rated {rating:.1f}/5"
    row = {
        "user_id": user,
        "ts": int(round(secs * 1e6)),
        "service": service,
        "text": text,
        "item_id": item,
        "category": _review_category(rec),
        "value": rating,
    }
    return row, None, None


def _convert_amazon(src: Path, service: str) -> Converted:
    if not isinstance(service, str) or not service.strip():
        raise ConvertError(f"service must be a non-empty string, got {service!r}")
    if src.is_file():
        files = [src]
    else:
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(AMAZON_SUFFIXES))
        if not files:
            raise ConvertError(f"{src}: no review files ({', '.join(AMAZON_SUFFIXES)})")
    rows: list[dict] = []
    rejects: list[dict] = []
    rows_read = 0
    encodings = {}
    for path in files:
        encodings[str(path)] = "utf-8"
        try:
            with _open_text(path) as fh:
                for lineno, value, bad_text in _iter_json_values(fh):
                    records = value if isinstance(value, list) else [value]
                    if bad_text is not None:
                        records = [None]
                    for rec in records:
                        rows_read += 1
                        if bad_text is not None:
                            reason, detail, raw = "bad_json", f"line {lineno}: not valid JSON", bad_text
                        elif not isinstance(rec, dict):
                            reason, detail, raw = "not_an_object", f"line {lineno}: {type(rec).__name__}", json.dumps(rec)
                        else:
                            row, reason, detail = _review_event(rec, service)
                            if row is not None:
                                rows.append(row)
                                continue
                            detail = f"line {lineno}: {detail}"
                            raw = json.dumps(rec, ensure_ascii=False)
                        rejects.append({"source": str(path), "reason": reason, "detail": detail, "raw": raw})
        except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            raise ConvertError(f"{path}: cannot read: {exc}") from exc

    columns = {name: [r[name] for r in rows] for name in EVENT_SCHEMA.names}
    events = pa.table(
        {
            "user_id": pa.array(columns["user_id"], pa.string()),
            "ts": pa.array(columns["ts"], pa.int64()).cast(TS_TYPE),
            "service": pa.array(columns["service"], pa.string()),
            "text": pa.array(columns["text"], pa.string()),
            "item_id": pa.array(columns["item_id"], pa.string()),
            "category": pa.array(columns["category"], CATEGORY_TYPE),
            "value": pa.array(columns["value"], pa.float64()),
        }
    )
    return Converted(
        variant="amazon-reviews",
        events=events,
        rejected=pd.DataFrame(rejects, columns=QUARANTINE_SCHEMA.names) if rejects else empty_rejected(),
        rows_read=rows_read,
        source_files=[str(p) for p in files],
        encodings=encodings,
        counts={"with_category": sum(r["category"] is not None for r in rows)},
    )
