"""userfm refresh: a window of new logs -> new dataset and embedding table versions.

Checked against what the window was built to contain (every row's fate is known), against a full
ingest of old + new logs (the refreshed dataset must be the same files), against the old table
(unchanged users' rows byte for byte) and against a direct forward pass (changed and new users). One
Serve test: a running app reloads the refreshed table while clients keep asking.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from userfm.infer.refresh import RefreshConfig, RefreshError, changed_rows, merge_by_user, run_refresh, sequence_stats
from userfm.data.schema import EVENT_SCHEMA

pytestmark = pytest.mark.timeout(420)
UTC = dt.timezone.utc
QUIET = dict(progress=lambda s: None)


def _window(root, raw, old_events: pa.Table) -> dict:
    """The window: future events of 40 users, 3 new users, exact duplicates, bad rows. Returns what it holds."""
    fut = pq.read_table(raw / "future_events").cast(EVENT_SCHEMA)
    users = sorted(set(fut.column("user_id").to_pylist()))[:40]
    fut = fut.filter(pc.is_in(fut.column("user_id"), value_set=pa.array(users)))
    changed = set(fut.column("user_id").to_pylist())
    new = [dict(user_id=f"zz-new-{i}", ts=dt.datetime(2024, 7, 20, 10 + k, tzinfo=UTC), service="search",
                text=f"fresh query {i} {k}", item_id=None, category=None, value=None) for i in range(3) for k in range(2)]
    # 4 exact copies of a user's old events (a user not otherwise in the window: it stays unchanged),
    # and one copy of a window row (a duplicate inside the window)
    counts = pc.value_counts(old_events.column("user_id")).to_pylist()
    quiet_user = min(c["values"] for c in counts if c["counts"] >= 4 and c["values"] not in changed)
    dup_old = old_events.filter(pc.equal(old_events.column("user_id"), quiet_user)).slice(0, 4)
    assert dup_old.num_rows == 4
    rows = pa.concat_tables([fut, pa.Table.from_pylist(new, schema=EVENT_SCHEMA), dup_old, fut.slice(0, 1)])
    (root / "window").mkdir()
    pq.write_table(rows, root / "window" / "day.parquet")
    (root / "window" / "bad.jsonl").write_text(
        "{not json\n"  # malformed_row
        + json.dumps({"user_id": "zz-new-0", "ts": "2024-07-21T00:00:00Z", "text": "no service"}) + "\n"  # missing_field
        + json.dumps({"user_id": "zz-new-0", "ts": "yesterday", "service": "news", "text": "bad time"}) + "\n"  # bad_type
    )
    return {"rows_in": rows.num_rows + 3, "kept": fut.num_rows + len(new), "duplicates": 5,
            "by_reason": {"malformed_row": 1, "missing_field": 1, "bad_type": 1, "duplicate_event": 5},
            "changed": changed, "new": {f"zz-new-{i}" for i in range(3)}, "quiet_user": quiet_user}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """200 synthetic users ingested and embedded with an untrained tiny encoder; a window; one refresh."""
    from userfm.data.dataset import read_sequences
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.models.encoders import UserEncoder, config_for, save_encoder
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.models.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("refresh")
    raw = root / "raw"
    generate(SynthConfig(n_users=200, events_per_user=12, seed=11), raw)
    ingest_cfg = IngestConfig(inputs=(str(raw / "events"),), out=str(root / "ds"), attributes=(str(raw / "attributes.parquet"),),
                              max_events=16, partitions=4)
    run_ingest(ingest_cfg, **QUIET)
    rows = read_sequences(root / "ds")
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=16, max_text_tokens=8))
    tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=300)
    for seed, name in ((0, "enc"), (1, "enc2")):
        torch.manual_seed(seed)
        save_encoder(root / name / "model", UserEncoder(config_for("tiny", vocabs, tok, item_encoder="text", out_dim=12)), vocabs, tok)
    run_embed(EmbedConfig(model=str(root / "enc" / "model"), data=str(root / "ds"), out=str(root / "emb"), actors=1,
                          cpus_per_actor=0.5), **QUIET)
    expected = _window(root, raw, pq.read_table(root / "ds" / "events"))
    manifest = run_refresh(RefreshConfig(inputs=(str(root / "window"),), data=str(root / "ds"), embeddings=str(root / "emb"),
                                         model=str(root / "enc" / "model"), out=str(root / "v2"), cpus_per_actor=0.5), **QUIET)
    return {"root": root, "raw": raw, "ingest_cfg": ingest_cfg, "expected": expected, "manifest": manifest}


def _table(path) -> dict[str, dict]:
    t = pq.read_table(path)
    return {r["user_id"]: r for r in t.to_pylist()}


def _vectors(path) -> dict[str, bytes]:
    """user id -> the raw float32 bytes of its embedding (byte-for-byte comparison)."""
    t = pq.read_table(path, columns=["user_id", "embedding"])
    col = t.column("embedding").combine_chunks()
    x = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    return {u: x[i].tobytes() for i, u in enumerate(t.column("user_id").to_pylist())}


# ---------------------------------------------------------------------------------- pure helpers


def test_changed_rows_and_merge_by_hand():
    old = pa.table({"user_id": ["a", "b", "c"], "n_events": [3, 5, 1]})
    new = pa.table({"user_id": ["a", "b", "d"], "n_events": [3, 7, 2]})
    changed, is_new = changed_rows(old, new)
    assert changed.tolist() == [False, True, False] and is_new.tolist() == [False, False, True]
    kept = pa.table({"user_id": ["a", "c", "c", "f"], "k": [1, 2, 3, 4]})
    rebuilt = pa.table({"user_id": ["b", "b", "e"], "k": [5, 6, 7]})
    merged = merge_by_user(kept, rebuilt)
    assert merged.column("user_id").to_pylist() == ["a", "b", "b", "c", "c", "e", "f"]
    assert merged.column("k").to_pylist() == [1, 5, 6, 2, 3, 7, 4]  # each user's own order kept


def test_sequence_stats_by_hand():
    seq_all = pa.table({"user_id": ["a", "b"], "split": ["train", "test"], "n_events": [3, 20]})
    seq_svc = pa.table({"user_id": ["a", "a", "b"], "scope": ["news", "search", "news"], "n_events": [1, 2, 20]})
    s = sequence_stats(seq_all, seq_svc, max_events=16)
    assert s == {"users": 2, "users_by_split": {"train": 1, "val": 0, "test": 1}, "events": 23, "events_in_sequences": 19,
                 "events_beyond_max_events": 4, "user_service_rows": 3, "events_by_service": {"news": 21, "search": 2}}


# ---------------------------------------------------------------------------------- the refresh


def test_counts_add_up_exactly(world):
    m, exp, root = world["manifest"], world["expected"], world["root"]
    w = m["window"]
    assert w["rows_in"] == exp["rows_in"] == w["rows_kept"] + w["rows_quarantined"]
    assert w["rows_kept"] == exp["kept"] and w["rows_quarantined"] == sum(exp["by_reason"].values())
    assert {k: v for k, v in w["quarantined_by_reason"].items() if v} == exp["by_reason"]
    assert m["users"] == {"before": 200, "after": 203, "changed": len(exp["changed"]), "new": 3,
                          "unchanged": 200 - len(exp["changed"])}
    assert m["version"] == 2 and m["partitions"]["rebuilt"] + m["partitions"]["copied"] == 4
    emb = json.loads((root / "v2" / "embeddings" / "manifest.json").read_text())
    assert emb["users_in"] == emb["users_embedded"] + emb["users_skipped"] == 203
    assert emb["version"] == 2 and emb["refresh"]["users"] == m["users"]
    old_ds = json.loads((root / "ds" / "manifest.json").read_text())
    ds = json.loads((root / "v2" / "dataset" / "manifest.json").read_text())
    assert ds["rows_in"] == ds["rows_kept"] + ds["rows_quarantined"] == old_ds["rows_in"] + exp["rows_in"]
    assert ds["rows_kept"] == old_ds["rows_kept"] + exp["kept"] and ds["users"]["total"] == 203
    assert pq.read_table(root / "v2" / "dataset" / "quarantine.parquet").num_rows == ds["rows_quarantined"]


def test_unchanged_rows_are_byte_identical_and_only_changed_and_new_users_are_re_embedded(world):
    import userfm
    from userfm.data.dataset import read_sequences
    from userfm.models.features import make_batch, to_torch

    root, exp = world["root"], world["expected"]
    old, new = _vectors(root / "emb" / "embeddings"), _vectors(root / "v2" / "embeddings" / "embeddings")
    old_rows, new_rows = _table(root / "emb" / "embeddings"), _table(root / "v2" / "embeddings" / "embeddings")
    assert set(new) == set(old) | exp["new"]
    unchanged = set(old) - exp["changed"]
    assert exp["quiet_user"] in unchanged  # its window rows were all duplicates
    for u in unchanged:
        assert new[u] == old[u], u
        assert new_rows[u] == old_rows[u], u  # every column, not just the vector
    for u in exp["changed"]:
        assert new[u] != old[u] and new_rows[u]["n_events"] > old_rows[u]["n_events"], u
    # changed and new users' vectors are the encoder's forward pass on their refreshed sequences
    seqs = read_sequences(root / "v2" / "dataset")
    ids = seqs.column("user_id").to_pylist()
    redo = sorted(exp["changed"] | exp["new"])
    sub = seqs.take(pa.array([ids.index(u) for u in redo]))
    model, vocabs, tok = userfm.load_encoder(root / "enc" / "model")
    with torch.no_grad():
        ref = model(to_torch(make_batch(sub, vocabs, tok, max_events=16))).numpy()
    got = np.stack([np.frombuffer(new[u], np.float32) for u in redo])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert {r["model_version"] for r in new_rows.values()} == {old_rows[next(iter(old_rows))]["model_version"]}


def test_refreshed_dataset_equals_a_full_ingest_of_old_and_new_logs(world, tmp_path):
    """Same partition files (content and row order) and same counts as ingesting everything at once."""
    from dataclasses import replace

    from userfm.data.ingest import run_ingest

    root = world["root"]
    cfg = replace(world["ingest_cfg"], inputs=(str(world["raw"] / "events"), str(root / "window")), out=str(tmp_path / "full"))
    full = run_ingest(cfg, **QUIET)
    ref = json.loads((root / "v2" / "dataset" / "manifest.json").read_text())
    for key in ("rows_in", "rows_kept", "rows_quarantined", "quarantined_by_reason", "users", "services", "sequences",
                "texts_truncated", "partitions"):
        assert ref[key] == full[key], key
    for sub in ("events", "sequences/all", "sequences/by_service"):
        names = sorted(p.name for p in (tmp_path / "full" / sub).glob("*.parquet"))
        assert names == sorted(p.name for p in (root / "v2" / "dataset" / sub).glob("*.parquet"))
        for name in names:
            a, b = pq.read_table(tmp_path / "full" / sub / name), pq.read_table(root / "v2" / "dataset" / sub / name)
            assert a.equals(b), f"{sub}/{name}"
    assert pq.read_table(root / "v2" / "dataset" / "attributes" / "attributes.parquet").equals(
        pq.read_table(root / "ds" / "attributes" / "attributes.parquet"))


def test_a_window_of_only_duplicates_and_bad_rows_changes_nothing(world, tmp_path):
    """A refresh of the refresh: nothing re-embedded, every row of the table carried over as it was."""
    root = world["root"]
    (tmp_path / "w").mkdir()
    pq.write_table(pq.read_table(root / "window" / "day.parquet").slice(0, 7), tmp_path / "w" / "again.parquet")
    (tmp_path / "w" / "bad.jsonl").write_text("{oops\n")
    m = run_refresh(RefreshConfig(inputs=(str(tmp_path / "w"),), data=str(root / "v2" / "dataset"),
                                  embeddings=str(root / "v2" / "embeddings"), model=str(root / "enc" / "model"),
                                  out=str(tmp_path / "v3"), cpus_per_actor=0.5), **QUIET)
    assert m["window"]["rows_in"] == 8 and m["window"]["rows_kept"] == 0
    assert {k: v for k, v in m["window"]["quarantined_by_reason"].items() if v} == {"malformed_row": 1, "duplicate_event": 7}
    assert m["users"] == {"before": 203, "after": 203, "changed": 0, "new": 0, "unchanged": 203} and m["version"] == 3
    assert _vectors(tmp_path / "v3" / "embeddings" / "embeddings") == _vectors(root / "v2" / "embeddings" / "embeddings")
    assert m["partitions"]["copied"] >= 1 and m["partitions"]["rebuilt"] >= 1
    for sub in ("events", "sequences/all", "sequences/by_service"):  # rebuilt or copied, every file is as it was
        for f in (root / "v2" / "dataset" / sub).glob("*.parquet"):
            assert pq.read_table(tmp_path / "v3" / "dataset" / sub / f.name).equals(pq.read_table(f)), f"{sub}/{f.name}"
    ds = json.loads((tmp_path / "v3" / "dataset" / "manifest.json").read_text())
    assert ds["version"] == 3 and ds["rows_quarantined"] == json.loads((root / "v2" / "dataset" / "manifest.json").read_text())["rows_quarantined"] + 8


def test_a_table_with_a_similar_users_index_gets_it_updated(world, tmp_path):
    """The parent's ANN index carries over: its cells reused, every row of the new table in it, tied to that table."""
    import shutil

    from userfm.infer.ann import read_index
    from userfm.infer.embed import read_embeddings, write_ann

    root = world["root"]
    shutil.copytree(root / "v2" / "embeddings", tmp_path / "parent")
    parent = write_ann(tmp_path / "parent", "on", progress=lambda s: None)  # 203 users: only "on" builds one
    (tmp_path / "w").mkdir()
    pq.write_table(pq.read_table(root / "window" / "day.parquet").slice(0, 3), tmp_path / "w" / "again.parquet")
    m = run_refresh(RefreshConfig(inputs=(str(tmp_path / "w"),), data=str(root / "v2" / "dataset"),
                                  embeddings=str(tmp_path / "parent"), model=str(root / "enc" / "model"),
                                  out=str(tmp_path / "v3"), cpus_per_actor=0.5), **QUIET)
    ids, x = read_embeddings(tmp_path / "v3" / "embeddings")
    index, meta = read_index(tmp_path / "v3" / "embeddings", ids, x)  # raises if built from another table
    assert index.ntotal == len(ids) == m["users"]["after"] == 203
    assert meta["nlist"] == parent["nlist"] and meta["centroids"] == f"reused from {tmp_path / 'parent'}"
    assert json.loads((tmp_path / "v3" / "embeddings" / "manifest.json").read_text())["ann"] == meta


