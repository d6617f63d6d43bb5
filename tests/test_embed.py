"""userfm embed: every user in gets an embedding or a reason; embeddings equal a plain torch forward."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from userfm.infer.embed import EmbedConfig, EmbedError, model_identity, read_embeddings, run_embed
from userfm.data.sequences import drop_last_events

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    from userfm.data.dataset import read_sequences
    from userfm.models.encoders import UserEncoder, config_for, save_encoder
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.models.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("embed")
    generate(SynthConfig(n_users=300, events_per_user=15, seed=5), root / "raw")
    run_ingest(IngestConfig(inputs=(str(root / "raw" / "events"),), out=str(root / "ds")), progress=lambda s: None)
    rows = read_sequences(root / "ds")
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=16, max_text_tokens=8))
    tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=300)
    torch.manual_seed(0)
    model = UserEncoder(config_for("tiny", vocabs, tok, item_encoder="text", out_dim=12))
    save_encoder(root / "run" / "model", model, vocabs, tok)
    return root, rows


def test_embeddings_equal_a_plain_forward_and_counts_add_up(setup, capfd, recwarn):
    import userfm
    from userfm.models.features import make_batch, to_torch

    root, rows = setup
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(root / "emb"), batch_size=64, actors=2, cpus_per_actor=0.5), progress=lambda s: None)
    assert m["users_in"] == m["users_embedded"] == 300 and m["users_skipped"] == 0 and m["dim"] == 12
    # no raw Ray core line about the actors' restarts (they are off: runtime.no_actor_restarts)
    assert "constructor arguments in the object store" not in capfd.readouterr().err
    assert not [w for w in recwarn if "deprecated" in str(w.message)]  # nor Ray's deprecation of how it is set
    assert m["model_id"] == "run" and m["model_version"] == model_identity(root / "run" / "model")["model_version"]
    table = pq.read_table(root / "emb" / "embeddings")
    assert set(table.column("model_version").to_pylist()) == {m["model_version"]}
    users, emb = read_embeddings(root / "emb")
    model, vocabs, tok = userfm.load_encoder(root / "run" / "model")
    with torch.no_grad():
        ref = model(to_torch(make_batch(rows, vocabs, tok, max_events=16))).numpy()
    order = {u: i for i, u in enumerate(rows.column("user_id").to_pylist())}
    np.testing.assert_allclose(emb, ref[[order[u] for u in users]], rtol=1e-5, atol=1e-6)
    assert json.loads((root / "emb" / "manifest.json").read_text())["users_embedded"] == 300


def test_concat_appends_a_second_table_with_zeros_for_missing_users(setup):
    root, rows = setup
    users = rows.column("user_id").to_pylist()[:100]
    other = root / "other.parquet"
    vecs = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    pq.write_table(pa.table({"user_id": users, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 3)}), other)
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(root / "emb-cat"), concat=str(other)), progress=lambda s: None)
    assert m["dim"] == 15 and m["concat"]["users_missing"] == 200
    got_users, got = read_embeddings(root / "emb-cat")
    base_users, base = read_embeddings(root / "emb")
    base_of = dict(zip(base_users, base))
    i = got_users.index(users[7])
    np.testing.assert_array_equal(got[i, 12:], vecs[7])
    # (the two runs' batches differ, so their padding does: equal to float rounding)
    np.testing.assert_allclose(got[i, :12], base_of[users[7]], rtol=1e-5, atol=1e-6)
    j = next(k for k, u in enumerate(got_users) if u not in set(users))
    assert not got[j, 12:].any()


def test_a_user_without_events_is_skipped_with_a_reason(setup, tmp_path):
    root, rows = setup
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    part = sorted((ds / "sequences" / "all").glob("*.parquet"))[0]
    t = pq.read_table(part)
    empty = {c: [[]] if pa.types.is_list(t.schema.field(c).type) else None for c in t.column_names}
    empty.update(user_id=["ghost"], split=["train"], scope=["all"], n_events=[0])
    pq.write_table(pa.concat_tables([t, pa.Table.from_pydict(empty, schema=t.schema)]), part)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["users"]["total"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(ds), out=str(tmp_path / "emb")), progress=lambda s: None)
    assert (m["users_in"], m["users_embedded"], m["users_skipped"]) == (301, 300, 1)
    assert m["skipped_by_reason"] == {"no_events": 1}
    assert pq.read_table(tmp_path / "emb" / "skipped.parquet").column("user_id").to_pylist() == ["ghost"]


def test_bad_inputs(setup, tmp_path):
    root, _ = setup
    with pytest.raises(EmbedError, match="not an exported encoder"):
        run_embed(EmbedConfig(model=str(tmp_path), data=str(root / "ds"), out=str(tmp_path / "o")), progress=lambda s: None)
    with pytest.raises(EmbedError, match="exists and is not empty"):
        run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(root / "emb")), progress=lambda s: None)
    with pytest.raises(EmbedError, match="scope .tv.: no such service"):
        run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(tmp_path / "o2"), scope="tv"), progress=lambda s: None)


def test_drop_last_events_by_hand():
    from userfm.data.schema import SEQUENCE_SCHEMA

    ts = [pa.scalar(i * 1_000_000, pa.timestamp("us", tz="UTC")).as_py() for i in range(3)]
    rows = pa.Table.from_pylist([
        dict(user_id="a", split="train", scope="all", n_events=300, ts=ts, service=["s", "t", "s"], text=["x", "y", "z"],
             item_id=["1", None, "3"], category=[["A", "B"], None, ["C"]], value=[1.0, 2.0, None]),
        dict(user_id="b", split="val", scope="all", n_events=2, ts=ts[:2], service=["s", "s"], text=["q", "r"],
             item_id=["9", "8"], category=[None, ["D"]], value=[None, 5.0]),
        dict(user_id="c", split="val", scope="all", n_events=1, ts=ts[:1], service=["s"], text=["w"], item_id=["7"],
             category=[None], value=[None]),
    ], schema=SEQUENCE_SCHEMA)
    got = {r["user_id"]: r for r in drop_last_events(rows, 1).to_pylist()}
    assert got["a"]["item_id"] == ["1", None] and got["a"]["category"] == [["A", "B"], None]
    assert got["a"]["text"] == ["x", "y"] and got["a"]["ts"] == ts[:2] and got["a"]["n_events"] == 299
    assert got["b"]["item_id"] == ["9"] and got["b"]["value"] == [None] and got["b"]["n_events"] == 1
    assert got["c"]["item_id"] == [] and got["c"]["n_events"] == 0
    # a sliced table (list offsets not starting at 0) drops the same events
    assert drop_last_events(rows.slice(1, 1), 1).column("text").to_pylist() == [["q"]]
    assert drop_last_events(rows, 2).column("text").to_pylist() == [["x"], [], []]
    assert drop_last_events(rows, 0) is rows and drop_last_events(rows, 1).schema == rows.schema


def test_event_windows_by_hand():
    from userfm.infer.embed import event_windows
    from userfm.data.schema import SEQUENCE_SCHEMA

    ts = [pa.scalar(i * 1_000_000, pa.timestamp("us", tz="UTC")).as_py() for i in range(4)]
    rows = pa.Table.from_pylist([
        dict(user_id="a", split="train", scope="all", n_events=4, ts=ts, service=["s", "t", "s", "t"],
             text=["w", "x", "y", "z"], item_id=["1", None, "3", "4"], category=[["A"], None, ["C"], ["D"]],
             value=[1.0, 2.0, None, 4.0]),
        dict(user_id="b", split="val", scope="all", n_events=2, ts=ts[:2], service=["s", "s"], text=["q", "r"],
             item_id=["9", "8"], category=[None, ["E"]], value=[None, 5.0]),
    ], schema=SEQUENCE_SCHEMA)
    # user a's windows before events 3, 1 and 4 (2 wide), user b's before its event 2 and before nothing
    got = event_windows(rows.take([0, 0, 0, 1, 1]), np.array([3, 1, 4, 2, 0]), 2)
    assert got.column("text").to_pylist() == [["x", "y"], ["w"], ["y", "z"], ["q", "r"], []]
    assert got.column("item_id").to_pylist() == [[None, "3"], ["1"], ["3", "4"], ["9", "8"], []]
    assert got.column("category").to_pylist() == [[None, ["C"]], [["A"]], [["C"], ["D"]], [None, ["E"]], []]
    assert got.column("ts").to_pylist() == [ts[1:3], ts[:1], ts[2:4], ts[:2], []]
    assert got.column("n_events").to_pylist() == [2, 1, 2, 2, 0] and got.schema == rows.schema
    assert got.column("user_id").to_pylist() == ["a", "a", "a", "b", "b"]
    # a sliced table (list offsets not starting at 0) cuts the same events
    assert event_windows(rows.slice(1, 1), np.array([1]), 3).column("text").to_pylist() == [["q"]]
    with pytest.raises(ValueError, match=r"ends\[0\] = 3 is outside row 0's 0..2 events"):
        event_windows(rows.slice(1, 1), np.array([3]), 2)
    with pytest.raises(ValueError, match="width must be >= 1"):
        event_windows(rows, np.array([1, 1]), 0)


def test_holdout_last_embeds_the_history_without_its_last_event(setup, tmp_path):
    import userfm
    from userfm.models.features import make_batch, to_torch

    root, rows = setup
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(tmp_path / "loo"), holdout_last=1),
                  progress=lambda s: None)
    assert m["holdout_last"] == 1 and m["config"]["holdout_last"] == 1
    short = int((rows.column("n_events").to_numpy() <= 1).sum())  # nothing left to embed for them
    assert (m["users_in"], m["users_embedded"], m["users_skipped"]) == (300, 300 - short, short)
    assert m["skipped_by_reason"] == ({"no_events_after_holdout": short} if short else {})
    assert set(pq.read_table(tmp_path / "loo" / "embeddings").column("holdout_last").to_pylist()) == {1}
    users, emb = read_embeddings(tmp_path / "loo")
    model, vocabs, tok = userfm.load_encoder(root / "run" / "model")
    kept = drop_last_events(rows, 1)
    kept = kept.filter(pc.greater(kept.column("n_events"), 0))
    with torch.no_grad():
        ref = model(to_torch(make_batch(kept, vocabs, tok, max_events=16))).numpy()
        full = model(to_torch(make_batch(rows, vocabs, tok, max_events=16))).numpy()
    order = {u: i for i, u in enumerate(kept.column("user_id").to_pylist())}
    np.testing.assert_allclose(emb, ref[[order[u] for u in users]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(emb, full[[rows.column("user_id").to_pylist().index(u) for u in users]], atol=1e-4)
    # recent=3: the short-term table encodes each user's 3 most recent events left after the holdout
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(tmp_path / "recent"),
                              holdout_last=1, recent=3), progress=lambda s: None)
    assert m["config"]["recent"] == 3 and m["users_embedded"] == 300 - short
    users3, emb3 = read_embeddings(tmp_path / "recent")
    with torch.no_grad():
        ref3 = model(to_torch(make_batch(kept, vocabs, tok, max_events=3))).numpy()
    np.testing.assert_allclose(emb3, ref3[[order[u] for u in users3]], rtol=1e-5, atol=1e-6)
    longer = [i for i, u in enumerate(users3) if len(kept.column("ts")[order[u]]) > 3]
    assert longer and not np.allclose(emb3[longer], emb[[users.index(users3[i]) for i in longer]], atol=1e-4)
    with pytest.raises(ValueError, match="recent must be >= 0"):
        EmbedConfig(recent=-1)


def test_keep_services_and_history_rows_by_hand():
    from userfm.data.sequences import history_rows
    from userfm.data.sequences import keep_services
    from userfm.data.schema import SEQUENCE_SCHEMA

    ts = [pa.scalar(i * 1_000_000, pa.timestamp("us", tz="UTC")).as_py() for i in range(4)]
    rows = pa.Table.from_pylist([
        dict(user_id="a", split="train", scope="all", n_events=4, ts=ts, service=["s", "t", "s", "t"],
             text=["w", "x", "y", "z"], item_id=["1", None, "3", "4"], category=[["A"], None, ["C"], ["D"]],
             value=[1.0, 2.0, None, 4.0]),
        dict(user_id="b", split="val", scope="all", n_events=2, ts=ts[:2], service=["t", "t"], text=["q", "r"],
             item_id=["9", "8"], category=[None, ["E"]], value=[None, 5.0]),
    ], schema=SEQUENCE_SCHEMA)
    got = keep_services(rows, ("s",))
    assert got.column("text").to_pylist() == [["w", "y"], []] and got.column("item_id").to_pylist() == [["1", "3"], []]
    assert got.column("category").to_pylist() == [[["A"], ["C"]], []] and got.column("value").to_pylist() == [[1.0, None], []]
    assert got.column("ts").to_pylist() == [[ts[0], ts[2]], []] and got.column("n_events").to_pylist() == [2, 0]
    assert got.schema == rows.schema and got.column("user_id").to_pylist() == ["a", "b"]
    # the last event dropped first, then user a's "t" events before it: x only; b keeps q
    cut = history_rows(rows, 1, "t")
    assert cut.column("text").to_pylist() == [["x"], ["q"]] and cut.column("n_events").to_pylist() == [1, 1]
    assert history_rows(rows, 1).column("text").to_pylist() == [["w", "x", "y"], ["q"]]
    # a sliced table (list offsets not starting at 0) keeps the same events
    assert keep_services(rows.slice(1, 1), ("t",)).column("text").to_pylist() == [["q", "r"]]
    assert keep_services(rows, ("s", "t")).column("text").to_pylist() == rows.column("text").to_pylist()
    with pytest.raises(ValueError, match="needs the sequences' service column"):
        keep_services(rows.select(["user_id", "text"]), ("s",))


def test_history_service_embeds_one_services_events(setup, tmp_path):
    import userfm
    from userfm.data.sequences import history_rows
    from userfm.models.features import make_batch, to_torch

    root, rows = setup
    svc = sorted({s for lst in rows.column("service").to_pylist() for s in lst})[0]
    m = run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(tmp_path / "svc"),
                              holdout_last=1, history_service=svc), progress=lambda s: None)
    kept = history_rows(rows, 1, svc)
    n = kept.column("n_events").to_numpy()
    short = int((rows.column("n_events").to_numpy() <= 1).sum())
    none = int((n == 0).sum()) - short  # events left after the holdout, none of them in the service
    assert (m["users_in"], m["users_embedded"], m["history_service"]) == (300, 300 - short - none, svc)
    assert m["skipped_by_reason"] == {k: v for k, v in (("no_events_after_holdout", short), ("no_events_in_service", none)) if v}
    users, emb = read_embeddings(tmp_path / "svc")
    # the rows carry the history service: a table copied without its manifest still says what it was made from
    import shutil

    from userfm.eval.embeddings import load_embeddings

    shutil.copytree(tmp_path / "svc" / "embeddings", tmp_path / "bare")
    assert not (tmp_path / "bare" / "manifest.json").exists()
    assert (load_embeddings(tmp_path / "bare").history_service, load_embeddings(tmp_path / "svc").history_service) == (svc, svc)
    model, vocabs, tok = userfm.load_encoder(root / "run" / "model")
    kept = kept.filter(pc.greater(kept.column("n_events"), 0))
    with torch.no_grad():
        ref = model(to_torch(make_batch(kept, vocabs, tok, max_events=16))).numpy()
    order = {u: i for i, u in enumerate(kept.column("user_id").to_pylist())}
    np.testing.assert_allclose(emb, ref[[order[u] for u in users]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="history_service applies to scope 'all'"):
        EmbedConfig(scope=svc, history_service=svc)
    with pytest.raises(EmbedError, match="history_service 'tv': no such service"):
        run_embed(EmbedConfig(model=str(root / "run" / "model"), data=str(root / "ds"), out=str(tmp_path / "o3"),
                              history_service="tv"), progress=lambda s: None)
