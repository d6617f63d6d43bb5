"""Converters from public data sets to the canonical event table (``userfm convert FORMAT SRC OUT``).

Every format ends in the same layout under OUT:

- ``events.parquet``: exactly ``schema.EVENT_SCHEMA``, sorted by (user_id, ts) so reruns are identical;
- ``attributes.parquet``: one row per user, ``user_id`` + label columns (only when the source has any);
- ``rejected.parquet``: rows that could not become events, ``schema.QUARANTINE_SCHEMA`` (always written);
- ``convert_manifest.json``: what was read and written, written last so it marks a finished conversion.
  Its ``time`` says what ``ts`` means: "real" (when it happened), or "ordinal" / "none" (a synthetic
  1970-01-01 + position clock: order only), with a one-line ``time_note``.

Every row read becomes an event or a rejected row, never nothing: the manifest's
``rows_read == events_written + rejected_total`` is checked before anything is written.

CSV/DAT formats are parsed and textualized column-wise (pandas + pyarrow.compute); only the JSON
formats loop in Python, one record at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userfm.data.convert_common import (
    ENCODINGS,
    ConvertError,
    Converted,
    concat_rejected,
    read_text,
    split_rejects,
)
from userfm.data.schema import CATEGORY_TYPE, QUARANTINE_SCHEMA, SCHEMA_VERSION, TS_TYPE, check_events
from userfm.data.amazon_reviews import _convert_amazon


FORMATS = ("movielens", "online-retail", "amazon-reviews", "recbole")  # recbole: userfm/recbole.py

EVENTS_FILE = "events.parquet"
ATTRIBUTES_FILE = "attributes.parquet"
REJECTED_FILE = "rejected.parquet"
MANIFEST_FILE = "convert_manifest.json"

# MovieLens ML-1M README: users.dat age and occupation codes.
ML1M_AGES = {
    "1": "Under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+",
}
ML1M_OCCUPATIONS = {
    "0": "other", "1": "academic/educator", "2": "artist", "3": "clerical/admin", "4": "college/grad student",
    "5": "customer service", "6": "doctor/health care", "7": "executive/managerial", "8": "farmer",
    "9": "homemaker", "10": "K-12 student", "11": "lawyer", "12": "programmer", "13": "retired",
    "14": "sales/marketing", "15": "scientist", "16": "self-employed", "17": "technician/engineer",
    "18": "tradesman/craftsman", "19": "unemployed", "20": "writer",
}
# ML-100K README: the 19 genre flags of u.item, in column order (u.genre lists the same when present).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
ML_NO_GENRES = "(no genres listed)"  # ml-latest's "no genre"; ML-100K says "unknown"

# Online Retail II (2009-2011) renamed three columns; map them onto the original UCI names.
RETAIL_ALIASES = {"Invoice": "InvoiceNo", "Price": "UnitPrice", "Customer ID": "CustomerID"}
RETAIL_REQUIRED = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "CustomerID")


# ---------------------------------------------------------------------------------------------------
# Entry point


def convert(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    service: str | None = None,
    service_field: str | None = None,
    category_field: str | None = None,
    time: str | None = None,
) -> dict:
    """Convert SRC (a file or a folder) into OUT; return the manifest dict.

    Args:
        fmt: one of ``FORMATS``.
        src: the downloaded data set: a folder, or one of its files.
        out: output folder (created); existing outputs of an earlier run are replaced.
        service: event service name, amazon-reviews (default "reviews") and recbole (default the data
            set's NAME). MovieLens (ratings/tags) and Online Retail (purchases/returns) name their two
            services themselves.
        service_field: recbole only: the .item token field whose value is the event's service.
        category_field: recbole only: the .item field whose words are the event's category (default
            ``categories`` or ``category`` when the .item file has one).
        time: recbole only: what the timestamp field holds: "real" (unix seconds), "ordinal" (per-user
            positions), or "auto" (the default: ordinal when every user's values are exactly 0..n-1).
    """
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    if service is not None and fmt not in ("amazon-reviews", "recbole"):
        raise ConvertError(f"service applies to recbole and amazon-reviews only; {fmt} writes fixed services")
    recbole_only = {"service_field": service_field, "category_field": category_field, "time": time}
    for name, given in recbole_only.items():
        if given is not None and fmt != "recbole":
            raise ConvertError(f"{name} applies to recbole only")
    if fmt == "movielens":
        result = _convert_movielens(src)
    elif fmt == "online-retail":
        result = _convert_online_retail(src)
    elif fmt == "recbole":
        # Imported here: recbole.py builds on this module's helpers (and so imports it).
        from userfm.data.recbole import convert_recbole
        from userfm.data.recbole_files import Options

        opts = Options(service=service, service_field=service_field, category_field=category_field, time=time or "auto")
        result = convert_recbole(src, opts)
    else:
        result = _convert_amazon(src, service or "reviews")
    return _write(fmt, result, Path(out))


def _write(fmt: str, res: Converted, out: Path) -> dict:
    events = res.events
    for name in ("user_id", "ts", "service", "text"):
        if events.column(name).null_count:  # a converter bug, not bad input
            raise RuntimeError(f"{fmt}: {events.column(name).null_count} events have a null {name}")
    events = check_events(events.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("service", "ascending")]))
    rejected = pa.Table.from_pandas(res.rejected, schema=QUARANTINE_SCHEMA, preserve_index=False)
    rejected = rejected.replace_schema_metadata(QUARANTINE_SCHEMA.metadata)  # drop pandas' own metadata

    by_reason = {str(k): int(v) for k, v in res.rejected["reason"].value_counts().sort_index().items()}
    n_rejected = sum(by_reason.values())
    if res.rows_read != events.num_rows + n_rejected:
        raise RuntimeError(
            f"{fmt}: rows_read {res.rows_read} != events {events.num_rows} + rejected {n_rejected}; rows were lost"
        )
    services = pc.value_counts(events.column("service")).to_pylist()
    manifest = {
        "format": fmt,
        "variant": res.variant,
        "schema_version": SCHEMA_VERSION,
        "time": res.time,
        "time_note": res.time_note,
        "source_files": res.source_files,
        "encodings": res.encodings,
        "rows_read": res.rows_read,
        "events_written": events.num_rows,
        "rejected_total": n_rejected,
        "rejected": by_reason,
        "users": pc.count_distinct(events.column("user_id")).as_py() if events.num_rows else 0,
        "services": {d["values"]: d["counts"] for d in sorted(services, key=lambda d: d["values"])},
        "attributes": None if res.attributes is None else [c for c in res.attributes.columns if c != "user_id"],
        "counts": res.counts,
        "details": res.details,
        "outputs": [EVENTS_FILE, REJECTED_FILE] + ([ATTRIBUTES_FILE] if res.attributes is not None else []),
    }

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest while files are half-written
    # Parquet's "compliant" list child name is "element"; EVENT_SCHEMA's is pyarrow's "item". Keep
    # "item" so the file reads back as exactly EVENT_SCHEMA.
    pq.write_table(events, out / EVENTS_FILE, use_compliant_nested_type=False)
    pq.write_table(rejected, out / REJECTED_FILE)
    if res.attributes is not None:
        attrs = res.attributes.astype({"user_id": "str"})
        attrs = pa.Table.from_pandas(attrs, preserve_index=False).replace_schema_metadata(None)
        pq.write_table(attrs, out / ATTRIBUTES_FILE)
    else:  # a stale file from an earlier run on another source would pair with the wrong users
        (out / ATTRIBUTES_FILE).unlink(missing_ok=True)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def _read_delimited(path: Path, sep: str, names: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, str]:
    """Read a delimited file as strings ("" for empty), trying ``ENCODINGS`` in order.

    Args:
        sep: "," for quoted CSV with a header row; "\\t", "|" or "::" for the headerless, unquoted
            MovieLens files, whose field count must then equal ``len(names)``.
    """
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if names is None:
        kwargs: dict[str, Any] = dict(sep=sep, header=0)
    else:
        # Titles hold quotes ("Sleeper" (1973)) that are plain text in these unquoted formats.
        kwargs = dict(sep=sep, header=None, quoting=csv.QUOTE_NONE)
    kwargs.update(dtype=str, keep_default_na=False, skip_blank_lines=True)
    try:
        if sep == "::":
            # pandas only parses multi-character separators with its slow Python engine; "::" never
            # occurs inside a field, so swap it for a control character and keep the C engine.
            text, enc = read_text(path)
            kwargs["sep"] = "\x1f"
            frame = pd.read_csv(io.StringIO(text.replace("::", "\x1f")), **kwargs)
        else:
            for enc in ENCODINGS:
                try:
                    frame = pd.read_csv(path, encoding=enc, **kwargs)
                    break
                except UnicodeDecodeError:
                    continue
    except ConvertError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConvertError(f"{path}: cannot parse: {exc}") from exc
    if names is not None:
        if len(frame.columns) != len(names) and len(frame):
            raise ConvertError(f"{path}: expected {len(names)} fields per line ({', '.join(names)}), "
                               f"found {len(frame.columns)}")
        frame.columns = list(names)[: len(frame.columns)]
        for name in names[len(frame.columns):]:
            frame[name] = ""
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.fillna("").astype(str), enc


def _require_columns(frame: pd.DataFrame, required: Iterable[str], path: Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConvertError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def _id_str(col: pd.Series) -> pd.Series:
    """Ids as clean strings: "" when missing, and spreadsheet floats "17850.0" back to "17850"."""
    s = col.astype("string").fillna("").str.strip()
    return s.str.replace(r"^(-?\d+)\.0*$", r"\1", regex=True).astype(str)


def _ts_from_seconds(secs: pd.Series) -> pa.Array:
    """Unix seconds (float, already validated) -> UTC microsecond timestamps."""
    micros = np.round(secs.to_numpy(dtype=np.float64) * 1e6).astype(np.int64)
    return pa.array(micros).cast(TS_TYPE)


# ---------------------------------------------------------------------------------------------------
# MovieLens


@dataclasses.dataclass
class _Movies:
    """The movie table, indexed by movie id, with each movie's text prefix and category path."""

    index: pd.Index  # movie ids (str), unique
    prefix: pa.Array  # "Title (1995) | Genre1, Genre2" (no " | ..." part when there are no genres)
    category: pa.Array  # list<string>: ["Movie", first genre], null when the movie has no genre


def _movies_table(ids: pd.Series, titles: pd.Series, genres: pd.Series) -> tuple[_Movies, int]:
    """Build ``_Movies`` from ids, titles and ``|``-joined genre strings ("" = no genre).

    Returns the table and the number of duplicate movie-id rows dropped (first one kept).
    """
    frame = pd.DataFrame({"id": ids.str.strip(), "title": titles.str.strip(), "genres": genres.str.strip()})
    frame.loc[frame["genres"] == ML_NO_GENRES, "genres"] = ""
    n_dupes = int(frame["id"].duplicated().sum())
    frame = frame.drop_duplicates("id", keep="first")
    has_genre = (frame["genres"] != "").to_numpy()
    prefix = frame["title"].where(~has_genre, frame["title"] + " | " + frame["genres"].str.replace("|", ", "))
    first = frame["genres"].str.split("|").str[0].to_numpy(dtype=object)

    n_valid = int(has_genre.sum())
    values = np.empty(2 * n_valid, dtype=object)
    values[0::2] = "Movie"
    values[1::2] = first[has_genre]
    offsets = np.concatenate([[0], np.cumsum(np.where(has_genre, 2, 0))]).astype(np.int32)
    category = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.string()), mask=pa.array(~has_genre))
    movies = _Movies(
        index=pd.Index(frame["id"].to_numpy(dtype=object)),
        prefix=pa.array(prefix.to_numpy(dtype=object), pa.string()),
        category=category.cast(CATEGORY_TYPE),
    )
    return movies, n_dupes


