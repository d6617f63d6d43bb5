"""Tests for ``userfm convert recbole``: tiny RecBole atomic files written here, exact values checked."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from userfm.cli import main
from userfm.data.convert import FORMATS, ConvertError, convert
from userfm.data.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA

UTC = dt.timezone.utc
EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)  # the order-only clock: inside ingest's valid range


def _write(path: Path, header: str, *rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join((header,) + rows) + "\n", encoding="utf-8")
    return path


def _events(out: Path) -> list[dict]:
    table = pq.read_table(out / "events.parquet")
    assert table.schema.equals(EVENT_SCHEMA, check_metadata=True)
    return table.to_pylist()


def _rejected(out: Path) -> list[dict]:
    table = pq.read_table(out / "rejected.parquet")
    assert table.schema.equals(QUARANTINE_SCHEMA)
    return table.to_pylist()


def _sequences(out: Path) -> dict[str, list[str]]:
    """user -> item ids in the order events.parquet holds them (sorted by user, then ts)."""
    seqs: dict[str, list[str]] = {}
    for e in _events(out):
        seqs.setdefault(e["user_id"], []).append(e["item_id"])
    return seqs


def _check_manifest(m: dict, out: Path) -> None:
    assert json.loads((out / "convert_manifest.json").read_text()) == m
    events, rejected = _events(out), _rejected(out)
    assert m["events_written"] == len(events)
    assert m["rejected_total"] == len(rejected) == sum(m["rejected"].values())
    assert m["rows_read"] == m["events_written"] + m["rejected_total"]
    assert sum(m["services"].values()) == len(events)
    assert m["users"] == len({e["user_id"] for e in events})
    assert m["time_note"]


def _by_line(rows: list[dict]) -> dict[int, tuple[str, str]]:
    return {int(r["detail"].split(":")[0].removeprefix("line ")): (r["reason"], r["detail"]) for r in rows}


# ---------------------------------------------------------------------------------------------------
# Atomic layout


def _shop(tmp_path: Path) -> Path:
    """Two services from the item's domain, positions as timestamps (like the Amazon cross-domain set)."""
    src = tmp_path / "shop"
    _write(src / "shop.inter", "user_id:token\titem_id:token\ttimestamp:float",
           "u1\ti1\t1",
           "u1\ti2\t0",
           "u2\ti3\t0",
           "u1\ti3\t2",
           "u2\ti1\t1",
           "u2\ti9\t2",   # line 7: i9 is not in shop.item
           "u3\ti4\t0")   # line 8: i4 has no domain
    _write(src / "shop.item", "item_id:token\tdomain:token\tcategories:token_seq\ttitle:token_seq\tprice:float",
           "i1\tarts\tarts crafts paint\tacrylic   paint set\t3.5",
           "i2\toffice\toffice paper\ta4 paper\t",
           "i3\toffice\t\tstapler\t1",
           "i4\t\tmisc\tmystery box\t2",
           "i1\tarts\tarts crafts paint\tacrylic   paint set\t3.5")  # the same row twice: dropped, counted
    return src


def test_atomic_ordinal_service_field_text_and_category(tmp_path):
    src, out = _shop(tmp_path), tmp_path / "out"

    m = convert("recbole", src, out, service_field="domain")

    _check_manifest(m, out)
    assert (m["variant"], m["time"]) == ("recbole-atomic", "ordinal")
    assert (m["rows_read"], m["events_written"], m["rejected"]) == (7, 5, {"missing_service": 2})
    assert m["services"] == {"arts": 2, "office": 3} and m["users"] == 2
    assert m["counts"] == {"blank_lines": 0, "events_without_text": 0, "items_without_text": 0,
                           "events_with_unknown_item": 0, "duplicate_events": 0, "duplicate_item_rows": 1}
    assert m["details"]["layout"] == "atomic" and m["details"]["text_fields"] == ["title", "categories"]
    assert m["details"]["category_field"] == "categories" and m["attributes"] is None
    # round trip: each user's items in timestamp order, ts = epoch + position
    assert _sequences(out) == {"u1": ["i2", "i1", "i3"], "u2": ["i3", "i1"]}
    first, second, third = [e for e in _events(out) if e["user_id"] == "u1"]
    assert first == {"user_id": "u1", "ts": EPOCH, "service": "office", "text": "a4 paper | office paper",
                     "item_id": "i2", "category": ["office", "paper"], "value": None}
    # title first (though after categories in the header), whitespace folded
    assert (second["text"], second["category"], second["service"]) == (
        "acrylic paint set | arts crafts paint", ["arts", "crafts", "paint"], "arts")
    assert second["ts"] == EPOCH + dt.timedelta(seconds=1)
    assert (third["text"], third["category"], third["ts"]) == ("stapler", None, EPOCH + dt.timedelta(seconds=2))
    assert _by_line(_rejected(out)) == {
        7: ("missing_service", "line 7: item_id='i9' has no 'domain' value in shop.item"),
        8: ("missing_service", "line 8: item_id='i4' has no 'domain' value in shop.item"),
    }
    raw = json.loads(_rejected(out)[0]["raw"])
    assert raw == {"user_id": "u2", "item_id": "i9", "timestamp": "2"}