def test_inputs_that_do_not_belong_together_are_refused(world, tmp_path):
    root = world["root"]
    base = dict(inputs=(str(root / "window"),), data=str(root / "ds"), embeddings=str(root / "emb"))
    with pytest.raises(RefreshError, match=r"model .*enc2/model \(version \w+\) did not make embeddings"):
        run_refresh(RefreshConfig(**base, model=str(root / "enc2" / "model"), out=str(tmp_path / "a")), **QUIET)
    with pytest.raises(RefreshError, match="not a `userfm embed` table folder"):
        run_refresh(RefreshConfig(**{**base, "embeddings": str(root / "ds")}, model=str(root / "enc" / "model"),
                                  out=str(tmp_path / "b")), **QUIET)
    with pytest.raises(RefreshError, match="out is required"):
        run_refresh(RefreshConfig(**base, model=str(root / "enc" / "model")), **QUIET)


# ---------------------------------------------------------------------------------- serving the new version


def test_serve_reloads_the_refreshed_table_and_answers_every_request_during_the_swap(world):
    from userfm.serve import app as serve
    from userfm.serve.config import ServeConfig

    root, exp = world["root"], world["expected"]
    old, new = _vectors(root / "emb" / "embeddings"), _vectors(root / "v2" / "embeddings" / "embeddings")
    changed, fresh = sorted(exp["changed"])[0], sorted(exp["new"])[0]
    same = sorted(set(old) - exp["changed"])[0]
    (root / "admin-key").write_text("4dmin\n")
    (root / "admin-key").chmod(0o600)  # reload is an admin route: the admin key only
    cfg = ServeConfig(model=str(root / "enc" / "model"), embeddings=str(root / "emb"), port=0, encoder_cpus=0.2,
                      head_cpus=0.05, store_cpus=0.05, ingress_cpus=0.1, admin_key_file=str(root / "admin-key"))
    base = serve.start(cfg, **QUIET)
    log: list[tuple[str, float, float, int, bytes | None]] = []  # (user, start, end, status, vector bytes)
    stop = threading.Event()

    def client(user: str):
        with httpx.Client(base_url=base, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.get(f"/v1/users/{user}/embedding")
                vec = np.asarray(r.json()["embedding"], np.float32).tobytes() if r.status_code == 200 else None
                log.append((user, t0, time.monotonic(), r.status_code, vec))

    try:
        threads = [threading.Thread(target=client, args=(u,)) for u in (changed, fresh, same, changed)]
        for t in threads:
            t.start()
        while sum(1 for e in log if e[0] == changed) < 10:  # clients are running against the old table
            time.sleep(0.05)
        t_reload = time.monotonic()
        r = httpx.post(f"{base}/v1/admin/reload", json={"embeddings": str(root / "v2" / "embeddings")}, timeout=120,
                       headers={"x-api-key": "4dmin"})
        t_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["embeddings"]["users"] == 203
        n_at_done = len(log)
        while len(log) < n_at_done + 20:  # and keep running against the new one
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        serve.stop()
    assert min(e[1] for e in log) < t_reload and max(e[2] for e in log) > t_done
    for user, t0, t1, status, vec in log:
        if user == fresh:  # unknown to the old table: 404 until the swap, then its new vector
            assert (status, vec) in ((404, None), (200, new[fresh])), (status, t0 - t_reload)
            if t1 < t_reload:
                assert status == 404
            if t0 > t_done:
                assert status == 200
        else:
            assert status == 200, (user, status)
            assert vec in (old[user], new[user])
            if t1 < t_reload:
                assert vec == old[user]
            if t0 > t_done:
                assert vec == new[user]
    assert old[same] == new[same] and old[changed] != new[changed]