def _movielens_rows(
    frame: pd.DataFrame, source: Path, value_col: str
) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """Validate rating or tag rows (columns user, item, <value_col>, ts); return kept rows, their seconds, rejected."""
    user, item = frame["user"].str.strip(), frame["item"].str.strip()
    secs = pd.to_numeric(frame["ts"].str.strip(), errors="coerce")
    checks = [
        ("missing_user_id", user == "", "user", frame["user"]),
        ("missing_item_id", item == "", "item", frame["item"]),
    ]
    if value_col == "rating":
        rating = pd.to_numeric(frame["rating"].str.strip(), errors="coerce")
        checks.append(("bad_rating", rating.isna(), "rating", frame["rating"]))
    else:
        checks.append(("missing_tag", frame["tag"].str.strip() == "", "tag", frame["tag"]))
    checks.append(("bad_timestamp", secs.isna(), "timestamp", frame["ts"]))
    keep, rejected = split_rejects(frame, checks, str(source))
    kept = frame[keep].assign(user=user[keep], item=item[keep])
    if value_col == "rating":
        kept = kept.assign(rating=rating[keep])
    return kept, secs[keep], rejected


def _movielens_events(kept: pd.DataFrame, secs: pd.Series, movies: _Movies, service: str) -> tuple[pa.Table, int]:
    """Events for validated ratings (service "ratings") or tags; returns the table and how many rows
    name a movie missing from the movie file (they keep the event, with "movie <id>" as the title)."""
    n = len(kept)
    idx = movies.index.get_indexer(kept["item"].to_numpy(dtype=object))
    unknown = idx < 0
    take = pa.array(idx, mask=unknown)
    item = pa.array(kept["item"].to_numpy(dtype=object), pa.string())
    prefix = movies.prefix.take(take)
    prefix = pc.if_else(pc.is_null(prefix), pc.binary_join_element_wise("movie ", item, ""), prefix)
    if service == "ratings":
        rating = kept["rating"].to_numpy(dtype=np.float64)
        codes, uniques = pd.factorize(rating)  # format each distinct rating once: 0.5 .. 5.0
        suffix = pa.array(np.array([f" | rated {u:.1f}/5" for u in uniques], dtype=object)[codes], pa.string())
        value = pa.array(rating, pa.float64())
    else:
        tag = pa.array(kept["tag"].str.strip().to_numpy(dtype=object), pa.string())
        suffix = pc.binary_join_element_wise(" | tagged: ", tag, "")
        value = pa.nulls(n, pa.float64())
    table = pa.table(
        {
            "user_id": pa.array(kept["user"].to_numpy(dtype=object), pa.string()),
            "ts": _ts_from_seconds(secs),
            "service": pa.repeat(service, n).cast(pa.string()),
            "text": pc.binary_join_element_wise(prefix, suffix, ""),
            "item_id": item,
            "category": movies.category.take(take),
            "value": value,
        }
    )
    return table, int(unknown.sum())