def test_atomic_default_service_and_forced_time(tmp_path):
    src = _shop(tmp_path)
    m = convert("recbole", src / "shop.item", tmp_path / "a", service=None)  # any of the set's files works
    assert m["services"] == {"shop": 7} and m["rejected_total"] == 0
    assert m["counts"]["events_with_unknown_item"] == 1 and m["counts"]["items_without_text"] == 1
    assert [e["text"] for e in _events(tmp_path / "a") if e["item_id"] == "i9"] == ["item i9"]

    m = convert("recbole", src, tmp_path / "b", service="shopping", category_field="title", time="real")
    assert (m["time"], m["services"]) == ("real", {"shopping": 7})
    assert "unix seconds" in m["time_note"]
    e = [e for e in _events(tmp_path / "b") if e["item_id"] == "i2"][0]
    assert (e["ts"], e["category"]) == (dt.datetime(1970, 1, 1, tzinfo=UTC), ["a4", "paper"])  # position 0 read as unix 0


def test_atomic_real_time_rating_and_quarantine(tmp_path):
    src = _write(tmp_path / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                 "1\t10\t4.5\t978300760",
                 "1\t11\t3\t978300700",
                 "2\t10\t\t978300800",       # no rating: an event without a value
                 "2\t\t5\t978300801",        # line 5
                 "\t10\t5\t978300802",       # line 6
                 "2\t12\tfive\t978300803",   # line 7
                 "2\t13\t4\tx",              # line 8
                 "3\t14\t4",                 # line 9
                 "3\t15\t4\t978300900\textra",  # line 10
                 "",                         # line 11: blank, not a row
                 "3\t16\t2\t",               # line 12
                 "3\t17\t1\t1e13",           # line 13: past year 9999
                 "1\t10\t4.5\t978300760")    # line 14: a repeat, kept
    out = tmp_path / "out"

    m = convert("recbole", src, out)

    _check_manifest(m, out)
    assert (m["time"], m["services"]) == ("real", {"ml": 4})
    assert (m["rows_read"], m["events_written"], m["rejected_total"]) == (12, 4, 8)
    assert m["counts"]["blank_lines"] == 1 and m["counts"]["duplicate_events"] == 1
    assert m["details"]["value_field"] == "rating"
    events = _events(out)
    assert [(e["user_id"], e["item_id"], e["value"]) for e in events] == [
        ("1", "11", 3.0), ("1", "10", 4.5), ("1", "10", 4.5), ("2", "10", None)]
    assert events[0]["ts"] == dt.datetime(2000, 12, 31, 22, 11, 40, tzinfo=UTC)
    assert events[0]["text"] == "item 11" and events[0]["category"] is None
    rejected = _rejected(out)
    assert _by_line(rejected) == {
        5: ("missing_item_id", "line 5: item_id=''"),
        6: ("missing_user_id", "line 6: user_id=''"),
        7: ("bad_float", "line 7: rating='five'"),
        8: ("bad_float", "line 8: timestamp='x'"),
        9: ("wrong_field_count", "line 9: 3 tab-separated fields, the header has 4 (user_id, item_id, rating, timestamp)"),
        10: ("wrong_field_count", "line 10: 5 tab-separated fields, the header has 4 (user_id, item_id, rating, timestamp)"),
        12: ("missing_timestamp", "line 12: timestamp=''"),
        13: ("bad_timestamp", "line 13: timestamp='1e13'"),
    }
    raws = {r["detail"][:8]: json.loads(r["raw"]) for r in rejected}
    assert raws["line 7: "] == {"user_id": "2", "item_id": "12", "rating": "five", "timestamp": "978300803"}
    assert raws["line 9: "] == "3\t14\t4"
    assert {r["source"] for r in rejected} == {str(src)}


