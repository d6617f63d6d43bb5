"""Ray Data ingest end to end on files in three formats with injected bad rows of every kind."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.data.dataset import load_manifest, read_attributes, read_sequences, summarize
from userfm.data.ingest import IngestConfig, IngestError, expand_inputs, run_ingest
from userfm.data.schema import EVENT_SCHEMA
from userfm.data.sequences import assign_split

pytestmark = pytest.mark.timeout(240)
UTC = dt.timezone.utc


def write_inputs(root):
    """30 good Parquet events for 10 users + bad rows in CSV and JSON lines. Returns expected counts."""
    root.mkdir()
    good = []
    for u in range(10):
        for k in range(3):
            good.append(dict(
                user_id=f"u{u}", ts=dt.datetime(2024, 1, 1 + k, 12, tzinfo=UTC), service=["shopping", "news", "search"][k],
                text=f"event {u}-{k}", item_id=f"i{k}" if k == 0 else None, category=["A", "B", "C", "D"] if k == 0 else None,
                value=float(k) if k == 0 else None,
            ))
    pq.write_table(pa.Table.from_pylist(good, schema=EVENT_SCHEMA), root / "good.parquet")
    # CSV: 2 good rows (one is an exact duplicate of a Parquet event) + one bad row per reason
    (root / "more.csv").write_text(
        "user_id,ts,service,text,item_id,category,value\n"
        "u0,2024-01-01T12:00:00Z,shopping,event 0-0,i0,A > B > C > D,0\n"  # duplicate of good.parquet row
        "u10,2024-02-01 08:00:00,news,\"a headline, with a comma\",,,\n"  # good, new user
        ",2024-02-01,news,no user,,,\n"  # missing_field
        "u11,someday,news,bad time,,,\n"  # bad_type (ts)
        "u11,2024-02-01,shopping,bad value,,,twelve\n"  # bad_type (value)
        "u11,2024-02-01,news,   ,,,\n"  # empty_text
        "u11,1975-06-01,news,too old,,,\n"  # ts_out_of_range
        "u11,2024-02-01,tv,unknown service,,,\n"  # unknown_service
        f"u11,2024-02-01,news,{'x' * 50},,,\n"  # text_too_long (max_text_chars=40, reject)
    )
    (root / "events.jsonl").write_text(
        json.dumps({"user_id": "u12", "ts": 1706745600, "service": "search", "text": "jsonl good"}) + "\n"
        "{oops\n"  # malformed_row
        + json.dumps({"user_id": "u12", "ts": "2024-02-01T00:00:00Z", "service": "search"}) + "\n"  # missing_field (text)
    )
    pa.csv.write_csv(pa.table({"user_id": ["u0", "u10", "ghost"], "segment": ["x", "y", "z"]}), root.parent / "attrs.csv")
    return {
        "rows_in": 30 + 9 + 3,
        "by_reason": {"malformed_row": 1, "missing_field": 2, "bad_type": 2, "empty_text": 1, "text_too_long": 1,
                      "ts_out_of_range": 1, "unknown_service": 1, "duplicate_event": 1},
        "users": 12,  # u0..u9, u10, u12
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_local):
    import pyarrow.csv  # noqa: F401  (pa.csv used by write_inputs)

    root = tmp_path_factory.mktemp("ingest")
    expected = write_inputs(root / "in")
    cfg = IngestConfig(
        inputs=(str(root / "in"),), out=str(root / "out"), services=("shopping", "news", "search"),
        max_text_chars=40, long_text="reject", max_events=2, partitions=3, attributes=(str(root / "attrs.csv"),),
    )
    manifest = run_ingest(cfg, progress=lambda s: None)
    return cfg, manifest, expected, root


def test_counts_add_up_exactly(ingested):
    cfg, m, exp, _ = ingested
    assert m["rows_in"] == exp["rows_in"]
    assert m["rows_quarantined"] == sum(exp["by_reason"].values()) == 10
    assert m["rows_kept"] == exp["rows_in"] - 10 == 32
    assert {k: v for k, v in m["quarantined_by_reason"].items() if v} == exp["by_reason"]
    assert m["users"]["total"] == exp["users"]
    assert m["services"] == {"news": 11, "search": 11, "shopping": 10}
    assert m["sequences"] == {"max_events": 2, "users": 12, "user_service_rows": 32,
                              "events_in_sequences": 22, "events_beyond_max_events": 10}
    assert load_manifest(cfg.out) == m


def test_quarantine_file_names_field_and_source(ingested):
    cfg, *_ = ingested
    q = pq.read_table(f"{cfg.out}/quarantine.parquet").to_pylist()
    assert len(q) == 10
    by_detail = {r["detail"]: r for r in q}
    bad_ts = by_detail["ts: cannot parse 'someday' as a timestamp"]
    assert bad_ts["reason"] == "bad_type" and bad_ts["source"].endswith("more.csv")
    assert json.loads(bad_ts["raw"])["text"] == "bad time"
    assert "value: cannot parse 'twelve' as a number" in by_detail
    assert "service: 'tv' not in ['shopping', 'news', 'search']" in by_detail
    assert "text: required field is null or empty" in by_detail
    malformed = [r for r in q if r["reason"] == "malformed_row"][0]
    assert malformed["raw"] == "{oops" and malformed["source"].endswith("events.jsonl")


def test_sequences_content(ingested):
    cfg, *_ = ingested
    seqs = {r["user_id"]: r for r in read_sequences(cfg.out).to_pylist()}
    assert sorted(seqs) == sorted([f"u{i}" for i in range(11)] + ["u12"])
    u3 = seqs["u3"]
    assert u3["n_events"] == 3 and u3["text"] == ["event 3-1", "event 3-2"]  # most recent 2 of 3
    assert seqs["u10"]["text"] == ["a headline, with a comma"]
    assert seqs["u12"]["ts"] == [dt.datetime(2024, 2, 1, tzinfo=UTC)]
    assert {r["split"] for r in seqs.values()} <= {"train", "val", "test"}
    assert [seqs[u]["split"] for u in sorted(seqs)] == assign_split(sorted(seqs), (0.8, 0.1, 0.1))
    news = read_sequences(cfg.out, scope="news")
    assert news.num_rows == 11 and set(news.column("scope").to_pylist()) == {"news"}
    train = read_sequences(cfg.out, split="train")
    assert set(train.column("split").to_pylist()) == {"train"}
    events = pq.read_table(f"{cfg.out}/events").cast(EVENT_SCHEMA)
    assert events.num_rows == 32


def test_attributes_get_a_split(ingested):
    cfg, m, *_ = ingested
    attrs = read_attributes(cfg.out).to_pylist()
    assert [(a["user_id"], a["segment"]) for a in attrs] == [("u0", "x"), ("u10", "y"), ("ghost", "z")]
    assert [a["split"] for a in attrs] == assign_split(["u0", "u10", "ghost"], (0.8, 0.1, 0.1))
    assert m["attributes"][0]["columns"] == ["segment"]


def test_summary(ingested):
    cfg, *_ = ingested
    s = summarize(cfg.out)
    assert s["history_length"]["max"] == 3 and s["history_length"]["min"] == 1
    assert s["users_in_several_services"] == 10


def test_rerun_is_deterministic_and_overwrite_is_explicit(ingested, tmp_path):
    cfg, m, _, root = ingested
    with pytest.raises(IngestError, match="exists and is not empty"):
        run_ingest(cfg, progress=lambda s: None)
    again = run_ingest(IngestConfig(**{**cfg.__dict__, "out": str(tmp_path / "again"), "partitions": 5}), progress=lambda s: None)
    for k in ("rows_in", "rows_kept", "quarantined_by_reason", "users", "services", "sequences"):
        assert again[k] == m[k], k
    a = read_sequences(cfg.out).sort_by("user_id")
    b = read_sequences(tmp_path / "again").sort_by("user_id")
    assert a.equals(b)


def test_unreadable_inputs_are_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(IngestError, match=r"cannot read parquet file .*broken\.parquet"):
        expand_inputs((str(bad),))
    with pytest.raises(IngestError, match=r"input '.*missing.csv': no such file"):
        expand_inputs((str(tmp_path / "missing.csv"),))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(IngestError, match="unknown file type"):
        expand_inputs((str(tmp_path / "notes.txt"),))


def test_bad_attributes_table_is_an_error(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist([dict(user_id="a", ts=dt.datetime(2024, 1, 1, tzinfo=UTC), service="s", text="t",
                                               item_id=None, category=None, value=None)], schema=EVENT_SCHEMA), tmp_path / "in" / "e.parquet")
    pa.csv.write_csv(pa.table({"user_id": ["a", "a"], "y": [1, 2]}), tmp_path / "dup.csv")
    cfg = IngestConfig(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "out"), attributes=(str(tmp_path / "dup.csv"),))
    with pytest.raises(IngestError, match=r"dup\.csv.*user_id not unique, e\.g\. \['a'\]"):
        run_ingest(cfg, progress=lambda s: None)


def test_source_time_reads_the_convert_manifests(tmp_path):
    """What ts means comes from `userfm convert`'s manifest beside each input; without one it is real time;
    mixed inputs get the weakest (none < ordinal < real)."""
    import json

    from userfm.data.ingest import source_time

    for name, kind in (("a", "ordinal"), ("b", "none"), ("c", "real")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.parquet").write_bytes(b"")
        (tmp_path / name / "convert_manifest.json").write_text(json.dumps({"time": kind, "time_note": f"note {kind}"}))
    (tmp_path / "plain.parquet").write_bytes(b"")
    p = {k: str(tmp_path / k / "events.parquet") for k in "abc"}
    assert source_time([str(tmp_path / "plain.parquet")])[0] == "real"
    assert source_time([p["c"], str(tmp_path / "plain.parquet")]) == ("real", "note real")
    assert source_time([p["c"], p["a"]]) == ("ordinal", "note ordinal")
    assert source_time([p["a"], p["b"], p["c"]]) == ("none", "note none")