def _age_bracket(age: pd.Series) -> pd.Series:
    """Integer ages -> the ML-1M bracket labels, so both variants share one ``age_bracket`` column."""
    bins = [-np.inf, 18, 25, 35, 45, 50, 56, np.inf]
    return pd.cut(age, bins=bins, right=False, labels=list(ML1M_AGES.values())).astype(object)


def _convert_movielens(src: Path) -> Converted:
    folder = src if src.is_dir() else src.parent
    encodings: dict[str, str] = {}
    counts: dict[str, int] = {}
    attributes = None
    tags = None

    def read(name: str, sep: str, names: tuple[str, ...] | None = None) -> pd.DataFrame:
        frame, encodings[name] = _read_delimited(folder / name, sep, names)
        return frame

    if (folder / "u.data").exists():
        variant = "ml-100k"
        ratings = read("u.data", "\t", ("user", "item", "rating", "ts"))
        genre_names = list(ML100K_GENRES)
        if (folder / "u.genre").exists():
            listed = read("u.genre", "|", ("name", "index"))
            listed = listed[listed["name"].str.strip() != ""]
            order = pd.to_numeric(listed["index"], errors="coerce")
            genre_names = list(listed.assign(order=order).sort_values("order")["name"].str.strip())
        item_cols = ("id", "title", "release_date", "video_release_date", "imdb_url")
        items = read("u.item", "|", item_cols + tuple(f"g{i}" for i in range(len(genre_names))))
        flags = items[[f"g{i}" for i in range(len(genre_names))]].to_numpy() == "1"
        # ML-100K flags "unknown" where ml-latest says "(no genres listed)": it is not a genre.
        flags[:, [i for i, g in enumerate(genre_names) if g.lower() == "unknown"]] = False
        joined = pd.Series("", index=items.index)
        for i, name in enumerate(genre_names):  # 19 columns, not rows
            joined = joined + np.where(flags[:, i], name + "|", "")
        movies, counts["duplicate_movie_rows"] = _movies_table(items["id"], items["title"], joined.str.rstrip("|"))
        if (folder / "u.user").exists():
            users = read("u.user", "|", ("user_id", "age", "gender", "occupation", "zip"))
            age = pd.to_numeric(users["age"], errors="coerce").astype("Int64")
            attributes = pd.DataFrame({
                "user_id": users["user_id"].str.strip(),
                "gender": users["gender"].str.strip(),
                "age": age,
                "age_bracket": _age_bracket(age.astype("float64")),
                "occupation": users["occupation"].str.strip(),
                "zip": users["zip"].str.strip(),
            })
    elif (folder / "ratings.dat").exists():
        # ML-1M; ML-10M has the same files minus users.dat, plus tags.dat.
        variant = "ml-10m" if (folder / "tags.dat").exists() and not (folder / "users.dat").exists() else "ml-1m"
        ratings = read("ratings.dat", "::", ("user", "item", "rating", "ts"))
        items = read("movies.dat", "::", ("id", "title", "genres"))
        movies, counts["duplicate_movie_rows"] = _movies_table(items["id"], items["title"], items["genres"])
        if (folder / "tags.dat").exists():
            tags = read("tags.dat", "::", ("user", "item", "tag", "ts"))
        if (folder / "users.dat").exists():
            users = read("users.dat", "::", ("user_id", "gender", "age", "occupation", "zip"))
            age = users["age"].str.strip().map(ML1M_AGES)
            occupation = users["occupation"].str.strip().map(ML1M_OCCUPATIONS)
            counts["unknown_user_codes"] = int(age.isna().sum() + occupation.isna().sum())
            attributes = pd.DataFrame({
                "user_id": users["user_id"].str.strip(),
                "gender": users["gender"].str.strip(),
                "age": age,  # ML-1M only has the bracket; kept under both names so variants line up
                "age_bracket": age,
                "occupation": occupation,
                "zip": users["zip"].str.strip(),
            })
    elif (folder / "ratings.csv").exists():
        variant = "ml-latest"
        ratings = read("ratings.csv", ",")
        _require_columns(ratings, ("userId", "movieId", "rating", "timestamp"), folder / "ratings.csv")
        ratings = ratings.rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts"})
        items = read("movies.csv", ",")
        _require_columns(items, ("movieId", "title", "genres"), folder / "movies.csv")
        movies, counts["duplicate_movie_rows"] = _movies_table(items["movieId"], items["title"], items["genres"])
        if (folder / "tags.csv").exists():
            tags = read("tags.csv", ",")
            _require_columns(tags, ("userId", "movieId", "tag", "timestamp"), folder / "tags.csv")
            tags = tags.rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts"})
    else:
        raise ConvertError(f"{folder}: no MovieLens ratings file (u.data, ratings.dat or ratings.csv)")

    rating_file = next(n for n in encodings if n in ("u.data", "ratings.dat", "ratings.csv"))
    parts = [(ratings[["user", "item", "rating", "ts"]], rating_file, "rating", "ratings")]
    if tags is not None:
        tag_file = "tags.dat" if "tags.dat" in encodings else "tags.csv"
        parts.append((tags[["user", "item", "tag", "ts"]], tag_file, "tag", "tags"))
    tables, rejects, unknown = [], [], 0
    for frame, name, value_col, service in parts:
        kept, secs, rejected = _movielens_rows(frame, folder / name, value_col)
        table, n_unknown = _movielens_events(kept, secs, movies, service)
        tables.append(table)
        rejects.append(rejected)
        unknown += n_unknown
    rows_read = sum(len(frame) for frame, *_ in parts)
    counts["events_with_unknown_movie"] = unknown
    counts["movies"] = len(movies.index)
    return Converted(
        variant=variant,
        events=pa.concat_tables(tables),
        rejected=concat_rejected(rejects),
        rows_read=rows_read,
        source_files=[str(folder / n) for n in encodings],
        encodings={str(folder / n): e for n, e in encodings.items()},
        attributes=attributes,
        counts=counts,
    )