def test_ordinal_detection_needs_exact_positions(tmp_path):
    def run(name: str, stamps: list[str], **kw) -> dict:
        rows = [f"{u}\t{i}\t{t}" for (u, i), t in zip([("a", "x"), ("a", "y"), ("b", "x")], stamps)]
        _write(tmp_path / name / f"{name}.inter", "user_id:token\titem_id:token\ttimestamp:float", *rows)
        return convert("recbole", tmp_path / name, tmp_path / f"{name}-out", **kw)

    assert run("zero", ["1", "0", "0"])["time"] == "ordinal"
    assert run("onebased", ["1", "2", "1"])["time"] == "real"  # 1..n is not 0..n-1
    assert run("halves", ["0.5", "0", "0"])["time"] == "real"
    assert run("gap", ["0", "2", "0"])["time"] == "real"
    m = run("forced", ["978300760", "978300700", "5"], time="ordinal")
    assert m["time"] == "ordinal"
    assert [(e["item_id"], e["ts"]) for e in _events(tmp_path / "forced-out")] == [
        ("y", EPOCH), ("x", EPOCH + dt.timedelta(seconds=1)), ("x", EPOCH)]
    # a rejected row leaves a gap in the positions, it does not turn ordinal into real
    _write(tmp_path / "holes" / "holes.inter", "user_id:token\titem_id:token\ttimestamp:float",
           "a\tx\t0", "a\t\t1", "a\tz\t2")
    m = convert("recbole", tmp_path / "holes", tmp_path / "holes-out")
    assert (m["time"], m["rejected"]) == ("ordinal", {"missing_item_id": 1})
    assert [e["ts"] for e in _events(tmp_path / "holes-out")] == [EPOCH, EPOCH + dt.timedelta(seconds=2)]


def test_no_timestamp_file_order_and_user_attributes(tmp_path):
    src = tmp_path / "feed"
    rows = ["0\t266", "1\t5", "0\t636", "0\t550", "1\t266"]
    _write(src / "feed.inter", "user_id:token\titem_id:token", *rows)
    _write(src / "feed.user", "user_id:token\tage_group:token\tscore:float\ttags:token_seq",
           "0\t2\t0.5\tnews  sport", "1\t0\t\t", "7\t1\t3\tx", "1\t0\t\t")
    out = tmp_path / "out"

    m = convert("recbole", src, out)

    _check_manifest(m, out)
    assert (m["time"], m["rows_read"], m["events_written"]) == ("none", 5, 5)
    assert "no timestamp" in m["time_note"]
    assert m["services"] == {"feed": 5} and m["attributes"] == ["age_group", "score", "tags"]
    assert m["counts"]["duplicate_user_rows"] == 1 and m["counts"]["attribute_users_without_events"] == 1
    assert m["counts"]["items_without_text"] == 4 and m["counts"]["events_without_text"] == 5
    # round trip: the inter rows, per user, in file order; ts = epoch + position
    expected: dict[str, list[str]] = {}
    for row in rows:
        u, i = row.split("\t")
        expected.setdefault(u, []).append(i)
    assert _sequences(out) == expected
    assert [e["ts"] for e in _events(out) if e["user_id"] == "0"] == [EPOCH + dt.timedelta(seconds=s) for s in range(3)]
    attrs = pq.read_table(out / "attributes.parquet").to_pylist()
    assert attrs == [  # token_seq kept as its text; an empty float is null; the repeated row once
        {"user_id": "0", "age_group": "2", "score": 0.5, "tags": "news  sport"},
        {"user_id": "1", "age_group": "0", "score": None, "tags": ""},
        {"user_id": "7", "age_group": "1", "score": 3.0, "tags": "x"},
    ]


# ---------------------------------------------------------------------------------------------------
# Pre-split layout (UniSRec): history + target rows, histories cut to the last 3 items here (UniSRec: 50)

SEQ_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


def _unisrec(tmp_path: Path) -> Path:
    src = tmp_path / "bench"
    # A: a b c d e f. UniSRec writes train rows last target first; valid/test histories are cut to 3.
    # B: x y z w, plus a row that contradicts it. C: m n o, with its valid row twice.
    _write(src / "bench.train.inter", SEQ_HEADER,
           "A\ta b c\td", "A\ta b\tc", "A\ta\tb",
           "B\tx\ty",
           "B\tq\tr",     # line 6: not a prefix of B's sequence
           "B\tx y")      # line 7: two fields
    _write(src / "bench.valid.inter", SEQ_HEADER,
           "A\tb c d\te", "B\tx y\tz", "C\tm\tn", "C\tm\tn",
           "\tm\tn")      # line 6: no user
    _write(src / "bench.test.inter", SEQ_HEADER, "A\tc d e\tf", "B\tx y z\tw", "C\tm n\to")
    _write(src / "bench.item", "item_id:token\tdomain:token\ttitle:token_seq",
           *[f"{i}\tarts\ttitle {i}" for i in "abcdef"], *[f"{i}\toffice\t" for i in "xyzwmn"], "o\t\tlast one")
    return src


