"""Tests for userfm.data.convert: each test writes a tiny copy of a real format and checks exact values."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from userfm.data.convert import FORMATS, ConvertError, convert
from userfm.data.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA

UTC = dt.timezone.utc
ML100K_GENRES = (
    "unknown|0\nAction|1\nAdventure|2\nAnimation|3\nChildren's|4\nComedy|5\nCrime|6\nDocumentary|7\nDrama|8\n"
    "Fantasy|9\nFilm-Noir|10\nHorror|11\nMusical|12\nMystery|13\nRomance|14\nSci-Fi|15\nThriller|16\nWar|17\n"
    "Western|18\n\n"
)


def _flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


def _events(out: Path) -> pa.Table:
    table = pq.read_table(out / "events.parquet")
    assert table.schema.equals(EVENT_SCHEMA, check_metadata=True)
    return table


def _event(out: Path, **where) -> dict:
    """The one event whose columns equal ``where``."""
    rows = [r for r in _events(out).to_pylist() if all(r[k] == v for k, v in where.items())]
    assert len(rows) == 1, rows
    return rows[0]


def _check_manifest(manifest: dict, out: Path) -> None:
    """The manifest adds up and agrees with the files on disk."""
    assert json.loads((out / "convert_manifest.json").read_text()) == manifest
    events = _events(out)
    rejected = pq.read_table(out / "rejected.parquet")
    assert rejected.schema.equals(QUARANTINE_SCHEMA)
    assert manifest["events_written"] == events.num_rows
    assert manifest["rejected_total"] == rejected.num_rows == sum(manifest["rejected"].values())
    assert manifest["rows_read"] == manifest["events_written"] + manifest["rejected_total"]
    assert sum(manifest["services"].values()) == events.num_rows
    assert manifest["users"] == len(set(events.column("user_id").to_pylist()))


# ---------------------------------------------------------------------------------------------------
# MovieLens


def test_movielens_100k(tmp_path):
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text(
        "1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\t4\t888550871\n2\t3\t2\t888550900\n2\t2\tx\t888550901\n"
    )
    (src / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{_flags(3, 4, 5)}\n"
            f"2|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/Mis%E9rables|{_flags(8)}\n"
            f"3|unknown||||{_flags(0)}\n"
        ).encode("latin-1")
    )
    (src / "u.genre").write_text(ML100K_GENRES)
    (src / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|01002\n")
    out = tmp_path / "out"

    m = convert("movielens", src, out)

    _check_manifest(m, out)
    assert m["variant"] == "ml-100k"
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (5, 4, {"bad_rating": 1})
    assert m["services"] == {"ratings": 4} and m["users"] == 2
    assert m["encodings"][str(src / "u.item")] == "latin-1"
    toy = _event(out, user_id="1", item_id="1")
    assert toy["text"] == "Toy Story (1995) | Animation, Children's, Comedy | rated 5.0/5"
    assert toy["category"] == ["Movie", "Animation"]
    assert toy["value"] == 5.0
    assert toy["ts"] == dt.datetime(1997, 9, 22, 22, 2, 38, tzinfo=UTC)
    assert _event(out, user_id="1", item_id="2")["text"] == "Misérables, Les (1995) | Drama | rated 3.0/5"
    # ML-100K's "unknown" genre is "no genre": no genre text, no category.
    unknown = _event(out, user_id="2", item_id="3")
    assert (unknown["text"], unknown["category"]) == ("unknown | rated 2.0/5", None)
    bad = pq.read_table(out / "rejected.parquet").to_pylist()[0]
    assert bad["detail"] == "rating='x'"
    assert json.loads(bad["raw"]) == {"user": "2", "item": "2", "rating": "x", "ts": "888550901"}
    attrs = pq.read_table(out / "attributes.parquet").to_pylist()
    assert attrs == [
        {"user_id": "1", "gender": "M", "age": 24, "age_bracket": "18-24", "occupation": "technician", "zip": "85711"},
        {"user_id": "2", "gender": "F", "age": 53, "age_bracket": "50-55", "occupation": "other", "zip": "01002"},
    ]


def test_movielens_1m(tmp_path):
    src = tmp_path / "ml-1m"
    src.mkdir()
    (src / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::73::4::978298413\n")
    (src / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "73::Misérables, Les (1995)::Drama|Musical\n".encode("latin-1")
    )
    (src / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    out = tmp_path / "out"

    m = convert("movielens", src / "ratings.dat", out)  # a file inside the folder works too

    _check_manifest(m, out)
    assert m["variant"] == "ml-1m"
    assert (m["rows_read"], m["events_written"], m["rejected_total"]) == (3, 3, 0)
    ev = _event(out, user_id="2")
    assert ev["text"] == "Misérables, Les (1995) | Drama, Musical | rated 4.0/5"
    assert ev["category"] == ["Movie", "Drama"] and ev["item_id"] == "73"
    peach = _event(out, item_id="661")
    assert peach["text"] == "James and the Giant Peach (1996) | Animation, Children's, Musical | rated 3.0/5"
    assert _event(out, item_id="1193")["ts"] == dt.datetime(2000, 12, 31, 22, 12, 40, tzinfo=UTC)
    attrs = pq.read_table(out / "attributes.parquet").to_pylist()
    assert attrs == [
        {"user_id": "1", "gender": "F", "age": "Under 18", "age_bracket": "Under 18",
         "occupation": "K-12 student", "zip": "48067"},
        {"user_id": "2", "gender": "M", "age": "56+", "age_bracket": "56+",
         "occupation": "self-employed", "zip": "70072"},
    ]


def test_movielens_latest_small(tmp_path):
    src = tmp_path / "ml-latest-small"
    src.mkdir()
    (src / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "99,Some Film (2015),(no genres listed)\n"
    )
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,11,3.5,964981247\n2,99,5.0,1445714835\n1,500,2.0,964982000\n2,,4.0,1445714835\n"
    )
    (src / "tags.csv").write_text('userId,movieId,tag,timestamp\n2,11,"politics, romance",1445715000\n')
    out = tmp_path / "out"
    (out).mkdir()
    (out / "attributes.parquet").write_bytes(b"stale output of an earlier run")

    m = convert("movielens", src, out)

    _check_manifest(m, out)
    assert m["variant"] == "ml-latest"
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (6, 5, {"missing_item_id": 1})
    assert m["services"] == {"ratings": 4, "tags": 1} and m["users"] == 2
    assert m["counts"]["events_with_unknown_movie"] == 1
    ev = _event(out, user_id="1", item_id="11")
    assert ev["text"] == "American President, The (1995) | Comedy, Drama, Romance | rated 3.5/5"
    assert ev["ts"] == dt.datetime(2000, 7, 30, 18, 20, 47, tzinfo=UTC)
    tag = _event(out, service="tags")
    assert tag["text"] == "American President, The (1995) | Comedy, Drama, Romance | tagged: politics, romance"
    assert (tag["value"], tag["category"], tag["user_id"]) == (None, ["Movie", "Comedy"], "2")
    assert tag["ts"] == dt.datetime(2015, 10, 24, 19, 30, tzinfo=UTC)
    nogenre = _event(out, item_id="99")
    assert (nogenre["text"], nogenre["category"]) == ("Some Film (2015) | rated 5.0/5", None)
    assert _event(out, item_id="500")["text"] == "movie 500 | rated 2.0/5"
    assert m["attributes"] is None and not (out / "attributes.parquet").exists()


def test_movielens_errors_name_the_file(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    with pytest.raises(ConvertError, match="movies.csv"):
        convert("movielens", tmp_path, tmp_path / "out")
    (tmp_path / "movies.csv").write_text("movieId,name\n1,Toy Story (1995)\n")
    with pytest.raises(ConvertError, match=r"movies.csv.*missing column.*'title'"):
        convert("movielens", tmp_path, tmp_path / "out")

    dat = tmp_path / "ml-1m"
    dat.mkdir()
    (dat / "ratings.dat").write_text("1::1193::5::978300760::extra\n")
    (dat / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n")
    with pytest.raises(ConvertError, match=r"ratings.dat: expected 4 fields"):
        convert("movielens", dat, tmp_path / "out")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no MovieLens ratings file"):
        convert("movielens", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConvertError, match="nowhere"):
        convert("movielens", tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ConvertError, match="amazon-reviews only"):
        convert("movielens", tmp_path, tmp_path / "out", service="films")
    with pytest.raises(ConvertError, match="unknown format"):
        convert("netflix", tmp_path, tmp_path / "out")
    assert FORMATS == ("movielens", "online-retail", "amazon-reviews", "recbole")


# ---------------------------------------------------------------------------------------------------
# Online Retail

RETAIL_ROWS = [
    # InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country
    ("536365", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", 6, "12/1/2010 8:26", 2.55, 17850.0, "United Kingdom"),
    ("536365", "71053", "WHITE METAL LANTERN ", 6, "12/1/2010 8:26", 3.39, 17850.0, "United Kingdom"),
    ("C536379", "D", "Discount", -1, "12/1/2010 9:41", 27.5, 14527.0, "United Kingdom"),
    ("536414", "22139", "", 56, "12/1/2010 11:52", 0.0, None, "United Kingdom"),
    ("536544", "21773", "DECORATIVE ROSE BATHROOM BOTTLE", 1, "12/1/2010 14:32", 2.51, None, "United Kingdom"),
    ("536370", "22728", "", 24, "12/1/2010 8:45", 3.75, 12583.0, "France"),
    ("536371", "22086", "PAPER CHAIN KIT 50'S CHRISTMAS ", 80, "12/1/2010 9:00", 2.55, 17850.0, "France"),
    ("536372", "22632", "HAND WARMER RED POLKA DOT", 6, "12/1/2010 9:01", 1.85, 12583.0, "France"),
    ("536380", "21774", "CRÈME, ROSE BOTTLE", 1, "12/1/2010 14:32", 2.51, 14527.0, "United Kingdom"),
]
RETAIL_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID",
                  "Country"]


def _check_retail(m: dict, out: Path) -> None:
    _check_manifest(m, out)
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (9, 7, {"missing_customer_id": 2})
    assert m["services"] == {"purchases": 6, "returns": 1} and m["users"] == 3
    assert m["counts"]["text_from_stock_code"] == 1
    assert set(_events(out).column("user_id").to_pylist()) == {"17850", "14527", "12583"}
    ret = _event(out, service="returns")
    assert (ret["user_id"], ret["text"], ret["item_id"], ret["value"]) == ("14527", "returned: Discount", "D", -1.0)
    assert ret["ts"] == dt.datetime(2010, 12, 1, 9, 41, tzinfo=UTC)
    lantern = _event(out, item_id="71053")
    assert (lantern["text"], lantern["value"], lantern["category"]) == ("WHITE METAL LANTERN", 6.0, None)
    assert _event(out, item_id="22728")["text"] == "item 22728"
    assert _event(out, item_id="21774")["text"] == "CRÈME, ROSE BOTTLE"
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert [r["reason"] for r in rejected] == ["missing_customer_id"] * 2
    assert [str(json.loads(r["raw"])["InvoiceNo"]) for r in rejected] == ["536414", "536544"]  # raw: as read
    attrs = {r["user_id"]: r["country"] for r in pq.read_table(out / "attributes.parquet").to_pylist()}
    assert attrs == {"17850": "United Kingdom", "14527": "United Kingdom", "12583": "France"}


def test_online_retail_csv_latin1(tmp_path):
    frame = pd.DataFrame(RETAIL_ROWS, columns=RETAIL_COLUMNS)
    src = tmp_path / "Online Retail.csv"
    frame.to_csv(src, index=False, encoding="latin-1")  # CustomerID written as "17850.0", as in the wild
    assert "17850.0" in src.read_text(encoding="latin-1")
    out = tmp_path / "out"

    m = convert("online-retail", src, out)

    _check_retail(m, out)
    assert m["variant"] == "online-retail-csv" and m["encodings"] == {str(src): "latin-1"}
    raw = json.loads(pq.read_table(out / "rejected.parquet").to_pylist()[0]["raw"])
    assert raw == {"InvoiceNo": "536414", "StockCode": "22139", "Description": "", "Quantity": "56",
                   "InvoiceDate": "12/1/2010 11:52", "UnitPrice": "0.0", "CustomerID": "", "Country": "United Kingdom"}


def test_online_retail_xlsx_matches_csv(tmp_path):
    frame = pd.DataFrame(RETAIL_ROWS, columns=RETAIL_COLUMNS)
    # As in the UCI file: numeric invoice numbers are numbers, dates are datetimes, ids are floats.
    frame["InvoiceNo"] = [int(v) if v.isdigit() else v for v in frame["InvoiceNo"]]
    frame["StockCode"] = [int(v) if v.isdigit() else v for v in frame["StockCode"]]
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"], format="%m/%d/%Y %H:%M")
    frame["Description"] = frame["Description"].replace("", None)
    xlsx_dir = tmp_path / "xlsx"
    xlsx_dir.mkdir()
    frame.to_excel(xlsx_dir / "Online Retail.xlsx", index=False)
    pd.DataFrame(RETAIL_ROWS, columns=RETAIL_COLUMNS).to_csv(tmp_path / "retail.csv", index=False)

    m = convert("online-retail", xlsx_dir, tmp_path / "out-xlsx")  # a folder holding one file
    convert("online-retail", tmp_path / "retail.csv", tmp_path / "out-csv")

    _check_retail(m, tmp_path / "out-xlsx")
    assert m["variant"] == "online-retail-xlsx"
    assert _events(tmp_path / "out-xlsx").equals(_events(tmp_path / "out-csv"))
    raw = json.loads(pq.read_table(tmp_path / "out-xlsx" / "rejected.parquet").to_pylist()[0]["raw"])
    assert (raw["CustomerID"], raw["InvoiceDate"]) == (None, "2010-12-01 11:52:00")


def test_online_retail_errors(tmp_path):
    src = tmp_path / "retail.csv"
    pd.DataFrame(RETAIL_ROWS, columns=RETAIL_COLUMNS).drop(columns="CustomerID").to_csv(src, index=False)
    with pytest.raises(ConvertError, match=r"retail.csv: missing column.*CustomerID"):
        convert("online-retail", src, tmp_path / "out")
    bad = tmp_path / "broken.xlsx"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ConvertError, match="broken.xlsx"):
        convert("online-retail", bad, tmp_path / "out")
    with pytest.raises(ConvertError, match="exactly one"):
        convert("online-retail", tmp_path, tmp_path / "out")  # two candidate files


# ---------------------------------------------------------------------------------------------------
# Amazon reviews

REVIEWS_2018 = [
    {"overall": 5.0, "verified": True, "reviewTime": "10 24, 2013", "reviewerID": "A1", "asin": "0001",
     "style": {"Format:": " Hardcover"}, "reviewText": "Loved it.", "summary": "Great read",
     "unixReviewTime": 1382572800, "category": ["Books", "Fiction"]},
    {"overall": 3.0, "reviewerID": "A2", "asin": "0002",
     "reviewText": "Long   review\nwith a newline " + "x" * 300, "unixReviewTime": 1382572801},
    {"overall": 4.0, "asin": "0003", "summary": "no reviewer", "unixReviewTime": 1382572802},
]
REVIEWS_2023 = [
    {"rating": 4.0, "title": "Solid", "text": "ok", "asin": "B01", "parent_asin": "B00", "user_id": "U1",
     "timestamp": 1588687728923, "helpful_vote": 2, "verified_purchase": True},
    {"rating": 1.0, "title": "", "text": "", "asin": "B02", "user_id": "U2", "timestamp": 1588687728000},
]


def test_amazon_json_lines(tmp_path):
    src = tmp_path / "Books_5.json"
    src.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS_2018))
    out = tmp_path / "out"

    m = convert("amazon-reviews", src, out)

    _check_manifest(m, out)
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (3, 2, {"missing_user_id": 1})
    assert m["services"] == {"reviews": 2}
    first = _event(out, user_id="A1")
    assert first["text"] == "Great read | rated 5.0/5"
    assert (first["item_id"], first["value"], first["category"]) == ("0001", 5.0, ["Books", "Fiction"])
    assert first["ts"] == dt.datetime(2013, 10, 24, tzinfo=UTC)
    second = _event(out, user_id="A2")  # no summary: the review text, whitespace folded, first 200 chars
    assert second["text"] == ("Long review with a newline " + "x" * 300)[:200] + " | rated 3.0/5"
    assert second["category"] is None
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()[0]
    assert (rejected["reason"], rejected["detail"]) == ("missing_user_id", "line 3: no reviewerID/user_id")
    assert json.loads(rejected["raw"]) == REVIEWS_2018[2]


def test_amazon_pretty_printed_gzip_and_2023_fields(tmp_path):
    src = tmp_path / "reviews"
    src.mkdir()
    # Objects pretty-printed one after another (nested braces included), no commas or array around them.
    (src / "a_pretty.json").write_text("\n".join(json.dumps(r, indent=2) for r in REVIEWS_2018) + "\n")
    with gzip.open(src / "b_2023.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in REVIEWS_2023)
    (src / "notes.txt").write_text("not a review file")
    out = tmp_path / "out"

    m = convert("amazon-reviews", src, out, service="books")

    _check_manifest(m, out)
    assert m["source_files"] == [str(src / "a_pretty.json"), str(src / "b_2023.jsonl.gz")]
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (5, 4, {"missing_user_id": 1})
    assert m["services"] == {"books": 4} and m["users"] == 4
    assert _event(out, user_id="A1")["text"] == "Great read | rated 5.0/5"
    new = _event(out, user_id="U1")  # 2023: parent_asin is the item, timestamp is in milliseconds
    assert (new["item_id"], new["text"], new["value"]) == ("B00", "Solid | rated 4.0/5", 4.0)
    assert new["ts"] == dt.datetime(2020, 5, 5, 14, 8, 48, 923000, tzinfo=UTC)
    assert _event(out, user_id="U2")["text"] == "item B02 | rated 1.0/5"  # no title, no text
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()[0]
    assert rejected["source"] == str(src / "a_pretty.json")
    third_starts = 1 + sum(len(json.dumps(r, indent=2).splitlines()) for r in REVIEWS_2018[:2])
    assert rejected["detail"] == f"line {third_starts}: no reviewerID/user_id"


def test_amazon_broken_records_are_rejected_not_fatal(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text(
        json.dumps(REVIEWS_2018[0]) + "\n"
        '{"reviewerID": "A9", "asin": "0009", "overall": 5.0, \n'  # truncated record
        + json.dumps(REVIEWS_2018[1]) + "\n"
        + json.dumps({"reviewerID": "A7", "asin": "7", "overall": "five", "unixReviewTime": 1}) + "\n"
        + json.dumps({"reviewerID": "A8", "asin": "8", "overall": 2}) + "\n"
        + "[1]\n"
    )
    m = convert("amazon-reviews", src, tmp_path / "out")
    _check_manifest(m, tmp_path / "out")
    assert m["events_written"] == 2
    assert m["rejected"] == {"bad_json": 1, "bad_rating": 1, "missing_timestamp": 1, "not_an_object": 1}
    bad = [r for r in pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist() if r["reason"] == "bad_json"]
    assert bad[0]["detail"] == "line 2: not valid JSON" and bad[0]["raw"].startswith('{"reviewerID": "A9"')


def test_amazon_unreadable_gzip_names_the_file(tmp_path):
    src = tmp_path / "Books.json.gz"
    src.write_bytes(gzip.compress(b'{"reviewerID": "A1"}\n' * 100)[:40])  # cut short
    with pytest.raises(ConvertError, match="Books.json.gz"):
        convert("amazon-reviews", src, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no review files"):
        convert("amazon-reviews", empty, tmp_path / "out")