# ---------------------------------------------------------------------------------------------------
# Online Retail (UCI)


def _single_file(src: Path, suffixes: tuple[str, ...], what: str) -> Path:
    if src.is_file():
        return src
    found = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if len(found) != 1:
        names = [p.name for p in found] or "none"
        raise ConvertError(f"{src}: expected exactly one {what} file ({', '.join(suffixes)}), found {names}; "
                           "pass the file itself")
    return found[0]


def _read_retail(path: Path) -> tuple[pd.DataFrame, str]:
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        try:
            # Online Retail II splits its years over two sheets; read them all.
            sheets = pd.read_excel(path, sheet_name=None)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ConvertError(f"{path}: cannot read spreadsheet: {exc}") from exc
        frame = pd.concat([s.rename(columns=lambda c: str(c).strip()) for s in sheets.values()], ignore_index=True)
        encoding = "xlsx"
    else:
        frame, encoding = _read_delimited(path, ",")
    frame = frame.rename(columns=lambda c: RETAIL_ALIASES.get(str(c).strip(), str(c).strip()))
    _require_columns(frame, RETAIL_REQUIRED, path)
    return frame, encoding


def _retail_dates(col: pd.Series) -> pd.Series:
    """InvoiceDate -> tz-aware UTC timestamps (NaT where unparseable).

    The shop's clock is UK local time without a zone; we take it as UTC (at most an hour off in
    summer, and orderings within a user are unchanged).
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        parsed = col
    else:
        text = col.astype("string").fillna("").str.strip()
        parsed = pd.to_datetime(text, format="%m/%d/%Y %H:%M", errors="coerce")
        # Some re-exports write ISO dates ("2010-12-01 08:26:00") instead of the UCI M/D/YYYY H:MM.
        retry = parsed.isna() & (text != "")
        if retry.any():
            parsed[retry] = pd.to_datetime(text[retry], format="ISO8601", errors="coerce")
    parsed = pd.to_datetime(parsed, errors="coerce")
    return parsed.dt.tz_localize("UTC") if parsed.dt.tz is None else parsed.dt.tz_convert("UTC")


def _convert_online_retail(src: Path) -> Converted:
    path = _single_file(src, (".csv", ".xlsx", ".xlsm", ".xls"), "Online Retail")
    raw, encoding = _read_retail(path)

    invoice = _id_str(raw["InvoiceNo"])
    stock = _id_str(raw["StockCode"])
    customer = _id_str(raw["CustomerID"])
    desc = raw["Description"].astype("string").fillna("").str.strip().astype(str)
    qty = raw["Quantity"]
    qty = pd.to_numeric(qty.str.strip() if pd.api.types.is_string_dtype(qty) else qty, errors="coerce")
    when = _retail_dates(raw["InvoiceDate"])

    checks = [
        ("missing_customer_id", customer == "", "CustomerID", raw["CustomerID"]),
        ("bad_timestamp", when.isna(), "InvoiceDate", raw["InvoiceDate"]),
        ("bad_quantity", qty.isna(), "Quantity", raw["Quantity"]),
        ("missing_item", (stock == "") & (desc == ""), "StockCode", raw["StockCode"]),
    ]
    keep, rejected = split_rejects(raw, checks, str(path))

    stock, desc, customer = stock[keep], desc[keep], customer[keep]
    no_desc = desc == ""
    text = desc.where(~no_desc, "item " + stock)
    # Cancelled invoices carry a "C" prefix (their quantities are already negative; kept as given).
    is_return = invoice[keep].str.upper().str.startswith("C").to_numpy(dtype=bool)
    text = text.where(~is_return, "returned: " + text)
    micros = when[keep].dt.as_unit("us").astype("int64").to_numpy()
    events = pa.table(
        {
            "user_id": pa.array(customer.to_numpy(dtype=object), pa.string()),
            "ts": pa.array(micros).cast(TS_TYPE),
            "service": pa.array(np.where(is_return, "returns", "purchases").astype(object), pa.string()),
            "text": pa.array(text.to_numpy(dtype=object), pa.string()),
            "item_id": pa.array(stock.where(stock != "", None).to_numpy(dtype=object), pa.string()),
            "value": pa.array(qty[keep].to_numpy(dtype=np.float64)),
        }
    )

    attributes = None
    if "Country" in raw.columns:
        country = raw["Country"].astype("string").fillna("").str.strip()[keep]
        pairs = pd.DataFrame({"user_id": customer, "country": country})
        pairs = pairs[pairs["country"] != ""]
        # Most frequent country per customer; ties go to the alphabetically first, so reruns agree.
        tally = pairs.value_counts(["user_id", "country"]).rename("n").reset_index()
        tally = tally.sort_values(["user_id", "n", "country"], ascending=[True, False, True])
        attributes = tally.drop_duplicates("user_id")[["user_id", "country"]].reset_index(drop=True)
        attributes = attributes.astype({"user_id": str, "country": str})

    return Converted(
        variant="online-retail-" + ("xlsx" if encoding == "xlsx" else "csv"),
        events=events,
        rejected=rejected,
        rows_read=len(raw),
        source_files=[str(path)],
        encodings={str(path): encoding},
        attributes=attributes,
        counts={
            "text_from_stock_code": int(no_desc.sum()),
            "returns": int(is_return.sum()),
            "negative_quantity_purchases": int(((qty[keep].to_numpy() < 0) & ~is_return).sum()),
        },
    )