def test_presplit_rebuilds_sequences_and_counts_add_up(tmp_path):
    src, out = _unisrec(tmp_path), tmp_path / "out"

    m = convert("recbole", src, out, service_field="domain")

    _check_manifest(m, out)
    assert (m["variant"], m["time"]) == ("recbole-presplit", "ordinal")
    assert m["details"]["layout"] == "pre-split" and m["details"]["splits"] == ["train", "valid", "test"]
    c = m["counts"]
    assert (c["rows_train"], c["rows_valid"], c["rows_test"], c["file_rows"]) == (6, 5, 3, 14)
    assert (c["rows_as_target"], c["rows_subsumed"], c["rows_rejected"]) == (10, 1, 3)
    assert (c["sequence_items"], c["events_from_history_only"], c["history_cap"]) == (13, 3, 3)
    assert c["file_rows"] == c["rows_as_target"] + c["rows_subsumed"] + c["rows_rejected"]
    assert c["sequence_items"] == c["rows_as_target"] + c["events_from_history_only"]
    assert m["rows_read"] == c["sequence_items"] + c["rows_rejected"] == 16
    assert (m["events_written"], m["rejected"]) == (12, {
        "inconsistent_sequence": 1, "missing_service": 1, "missing_user_id": 1, "wrong_field_count": 1})
    assert m["services"] == {"arts": 6, "office": 6}
    # round trip: each user's rebuilt sequence (C's last item has no domain, so it is rejected)
    assert _sequences(out) == {"A": list("abcdef"), "B": list("xyzw"), "C": list("mn")}
    a = [e for e in _events(out) if e["user_id"] == "A"]
    assert [e["ts"] for e in a] == [EPOCH + dt.timedelta(seconds=s) for s in range(6)]
    assert (a[5]["text"], a[5]["service"], a[5]["category"], a[5]["value"]) == ("title f", "arts", None, None)
    assert [e["text"] for e in _events(out) if e["user_id"] == "B"][0] == "item x"  # no title: no text
    train, valid, test = (str(src / f"bench.{s}.inter") for s in ("train", "valid", "test"))
    got = {(r["source"], r["reason"], r["detail"]) for r in _rejected(out)}
    assert got == {
        (train, "inconsistent_sequence", "line 6: item_id_list + item_id is not a prefix or window of user "
         "'B''s sequence of 4 items rebuilt from the split files"),
        (train, "wrong_field_count", "line 7: 2 tab-separated fields, the header has 3 (user_id, item_id_list, item_id)"),
        (valid, "missing_user_id", "line 6: user_id=''"),
        (test, "missing_service", "line 4: position 2: item_id='o' has no 'domain' value in bench.item"),
    }
    raw = {r["reason"]: json.loads(r["raw"]) for r in _rejected(out)}
    assert raw["inconsistent_sequence"] == {"user_id": "B", "item_id_list": "q", "item_id": "r"}
    assert raw["missing_service"] == {"user_id": "C", "position": 2, "item_id": "o"}


def test_presplit_without_train_file(tmp_path):
    """Only valid + test: cut histories chain, and an uncut row longer than the rest extends the sequence."""
    src = tmp_path / "vt"
    _write(src / "vt.valid.inter", SEQ_HEADER, "P\tp q r\ts", "G\tg\th")
    _write(src / "vt.test.inter", SEQ_HEADER, "P\tq r s\tt", "G\tg h i\tj")
    out = tmp_path / "out"

    m = convert("recbole", src / "vt.test.inter", out)

    _check_manifest(m, out)
    assert _sequences(out) == {"P": list("pqrst"), "G": list("ghij")}
    assert m["services"] == {"vt": 9} and m["rejected_total"] == 0
    c = m["counts"]
    assert (c["file_rows"], c["rows_as_target"], c["events_from_history_only"], c["sequence_items"]) == (4, 4, 5, 9)
    assert "rows_train" not in c and m["details"]["splits"] == ["valid", "test"]


# ---------------------------------------------------------------------------------------------------
# Errors, other formats, the command line


