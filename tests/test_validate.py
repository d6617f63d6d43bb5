"""Row validation, case by case, and the accounting invariant under messy generated input."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userfm.data.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA
from userfm.data.validate import REASONS, Rules, parse_json_lines, validate_batch

UTC = dt.timezone.utc
GOOD = {"user_id": "u1", "ts": "2024-01-02T03:04:05Z", "service": "shopping", "text": "red shoes", "value": "9.5"}


def one(row: dict, rules: Rules = Rules()):
    table = pa.table({k: pa.array([v], pa.string()) for k, v in row.items()})
    return validate_batch(table, rules, source="f.csv")


def test_good_row_is_canonical():
    res = one({**GOOD, "item_id": " i9 ", "category": "Sports > Running > Shoes"})
    assert res.quarantined.num_rows == 0
    assert res.kept.schema == EVENT_SCHEMA
    row = res.kept.to_pylist()[0]
    assert row == {
        "user_id": "u1",
        "ts": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "service": "shopping",
        "text": "red shoes",
        "item_id": "i9",
        "category": ["Sports", "Running", "Shoes"],
        "value": 9.5,
    }


@pytest.mark.parametrize(
    "patch, reason, detail",
    [
        ({"user_id": None}, "missing_field", "user_id: required field is null or empty"),
        ({"user_id": "   "}, "missing_field", "user_id: required field is null or empty"),
        ({"service": None}, "missing_field", "service: required field is null or empty"),
        ({"text": None}, "missing_field", "text: required field is null or empty"),
        ({"ts": None}, "missing_field", "ts: required field is null or empty"),
        ({"ts": "yesterday"}, "bad_type", "ts: cannot parse 'yesterday' as a timestamp"),
        ({"ts": "²"}, "bad_type", "ts: cannot parse '²' as a timestamp"),  # isdigit() but not a number
        ({"value": "lots"}, "bad_type", "value: cannot parse 'lots' as a number"),
        ({"category": "[1, "}, "bad_type", "category: cannot parse '[1, ' as a path"),
        ({"text": " \t "}, "empty_text", "text: empty or whitespace only"),
        ({"ts": "1970-01-01"}, "ts_out_of_range", "ts: 1970-01-01T00:00:00+00:00 outside [1980-01-01, 2100-01-01)"),
        ({"ts": "2100-01-01"}, "ts_out_of_range", "ts: 2100-01-01T00:00:00+00:00 outside [1980-01-01, 2100-01-01)"),
    ],
)
def test_each_bad_field_is_quarantined_with_reason_and_detail(patch, reason, detail):
    res = one({**GOOD, **patch})
    assert res.kept.num_rows == 0
    q = res.quarantined.to_pylist()[0]
    assert (q["source"], q["reason"], q["detail"]) == ("f.csv", reason, detail)
    assert json.loads(q["raw"])["user_id"] == {**GOOD, **patch}["user_id"]


def test_missing_column_names_the_column():
    table = pa.table({"user_id": ["a"], "ts": ["2024-01-01"], "text": ["t"]})
    res = validate_batch(table, Rules())
    assert res.quarantined.to_pylist()[0]["detail"] == "service: column is missing from the input"


def test_unknown_service_only_when_a_list_is_given():
    assert one({**GOOD, "service": "tv"}).kept.num_rows == 1
    res = one({**GOOD, "service": "tv"}, Rules(services=("shopping", "news")))
    assert res.quarantined.to_pylist()[0]["detail"] == "service: 'tv' not in ['shopping', 'news']"


def test_long_text_truncate_or_reject():
    long = "é" * 20
    res = one({**GOOD, "text": long}, Rules(max_text_chars=8))
    assert res.kept.column("text").to_pylist() == ["é" * 8] and res.truncated == 1
    res = one({**GOOD, "text": long}, Rules(max_text_chars=8, long_text="reject"))
    assert res.quarantined.to_pylist()[0]["detail"] == "text: 20 chars > max_text_chars=8"


def test_first_failure_wins():
    res = one({**GOOD, "user_id": None, "ts": "bad", "text": " "})
    assert res.quarantined.column("reason").to_pylist() == ["missing_field"]


def test_timestamp_forms_all_parse_to_the_same_instant():
    want = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    for ts in ["2024-01-02T03:04:05Z", "2024-01-02 03:04:05", "2024-01-02T05:04:05+02:00", "1704164645"]:
        assert one({**GOOD, "ts": ts}).kept.column("ts")[0].as_py() == want, ts
    ms = pa.table({"user_id": ["u"], "ts": [1704164645000], "service": ["s"], "text": ["t"]})
    assert validate_batch(ms, Rules(numeric_ts_unit="ms")).kept.column("ts")[0].as_py() == want
    # mixed forms in one column take the per-row path and still agree
    mixed = pa.table({"user_id": ["a", "b"], "ts": ["2024-01-02T03:04:05Z", "2024-01-02 03:04:05"], "service": ["s", "s"], "text": ["t", "t"]})
    assert validate_batch(mixed, Rules()).kept.column("ts").to_pylist() == [want, want]


def test_float_ids_from_csv_readers_lose_the_trailing_zero():
    table = pa.table({"user_id": [17850.0, 1.5], "ts": ["2024-01-01", "2024-01-01"], "service": ["s", "s"], "text": ["t", "t"]})
    assert validate_batch(table, Rules()).kept.column("user_id").to_pylist() == ["17850", "1.5"]


def test_category_forms():
    table = pa.table(
        {
            "user_id": ["a"] * 4,
            "ts": ["2024-01-01"] * 4,
            "service": ["s"] * 4,
            "text": ["t"] * 4,
            "category": ['["A", "B"]', "A >  > B ", "", None],
        }
    )
    res = validate_batch(table, Rules())
    assert res.kept.column("category").to_pylist() == [["A", "B"], ["A", "B"], None, None]


def test_json_lines_keep_malformed_lines_verbatim():
    lines = [json.dumps({**GOOD}), "{not json", "[1, 2]", json.dumps({**GOOD, "value": [1]})]
    res = validate_batch(parse_json_lines(lines), Rules(), source="x.jsonl")
    assert res.kept.num_rows == 1
    q = res.quarantined.to_pylist()
    assert [r["reason"] for r in q] == ["malformed_row", "malformed_row", "bad_type"]
    assert [r["raw"] for r in q[:2]] == ["{not json", "[1, 2]"]


# ---------------------------------------------------------------------- property: nothing is lost

_messy_text = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["", "  ", "x" * 40]))
_messy_ts = st.one_of(
    st.none(),
    st.sampled_from(["2024-05-01T00:00:00Z", "2024-05-01 10:00", "1700000000", "1900-01-01", "2200-01-01", "nope", ""]),
    st.text(max_size=6),
)
_MESSY_FIELDS = ("user_id", "ts", "service", "text", "value", "category")
_messy_row = st.fixed_dictionaries(
    {
        "user_id": st.one_of(st.none(), st.sampled_from(["u1", "u2", " ", ""]), st.text(max_size=4)),
        "ts": _messy_ts,
        "service": st.one_of(st.none(), st.sampled_from(["shopping", "news", "tv", ""])),
        "text": _messy_text,
        "value": st.one_of(st.none(), st.sampled_from(["1", "-2.5", "abc", ""]), st.text(max_size=3)),
        "category": st.one_of(st.none(), st.sampled_from(["A > B", "[\"A\"]", "[bad", ""])),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_messy_row, min_size=0, max_size=30))
def test_accounting_holds_for_messy_rows(rows):
    from userfm.data.sequences import build_partition

    table = pa.table({k: pa.array([r[k] for r in rows], pa.string()) for k in _MESSY_FIELDS})
    res = validate_batch(table, Rules(services=("shopping", "news"), max_text_chars=30, long_text="reject"))
    assert res.kept.num_rows + res.quarantined.num_rows == len(rows)
    assert sum(res.reason_counts().values()) == res.quarantined.num_rows
    assert set(res.reason_counts()) <= set(REASONS)
    assert res.quarantined.schema == QUARANTINE_SCHEMA
    # what survives validation is clean: the dedupe/sequence step then accounts for every kept row
    part = build_partition(res.kept, max_events=5, fractions=(0.8, 0.1, 0.1))
    assert part.events.num_rows + part.duplicates.num_rows == res.kept.num_rows
    assert part.stats["events_in_sequences"] + part.stats["events_beyond_max_events"] == part.events.num_rows