@pytest.mark.parametrize("header, message", [
    ("", r"x.inter: line 1: no header"),
    ("user_id\titem_id:token", r"x.inter: line 1: field 'user_id' has no :type"),
    ("user_id:token\titem_id:int", r"x.inter: line 1: field 'item_id': unknown type 'int'"),
    ("user_id:token\ttimestamp:float", r"x.inter: line 1: no 'item_id' field"),
    ("user_id:token\titem_id:token\tuser_id:token", r"x.inter: line 1: field 'user_id' appears twice"),
    ("user_id:token\titem_id:token\ttimestamp:token", r"x.inter: line 1: field 'timestamp' is token; expected float"),
])
def test_bad_inter_header_names_file_line_and_field(tmp_path, header, message):
    _write(tmp_path / "x.inter", header, "u\ti\t1")
    with pytest.raises(ConvertError, match=message):
        convert("recbole", tmp_path, tmp_path / "out")


def test_bad_item_and_user_files(tmp_path):
    _write(tmp_path / "x.inter", "user_id:token\titem_id:token", "u\ti1")
    item = _write(tmp_path / "x.item", "item_id:token\ttitle:token_seq", "i1\tone", "i1\tanother one")
    with pytest.raises(ConvertError, match=r"x.item: line 3: field 'item_id': 'i1' is also on line 2 with different content"):
        convert("recbole", tmp_path, tmp_path / "out")
    _write(item, "item_id:token\ttitle:token_seq", "i1")
    with pytest.raises(ConvertError, match=r"x.item: line 2: 1 tab-separated fields, the header has 2"):
        convert("recbole", tmp_path, tmp_path / "out")
    _write(item, "item_id:token\ttitle:token_seq", "i1\tone")
    with pytest.raises(ConvertError, match=r"x.item: line 1: no field 'domain' for service_field"):
        convert("recbole", tmp_path, tmp_path / "out", service_field="domain")
    with pytest.raises(ConvertError, match=r"x.item: line 1: field 'title' is token_seq; service_field needs a token"):
        convert("recbole", tmp_path, tmp_path / "out", service_field="title")
    with pytest.raises(ConvertError, match="either service"):
        convert("recbole", tmp_path, tmp_path / "out", service="s", service_field="title")
    _write(tmp_path / "x.user", "user_id:token\tscore:float", "u\t1", "v\tabc")
    with pytest.raises(ConvertError, match=r"x.user: line 3: field 'score': not a number: 'abc'"):
        convert("recbole", tmp_path, tmp_path / "out")
    item.unlink()
    (tmp_path / "x.user").unlink()
    with pytest.raises(ConvertError, match=r"x.item: no such file; service_field 'domain'"):
        convert("recbole", tmp_path, tmp_path / "out", service_field="domain")


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(ConvertError, match="no RecBole interaction file"):
        convert("recbole", tmp_path, tmp_path / "out")
    _write(tmp_path / "a.inter", "user_id:token\titem_id:token", "u\ti")
    _write(tmp_path / "a.train.inter", SEQ_HEADER, "u\ti\tj")
    with pytest.raises(ConvertError, match=r"several RecBole data sets: a \(atomic\), a \(pre-split\)"):
        convert("recbole", tmp_path, tmp_path / "out")
    with pytest.raises(ConvertError, match="positions, not times"):
        convert("recbole", tmp_path / "a.train.inter", tmp_path / "out", time="real")
    with pytest.raises(ConvertError, match=r"a.inter: line 1: no 'timestamp' field, so time 'ordinal'"):
        convert("recbole", tmp_path / "a.inter", tmp_path / "out", time="ordinal")
    with pytest.raises(ConvertError, match="time must be one of auto, real, ordinal"):
        convert("recbole", tmp_path / "a.inter", tmp_path / "out", time="sometimes")
    with pytest.raises(ConvertError, match="service_field applies to recbole only"):
        convert("movielens", tmp_path, tmp_path / "out", service_field="domain")
    assert "recbole" in FORMATS


def test_other_formats_say_time_is_real(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp", "1,1,4.0,964982703")
    _write(tmp_path / "movies.csv", "movieId,title,genres", "1,Toy Story (1995),Comedy")
    m = convert("movielens", tmp_path, tmp_path / "out")
    assert m["time"] == "real" and "when the event happened" in m["time_note"]


def test_cli_convert_recbole(tmp_path, capsys):
    src, out = _shop(tmp_path), tmp_path / "out"
    assert main(["convert", "recbole", str(src), str(out), "--service-field", "domain", "--time", "ordinal"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "convert_manifest.json").read_text())
    assert (printed["time"], printed["services"]) == ("ordinal", {"arts": 2, "office": 3})

    _write(src / "shop.inter", "user_id:token\titem_id")
    assert main(["convert", "recbole", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("userfm convert: error: ") and "shop.inter: line 1: field 'item_id' has no :type" in err

    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "recbole" in help_text and "--service-field" in help_text and "--time" in help_text
