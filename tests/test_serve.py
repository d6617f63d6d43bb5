"""userfm serve: a real Ray Serve app on 127.0.0.1 (a free port per test session), every route's answer
checked against the same computation done directly with the loaded models, every error path's status
and message, batching under concurrency, a table reload, generated requests, backpressure."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from userfm.serve.config import ServeConfig, ServeError, plan, resolve_heads
from userfm.serve.deployments import events_from_sequence, events_to_rows, lookup

pytestmark = pytest.mark.timeout(420)

N_USERS = 300
KEY = {"x-api-key": "s3cret"}
ADMIN = {"x-api-key": "4dmin"}


def _fit_head(kind, x, y, task, classes, emb_dir, out):
    from userfm.eval.heads import fit_logreg, fit_mlp, save_head
    from userfm.eval.tasks import EvalConfig, TaskConfig

    t = TaskConfig(**task)
    cfg = EvalConfig(mlp_hidden=16, mlp_max_epochs=5, logreg_c=(1.0,))
    fitter = fit_mlp if kind == "mlp" else fit_logreg
    head = fitter(x[:200], y[:200], x[200:], y[200:], task=t, classes=classes, cfg=cfg, seed=0)
    head.meta.update(embedding="t", embedding_source=str(emb_dir))
    return save_head(out, head)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """Tiny synthetic dataset, two untrained encoders (two versions), their `userfm embed` tables and
    heads saved the way `userfm evaluate` saves them."""
    from userfm.data.dataset import read_sequences
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.models.encoders import UserEncoder, config_for, save_encoder
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.models.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("serve")
    generate(SynthConfig(n_users=N_USERS, events_per_user=15, seed=3), root / "raw")
    run_ingest(IngestConfig(inputs=(str(root / "raw" / "events"),), out=str(root / "ds")), progress=lambda s: None)
    rows = read_sequences(root / "ds")
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=16, max_text_tokens=8))
    tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=300)
    for seed, name in ((0, "enc"), (1, "enc2")):
        torch.manual_seed(seed)
        save_encoder(root / name / "model", UserEncoder(config_for("tiny", vocabs, tok, item_encoder="text", out_dim=12)), vocabs, tok)
    # The table /v1/embed must reproduce comes from the real `userfm embed`.
    run_embed(EmbedConfig(model=str(root / "enc" / "model"), data=str(root / "ds"), out=str(root / "emb-enc"),
                          actors=1, cpus_per_actor=0.5), progress=lambda s: None)
    # Two more tables written directly with embed's EmbedActor (no second Ray Data run): one from the
    # other encoder version, one of the same encoder with other vectors (every user's 5 latest events).
    from userfm.infer.embed import EmbedActor, model_identity

    short = rows
    for c in ("ts", "service", "text", "item_id", "category", "value"):
        short = short.set_column(short.column_names.index(c), c, pa.array([v[-5:] for v in rows.column(c).to_pylist()], rows.schema.field(c).type))
    for out, enc, seqs in (("emb-enc2", "enc2", rows), ("emb-short", "enc", short)):
        actor = EmbedActor(str(root / enc / "model"), model_identity(root / enc / "model"))
        (root / out / "embeddings").mkdir(parents=True)
        pq.write_table(actor(seqs).drop_columns(["reason"]), root / out / "embeddings" / "part-00000.parquet")

    from userfm.infer.embed import read_embeddings

    ids, x = read_embeddings(root / "emb-enc")
    attrs = pq.read_table(root / "raw" / "attributes.parquet").to_pylist()
    age = {a["user_id"]: a["age_bracket"] for a in attrs}
    classes = sorted(set(age.values()))
    y_cls = np.array([classes.index(age[u]) for u in ids])
    y_reg = np.array([float(n) for n in pq.read_table(root / "emb-enc" / "embeddings").column("n_events").to_pylist()])
    heads = root / "eval" / "heads"
    _fit_head("mlp", x, y_cls, dict(name="age", table="attributes", target="age_bracket", type="multiclass"), classes,
              root / "emb-enc", heads / "age" / "t-mlp" / "seed0")
    _fit_head("mlp", x, y_cls, dict(name="age", table="attributes", target="age_bracket", type="multiclass"), classes,
              root / "emb-enc", heads / "age" / "t-mlp" / "seed1")
    _fit_head("logreg", x, y_reg, dict(name="hist", table="attributes", target="n", type="regression"), None,
              root / "emb-enc", heads / "hist" / "t-logreg" / "seed0")
    _fit_head("mlp", x, y_reg, dict(name="hist", table="attributes", target="n", type="regression"), None,
              root / "emb-enc", heads / "hist" / "t-mlp" / "seed0")
    ids2, x2 = read_embeddings(root / "emb-enc2")
    _fit_head("mlp", x2, y_cls, dict(name="age", table="attributes", target="age_bracket", type="multiclass"), classes,
              root / "emb-enc2", root / "eval2" / "age2")
    return {"root": root, "rows": rows, "ids": ids, "x": x, "classes": classes}


@pytest.fixture(scope="module")
def app(world):
    """The app served on a free port of 127.0.0.1: encoder, table, a classification and a regression head."""
    from userfm.serve import app as serve

    root = world["root"]
    for name, key in (("key", "s3cret"), ("admin-key", "4dmin")):
        (root / name).write_text(key + "\n")
        (root / name).chmod(0o600)
    cfg = ServeConfig(model=str(root / "enc" / "model"), embeddings=str(root / "emb-enc"), port=0, api_key_file=str(root / "key"),
                      admin_key_file=str(root / "admin-key"),
                      max_ongoing_requests=16, max_queued_requests=24,
                      heads={"age": str(root / "eval" / "heads" / "age" / "t-mlp" / "seed0"),
                             "hist": str(root / "eval" / "heads" / "hist" / "t-logreg" / "seed0")},
                      max_events=200, max_text_chars=120, max_batch=8, max_k=20, max_body_bytes=100_000,
                      batch_size=8, batch_wait_s=0.05, encoder_cpus=0.3, head_cpus=0.05, store_cpus=0.05, ingress_cpus=0.1)
    base = serve.start(cfg, progress=lambda s: None)
    assert base.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=base, timeout=60, headers={"x-api-key": "s3cret"}) as client:
        yield {"base": base, "client": client, "cfg": cfg, **world}
    serve.stop()


def _user(world, i):
    row = world["rows"].slice(i, 1).to_pylist()[0]
    return row["user_id"], events_from_sequence(row)


def _stored(world, user_id):
    return world["x"][world["ids"].index(user_id)]


# ---------------------------------------------------------------------------------- no Serve needed


def test_events_to_rows_rebuilds_the_stored_sequence_in_order(world):
    rows = world["rows"].slice(0, 4).to_pylist()
    users = [events_from_sequence(r) for r in rows]
    users[1] = list(reversed(users[1])) + users[1][:2]  # shuffled, with 2 exact duplicates
    got = events_to_rows(users, max_events=1000).to_pylist()
    assert len(got) == 4
    for g, r in zip(got, rows):
        for c in ("ts", "service", "text", "item_id", "category", "value"):
            assert g[c] == r[c], c
        assert g["n_events"] == len(r["ts"])
    short = events_to_rows(users[:1], max_events=3).to_pylist()[0]
    assert short["text"] == rows[0]["text"][-3:] and short["n_events"] == len(rows[0]["ts"])


def test_plan_reads_versions_and_refuses_mismatches(world):
    root = world["root"]
    from userfm.infer.embed import model_identity

    v1 = model_identity(root / "enc" / "model")["model_version"]
    v2 = model_identity(root / "enc2" / "model")["model_version"]
    assert v1 != v2
    base = dict(model=str(root / "enc" / "model"), embeddings=str(root / "emb-enc"))
    heads = resolve_heads(ServeConfig(**base, heads_root=str(root / "eval" / "heads"), heads_embedding="t"))
    assert heads == {"age": str(root / "eval" / "heads" / "age" / "t-mlp" / "seed0"),
                     "hist": str(root / "eval" / "heads" / "hist" / "t-mlp" / "seed0")}
    p = plan(ServeConfig(**base, heads_root=str(root / "eval" / "heads"), heads_embedding="t", heads_kind="logreg"))
    assert list(p["heads"]) == ["hist"] and p["warnings"] == []
    assert p["encoder"]["model_version"] == p["embeddings"]["model_version"] == p["heads"]["hist"]["embedding_version"] == v1
    with pytest.raises(ServeError, match=rf"head 'age2'.*made by encoder version {v2}, the served encoder is {v1}"):
        plan(ServeConfig(**base, heads={"age2": str(root / "eval2" / "age2")}))
    with pytest.raises(ServeError, match=rf"embeddings .*emb-enc2: made by encoder version {v2}"):
        plan(ServeConfig(model=str(root / "enc" / "model"), embeddings=str(root / "emb-enc2")))
    warned = plan(ServeConfig(**base, heads={"age2": str(root / "eval2" / "age2")}, version_check="warn"))
    assert len(warned["warnings"]) == 1 and "age2" in warned["warnings"][0]
    with pytest.raises(ServeError, match="no t-logreg/seed3 head"):
        resolve_heads(ServeConfig(**base, heads_root=str(root / "eval" / "heads"), heads_embedding="t", heads_kind="logreg", heads_seed=3))
    with pytest.raises(ServeError, match="not an exported encoder"):
        plan(ServeConfig(model=str(root)))
    with pytest.raises(ServeError, match="not a saved head"):
        plan(ServeConfig(**base, heads={"x": str(root)}))
    with pytest.raises(ValueError, match="version_check"):
        ServeConfig(version_check="maybe")


def test_lookup_takes_rows_and_identity_from_the_one_table_it_is_given():
    from userfm.serve.deployments import _StoredTable

    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    meta = {"model_id": "m", "model_version": "v1", "table_version": "t1", "source": "s"}
    t = _StoredTable(["a", "b", "c"], {"a": 0, "b": 1, "c": 2}, x, np.linalg.norm(x, axis=1), meta)
    missing, got, ident = lookup(t, ["c", "a", "c"])
    assert missing == [] and ident == {"model_id": "m", "model_version": "v1", "table_version": "t1"}
    np.testing.assert_array_equal(got, [[3.0, 4.0], [1.0, 0.0], [3.0, 4.0]])
    missing, got, _ = lookup(t, ["b", "zz", "yy"])
    assert missing == ["zz", "yy"] and got is None


def test_batch_wait_applies_only_while_other_requests_are_in_flight():
    """An idle replica sends a lone request on at once (wait 0); requests that arrive while others are
    in flight wait batch_wait_s for a batch to fill. The count falls back after errors too."""
    import asyncio

    from userfm.serve.deployments import _IdleNoWait

    class FakeBatch:  # stands in for a @serve.batch method: records the wait each item is enqueued with
        def __init__(self):
            self.wait, self.size, self.seen, self.release = None, None, [], None

        def set_max_batch_size(self, n):
            self.size = n

        def set_batch_wait_timeout_s(self, s):
            self.wait = s

        async def __call__(self, item):
            self.seen.append((item, self.wait))
            await self.release.wait()
            if item == "bad":
                raise RuntimeError("model failed")
            return item * 2

    async def scenario():
        fake = FakeBatch()
        fake.release = asyncio.Event()
        b = _IdleNoWait(fake, batch_size=8, wait_s=0.005)
        assert (fake.size, fake.wait) == (8, 0.005)
        fake.release.set()
        assert await b(1) == 2  # alone: no wait
        fake.release.clear()
        calls = [asyncio.create_task(b(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0)  # all three enqueued, none answered
        assert b.in_flight == 3
        fake.release.set()
        assert await asyncio.gather(*calls) == [4, 6, 8]
        assert b.in_flight == 0
        with pytest.raises(RuntimeError, match="model failed"):
            await b("bad")
        assert b.in_flight == 0
        assert await b(5) == 10
        return fake.seen

    seen = asyncio.run(scenario())
    assert seen == [(1, 0.0), (2, 0.0), (3, 0.005), (4, 0.005), ("bad", 0.0), (5, 0.0)]


def test_serve_config_rejects_bad_timing_knobs():
    with pytest.raises(ValueError, match="batch_wait_s must be >= 0, got -0.1"):
        ServeConfig(batch_wait_s=-0.1)
    with pytest.raises(ValueError, match="table_sync_s must be > 0, got 0"):
        ServeConfig(table_sync_s=0)


def test_a_port_in_use_is_refused_not_shared():
    import socket

    from userfm.serve.app import _check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServeError, match=f"port {s.getsockname()[1]} on 127.0.0.1 is in use"):
            _check_port("127.0.0.1", s.getsockname()[1])


# ---------------------------------------------------------------------------------- the served app


def test_healthz_reports_models_and_versions(app):
    from userfm.infer.embed import model_identity

    r = app["client"].get("/healthz")
    assert r.status_code == 200, r.text
    h = r.json()
    v = model_identity(app["root"] / "enc" / "model")["model_version"]
    assert h["status"] == "ok" and h["warnings"] == []
    assert h["encoder"]["model_version"] == h["embeddings"]["model_version"] == v
    assert h["encoder"]["embed_dim"] == 12 and h["encoder"]["max_events"] == 16
    assert h["embeddings"]["users"] == N_USERS and h["embeddings"]["dim"] == 12
    assert {n: x["classes"] for n, x in h["heads"].items()} == {"age": app["classes"], "hist": None}
    assert h["heads"]["age"]["embedding_version"] == v
    assert app["client"].get("/docs").status_code == 200
    spec = app["client"].get("/openapi.json").json()
    assert {"/v1/embed", "/v1/heads/{name}/predict", "/v1/users/{user_id}/similar"} <= set(spec["paths"])
    assert app["client"].get("/v1/heads").json()["heads"][0]["name"] == "age"


def test_embed_equals_userfm_embed_and_each_caller_gets_its_own_result_under_concurrency(app):
    c = app["client"]
    users = [_user(app, i) for i in range(24)]

    def call(u):
        return httpx.post(f"{app['base']}/v1/embed", json={"user_id": u[0], "events": u[1]}, headers=KEY, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, users))
    for (uid, events), r in zip(users, answers):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == uid and body["dim"] == 12 and body["n_events"] == min(len(events), 16)
        np.testing.assert_allclose(body["embedding"], _stored(app, uid), rtol=1e-5, atol=1e-5)
    batching = c.get("/healthz").json()["encoder"]["batching"]
    assert batching["requests"] >= 24 and 1 < batching["largest_batch"] <= 8  # batched, within batch_size
    # the shuffled history of a user, one event duplicated: same embedding (sorted, deduplicated)
    uid, events = users[0]
    r = c.post("/v1/embed", json={"events": list(reversed(events)) + events[:1]})
    np.testing.assert_allclose(r.json()["embedding"], _stored(app, uid), rtol=1e-5, atol=1e-5)
    assert r.json()["user_id"] is None


def test_stored_embedding_and_similar_users(app):
    c = app["client"]
    uid = app["ids"][7]
    r = c.get(f"/v1/users/{uid}/embedding")
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["embedding"], _stored(app, uid), rtol=1e-6)
    x = app["x"] / np.linalg.norm(app["x"], axis=1, keepdims=True)
    scores = x @ x[7]
    scores[7] = -np.inf
    want = np.argsort(-scores, kind="stable")[:5]
    r = c.get(f"/v1/users/{uid}/similar", params={"k": 5})
    assert r.status_code == 200
    got = r.json()["neighbours"]
    assert [n["user_id"] for n in got] == [app["ids"][j] for j in want]
    np.testing.assert_allclose([n["score"] for n in got], scores[want], rtol=1e-5)
    assert len(c.get(f"/v1/users/{uid}/similar").json()["neighbours"]) == 10  # default k


def test_predict_by_user_ids_and_by_events_equals_the_loaded_heads(app):
    from userfm.eval.heads import load_head

    c = app["client"]
    age = load_head(app["root"] / "eval" / "heads" / "age" / "t-mlp" / "seed0")
    hist = load_head(app["root"] / "eval" / "heads" / "hist" / "t-logreg" / "seed0")
    uids = app["ids"][:5]
    x = np.stack([_stored(app, u) for u in uids])
    r = c.post("/v1/heads/age/predict", json={"user_ids": uids})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "stored" and body["classes"] == app["classes"] and body["task"] == "age"
    assert [p["user_id"] for p in body["predictions"]] == uids
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], age.predict_proba(x), rtol=1e-5, atol=1e-6)
    assert [p["prediction"] for p in body["predictions"]] == list(age.predict(x))
    r = c.post("/v1/heads/hist/predict", json={"user_id": uids[0]})
    np.testing.assert_allclose(r.json()["predictions"][0]["prediction"], hist.predict(x[:1])[0], rtol=1e-5)
    assert r.json()["predictions"][0]["probabilities"] is None
    uid, events = _user(app, 3)
    r = c.post("/v1/heads/age/predict", json={"events": events})
    assert r.status_code == 200 and r.json()["source"] == "events"
    np.testing.assert_allclose(r.json()["predictions"][0]["probabilities"], age.predict_proba(_stored(app, uid)[None])[0], rtol=1e-4, atol=1e-5)


def test_error_paths_name_the_field(app):
    c = app["client"]
    uid, events = _user(app, 0)
    ok = events[0]

    def detail(r, status):
        assert r.status_code == status, r.text
        return r.json()["detail"]

    assert "unknown user_id 'nobody'" in detail(c.get("/v1/users/nobody/embedding"), 404)
    assert "unknown user_id 'nobody'" in detail(c.get("/v1/users/nobody/similar"), 404)
    assert "unknown head 'nope'" in detail(c.post("/v1/heads/nope/predict", json={"user_id": uid}), 404)
    assert "['ghost1', 'ghost2']" in detail(c.post("/v1/heads/age/predict", json={"user_ids": [uid, "ghost1", "ghost2"]}), 404)
    d = detail(c.get(f"/v1/users/{uid}/similar", params={"k": 0}), 422)
    assert d[0]["loc"] == ["query", "k"]
    assert detail(c.get(f"/v1/users/{uid}/similar", params={"k": 21}), 422)[0]["loc"] == ["query", "k"]  # max_k 20
    assert detail(c.post("/v1/embed", json={"events": []}), 422)[0]["loc"] == ["body", "events"]
    assert detail(c.post("/v1/embed", json={"events": [ok] * 201}), 422)[0]["loc"] == ["body", "events"]  # max_events 200
    d = detail(c.post("/v1/embed", json={"events": [ok, {**ok, "text": "x" * 121}]}), 422)
    assert d[0]["loc"] == ["body", "events", 1, "text"] and d[0]["type"] == "string_too_long"
    d = detail(c.post("/v1/embed", json={"events": [{**ok, "text": "   "}]}), 422)
    assert d[0]["loc"] == ["body", "events", 0, "text"] and "whitespace" in d[0]["msg"]
    d = detail(c.post("/v1/embed", json={"events": [{**ok, "ts": "2200-01-01T00:00:00"}]}), 422)
    assert d[0]["loc"] == ["body", "events", 0, "ts"] and "2100-01-01" in d[0]["msg"]
    d = detail(c.post("/v1/embed", json={"events": [{**ok, "colour": "red"}]}), 422)
    assert d[0]["loc"] == ["body", "events", 0, "colour"] and d[0]["type"] == "extra_forbidden"
    d = detail(c.post("/v1/embed", json={"events": [{k: v for k, v in ok.items() if k != "service"}]}), 422)
    assert d[0]["loc"] == ["body", "events", 0, "service"] and d[0]["type"] == "missing"
    d = detail(c.post("/v1/heads/age/predict", json={"user_id": uid, "events": events}), 422)
    assert "exactly one of user_id, user_ids, events" in d[0]["msg"]
    assert detail(c.post("/v1/heads/age/predict", json={"user_ids": [uid] * 9}), 422)[0]["loc"] == ["body", "user_ids"]
    assert detail(c.post("/v1/embed", content=b"{not json", headers={"content-type": "application/json"}), 422)[0]["type"] == "json_invalid"
    big = {"events": [{**ok, "text": "y" * 100}] * 40, "pad": "z" * 100_000}
    assert "exceeds max_body_bytes=100000" in detail(c.post("/v1/embed", json=big), 413)


def _hops(r) -> list[str]:
    return [part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")]


def test_server_timing_names_the_hops_and_stored_lookups_skip_the_store(app):
    """Stored-embedding lookups are answered from the ingress replica's copy of the table (hop "table"),
    not by a handle call to the EmbeddingStore (hop "store"); every response says where its time went."""
    c = app["client"]
    uid, events = _user(app, 4)
    r = c.get(f"/v1/users/{uid}/embedding")
    assert r.status_code == 200 and _hops(r) == ["table", "ingress"]
    r = c.post("/v1/heads/age/predict", json={"user_ids": [uid, app["ids"][5]]})
    assert r.status_code == 200 and _hops(r) == ["table", "head", "ingress"]
    r = c.post("/v1/embed", json={"events": events})
    assert r.status_code == 200 and _hops(r) == ["encoder", "ingress"]
    r = c.get(f"/v1/users/{uid}/similar", params={"k": 3})
    assert r.status_code == 200 and _hops(r) == ["store", "ingress"]  # top-k is computed by the store
    r = c.get("/v1/users/nobody/embedding")
    assert r.status_code == 404 and _hops(r) == ["table", "ingress"]
    for part in c.get(f"/v1/users/{uid}/embedding").headers["server-timing"].split(","):
        assert float(part.split(";dur=")[1]) >= 0
    h = c.get("/healthz").json()
    assert h["ingress_table"] == h["embeddings"]["table_version"]


def test_without_ingress_table_lookups_go_to_the_store_with_the_same_answers(app):
    """``ingress_table: false`` (tables too big for a copy per ingress replica): the same answers, each
    lookup a handle call to the EmbeddingStore. A second app on the same Serve proxy, under /store."""
    from dataclasses import replace

    from ray import serve as ray_serve

    from userfm.serve import app as serve

    cfg = replace(app["cfg"], ingress_table=False, app_name="userfm-store", route_prefix="/store",
                  heads={"age": app["cfg"].heads["age"]})
    base = serve.start(cfg, progress=lambda s: None)
    try:
        assert base == app["base"] + "/store"
        uid = app["ids"][9]
        with httpx.Client(base_url=base, timeout=60, headers=KEY) as c:
            r = c.get(f"/v1/users/{uid}/embedding")
            assert r.status_code == 200 and _hops(r) == ["store", "ingress"]
            np.testing.assert_allclose(r.json()["embedding"], _stored(app, uid), rtol=1e-6)
            r = c.post("/v1/heads/age/predict", json={"user_ids": [uid, "ghost"]})
            assert r.status_code == 404 and "['ghost']" in r.json()["detail"] and _hops(r) == ["store", "ingress"]
            r = c.post("/v1/heads/age/predict", json={"user_id": uid})
            want = app["client"].post("/v1/heads/age/predict", json={"user_id": uid}).json()["predictions"]
            assert r.status_code == 200 and _hops(r) == ["store", "head", "ingress"] and r.json()["predictions"] == want
            assert c.get("/healthz").json()["ingress_table"] is None
    finally:
        ray_serve.delete(cfg.app_name)


def test_reload_switches_the_table_version_and_refuses_another_encoder(app):
    c = app["client"]
    root, uid = app["root"], app["ids"][11]
    from userfm.infer.embed import read_embeddings

    before = c.get("/healthz").json()["embeddings"]
    short_ids, short_x = read_embeddings(root / "emb-short")
    r = c.post("/v1/admin/reload", json={"embeddings": str(root / "emb-short")}, headers=ADMIN)
    assert r.status_code == 200, r.text
    after = r.json()["embeddings"]
    assert after["table_version"] != before["table_version"] and after["model_version"] == before["model_version"]
    np.testing.assert_allclose(c.get(f"/v1/users/{uid}/embedding").json()["embedding"], short_x[short_ids.index(uid)], rtol=1e-6)
    assert c.get("/healthz").json()["embeddings"]["table_version"] == after["table_version"]
    r = c.post("/v1/admin/reload", json={"embeddings": str(root / "emb-enc2")}, headers=ADMIN)
    assert r.status_code == 409 and "made by encoder version" in r.json()["detail"]
    assert c.get("/healthz").json()["embeddings"]["table_version"] == after["table_version"]  # old table still served
    r = c.post("/v1/admin/reload", json={"embeddings": str(root / "no-such-table")}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["detail"] == ("refused: the table could not be read as a userfm embedding "
                                                           "table (the server log says why)")
    assert str(root) not in r.text  # no server path in an error body
    r = c.post("/v1/admin/reload", json={"embeddings": str(root / "emb-enc")}, headers=ADMIN)
    assert r.json()["embeddings"]["table_version"] == before["table_version"]
    np.testing.assert_allclose(c.get(f"/v1/users/{uid}/embedding").json()["embedding"], _stored(app, uid), rtol=1e-6)
    assert c.get("/healthz").json()["ingress_table"] == before["table_version"]  # the ingress copy followed


def test_ingress_copy_follows_a_reload_made_on_the_store_itself(app):
    """A reload that does not pass through this ingress replica (another replica, a Serve config, here a
    direct handle call) reaches its copy at the next version check (table_sync_s)."""
    import time

    from ray import serve

    c, root, uid = app["client"], app["root"], app["ids"][13]
    from userfm.infer.embed import read_embeddings

    short_ids, short_x = read_embeddings(root / "emb-short")
    store = serve.get_deployment_handle("EmbeddingStore", app_name=app["cfg"].app_name)
    try:
        meta = store.reload.remote(str(root / "emb-short")).result(timeout_s=60)
        deadline = time.monotonic() + 60  # a hang guard, not a timed assertion
        while c.get("/healthz").json()["ingress_table"] != meta["table_version"] and time.monotonic() < deadline:
            time.sleep(0.2)
        r = c.get(f"/v1/users/{uid}/embedding")
        assert r.status_code == 200 and _hops(r) == ["table", "ingress"]
        np.testing.assert_allclose(r.json()["embedding"], short_x[short_ids.index(uid)], rtol=1e-6)
    finally:
        c.post("/v1/admin/reload", json={"embeddings": str(root / "emb-enc")}, headers=ADMIN).raise_for_status()
    np.testing.assert_allclose(c.get(f"/v1/users/{uid}/embedding").json()["embedding"], _stored(app, uid), rtol=1e-6)


def test_predictions_during_reloads_come_from_one_table_never_a_mix(app):
    """Predict by 6 user ids while the table flips between two versions: each answer equals the head on
    the 6 rows of one table (all old or all new), never some rows of each."""
    import threading
    import time

    from userfm.infer.embed import read_embeddings
    from userfm.eval.heads import load_head

    c, root = app["client"], app["root"]
    age = load_head(root / "eval" / "heads" / "age" / "t-mlp" / "seed0")
    uids = app["ids"][20:26]
    short_ids, short_x = read_embeddings(root / "emb-short")
    want = {"full": age.predict_proba(np.stack([_stored(app, u) for u in uids])),
            "short": age.predict_proba(np.stack([short_x[short_ids.index(u)] for u in uids]))}
    assert not np.allclose(want["full"], want["short"], atol=1e-4)  # the two tables give different answers
    stop, answers, failures = threading.Event(), [], []

    def ask():
        with httpx.Client(base_url=app["base"], headers=KEY, timeout=60) as cl:
            while not stop.is_set():
                r = cl.post("/v1/heads/age/predict", json={"user_ids": uids})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:200]))
                    continue
                answers.append(np.array([p["probabilities"] for p in r.json()["predictions"]]))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for table in ("emb-short", "emb-enc", "emb-short", "emb-enc"):
            assert c.post("/v1/admin/reload", json={"embeddings": str(root / table)}, headers=ADMIN).status_code == 200
            n0, deadline = len(answers), time.monotonic() + 60  # a few answers from each table (hang guard)
            while len(answers) < n0 + 6 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    seen = {name for a in answers for name, w in want.items() if np.allclose(a, w, rtol=1e-5, atol=1e-6)}
    mixed = [a for a in answers if not any(np.allclose(a, w, rtol=1e-5, atol=1e-6) for w in want.values())]
    assert failures == [] and len(answers) >= 24 and mixed == [] and seen == {"full", "short"}


def _fuzz(app, n: int, headers: list[dict]) -> dict[tuple[str, str, int], int]:
    """``n`` hypothesis-generated requests over every route (bodies, paths, query values and which of
    ``headers`` is sent all generated); asserts each gets a 2xx or a 4xx. Returns {(method, route, status): count}
    of the requests the client could send at all."""
    from collections import Counter

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    uid, events = _user(app, 1)
    text = st.text(st.characters(exclude_categories=()), max_size=60)  # lone surrogates included
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), text)
    event = st.fixed_dictionaries(
        {"ts": st.one_of(st.datetimes().map(lambda d: d.isoformat()), st.integers(-10**12, 10**14), text),
         "service": st.one_of(st.sampled_from(["shopping", "news"]), text),
         "text": st.one_of(st.sampled_from([e["text"] for e in events]), text)},
        optional={"item_id": st.one_of(st.none(), text), "category": st.one_of(st.none(), st.lists(text, max_size=18), scalar),
                  "value": scalar, "extra": scalar})
    body = st.one_of(
        st.fixed_dictionaries({"events": st.lists(event, max_size=45)}, optional={"user_id": st.one_of(text, scalar)}),
        st.fixed_dictionaries({}, optional={"user_id": st.one_of(st.sampled_from(app["ids"][:3]), text, scalar),
                                            "user_ids": st.one_of(st.lists(st.sampled_from(app["ids"][:20]) | text, max_size=10), scalar),
                                            "events": st.lists(event, max_size=3)}),
        st.recursive(scalar, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(text, ch, max_size=3), max_leaves=8),
    )
    root = str(app["root"])
    reload_body = st.one_of(
        body, st.fixed_dictionaries({}, optional={"embeddings": st.one_of(
            scalar, st.sampled_from(["emb-enc", "emb-enc2", "no-such", "../", "/etc", root, root + "/emb-enc",
                                     "s3://b/x", "file:///etc/passwd", "emb-enc/../../.."]))}))
    route = st.one_of(
        st.tuples(st.just("POST"), st.sampled_from(["/v1/embed", "/v1/heads/age/predict", "/v1/heads/hist/predict"]), body),
        st.tuples(st.just("POST"), text.map(lambda t: f"/v1/heads/{t}/predict"), body),
        st.tuples(st.just("GET"), st.one_of(st.sampled_from(app["ids"][:3]), text).map(lambda u: f"/v1/users/{u}/embedding"), st.none()),
        st.tuples(st.just("GET"), st.tuples(st.sampled_from(app["ids"][:3]) | text, st.integers(-5, 200) | text)
                  .map(lambda a: f"/v1/users/{a[0]}/similar?k={a[1]}"), st.none()),
        st.tuples(st.just("POST"), st.just("/v1/admin/reload"), reload_body),
        st.tuples(st.just("GET"), st.sampled_from(["/v1/heads", "/healthz"]), st.none()),
    )
    counts: Counter = Counter()

    def template(path: str) -> str:
        parts = path.split("?")[0].split("/")
        if path.startswith("/v1/users/"):
            return "/v1/users/{id}/" + parts[-1]
        if path.startswith("/v1/heads/") and path.endswith("/predict"):
            return "/v1/heads/{name}/predict"
        return path

    @settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(route, st.sampled_from(headers))
    def check(r, hdr):
        method, path, payload = r
        try:
            resp = app["client"].request(method, path, content=json.dumps(payload) if payload is not None else None,
                                         headers={"content-type": "application/json", "x-api-key": "", **hdr})
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError, UnicodeError):
            return  # the client cannot even send that path
        counts[(method, template(path), resp.status_code)] += 1
        assert 200 <= resp.status_code < 300 or 400 <= resp.status_code < 500, (
            method, path, payload, hdr, resp.status_code, resp.text[:300])

    check()
    return dict(counts)


def test_generated_requests_get_only_2xx_or_4xx(app):
    counts = _fuzz(app, 300, [KEY])
    statuses = [s for (_, _, s), n in counts.items() for _ in range(n)]
    # a share of generated paths cannot be sent at all (the client refuses the URL): 236 of 300 were sent
    # in one fresh-clone run, 250+ in others
    assert len(statuses) >= 200 and any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    app["client"].post("/v1/admin/reload", json={"embeddings": "emb-enc"}, headers=ADMIN).raise_for_status()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_every_route_with_keys_on_and_off(app, capsys):
    """The security fuzz run: >= 2,000 generated requests sent with keys on (no key, the read key, the admin key
    or a wrong one), then the same app restarted without keys (loopback) for >= 2,000 more. Only 2xx/4xx, and
    the server still healthy. Prints the counts per route and status (pytest -s)."""
    import dataclasses

    from userfm.serve import app as serve

    keyed = _fuzz(app, 2400, [{}, KEY, ADMIN, {"x-api-key": "wrong"}])  # ~15 % of generated paths cannot be sent
    assert httpx.get(f"{app['base']}/healthz", timeout=60).status_code == 200
    serve.stop()
    cfg = dataclasses.replace(app["cfg"], api_key_file="", admin_key_file="")
    base = serve.start(cfg, progress=lambda s: None)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            open_ = _fuzz({**app, "client": client, "base": base}, 2400, [{}, {"x-api-key": "anything"}])
            assert client.get("/healthz").status_code == 200
    finally:
        serve.stop()
        app["base"] = serve.start(app["cfg"], progress=lambda s: None)  # the module's app again, for any test after
        app["client"].base_url = app["base"]
    with capsys.disabled():
        for name, counts in (("keys on", keyed), ("keys off", open_)):
            print(f"\n[fuzz] {name}: {sum(counts.values())} requests sent")
            for (method, path, status), n in sorted(counts.items()):
                print(f"[fuzz]   {method:4} {path:28} {status} x {n}")
    assert sum(keyed.values()) >= 2000 and sum(open_.values()) >= 2000
    assert {s for (_, _, s) in keyed} >= {200, 401, 403} and {s for (_, p, s) in open_ if p == "/v1/admin/reload"} == {403}


def test_api_key_guards_every_route_but_healthz_and_docs(app):
    uid, events = _user(app, 2)
    base = app["base"]
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/docs").status_code == 200 and httpx.get(f"{base}/openapi.json").status_code == 200
    for method, path, body in (("POST", "/v1/embed", {"events": events}), ("GET", f"/v1/users/{uid}/embedding", None),
                               ("GET", f"/v1/users/{uid}/similar", None), ("GET", "/v1/heads", None),
                               ("POST", "/v1/heads/age/predict", {"user_id": uid}), ("POST", "/v1/admin/reload", {})):
        for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": ""}):
            r = httpx.request(method, base + path, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["detail"] == "missing or wrong X-API-Key header", (path, headers)
    assert httpx.get(f"{base}/v1/heads", headers=KEY).status_code == 200


def test_overload_gets_503_from_serve_backpressure_never_500_or_a_hang(app):
    """Ingress: 16 in flight + 24 queued; 96 simultaneous heavy requests -> some 503, the rest 200."""
    import threading

    heavy = max((_user(app, i) for i in range(N_USERS)), key=lambda u: len(u[1]))[1]
    heavy = (heavy * 10)[: app["cfg"].max_events]
    gate = threading.Barrier(96)

    def call(_):
        gate.wait()
        return httpx.post(f"{app['base']}/v1/embed", json={"events": heavy}, headers=KEY, timeout=120).status_code

    with ThreadPoolExecutor(96) as pool:
        codes = list(pool.map(call, range(96)))
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 16, sorted(codes)
    assert app["client"].get("/healthz").status_code == 200  # and it serves again


@pytest.mark.slow
def test_a_killed_encoder_replica_recovers_and_no_request_is_lost_after_retry(app):
    """Kill the encoder replica in the middle of a bounded burst; retried requests all succeed."""
    import time

    import ray

    fits = [u for u in (_user(app, i) for i in range(N_USERS)) if len(u[1]) <= app["cfg"].max_events]
    users = [fits[i % len(fits)] for i in range(300)]
    first_failures, lost, done_at = [], [], []

    def call(u):
        for attempt in range(8):
            try:
                r = httpx.post(f"{app['base']}/v1/embed", json={"user_id": u[0], "events": u[1]}, headers=KEY, timeout=60)
                if r.status_code == 200:
                    np.testing.assert_allclose(r.json()["embedding"], _stored(app, u[0]), rtol=1e-5, atol=1e-5)
                    done_at.append(time.monotonic())
                    return attempt
                failure = r.status_code
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
            if attempt == 0:
                first_failures.append(failure)
            time.sleep(0.5 * (attempt + 1))
        lost.append(u[0])
        return None

    def encoder_replicas():
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Encoder#" in a["name"] and "userfm#" in a["name"]]

    names = encoder_replicas()
    assert len(names) == 1, names
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, u) for u in users]
        while len(done_at) < 20:
            time.sleep(0.01)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        attempts = [f.result() for f in futures]
    after = sum(t > killed_at for t in done_at)
    print(f"\nreplica kill: {len(users)} requests, {after} answered after the kill, {len(first_failures)} failed on the "
          f"first try ({sorted(set(map(str, first_failures)))}), {len(lost)} lost after retries, "
          f"most attempts {max(a or 0 for a in attempts) + 1}")
    assert after > 0  # the kill fell inside the burst
    assert set(first_failures) <= {503}  # a request caught in the dead replica: 503 (retry), not a 500
    assert lost == []
    assert app["client"].get("/healthz").status_code == 200
    assert encoder_replicas() and encoder_replicas() != names  # Serve started a new replica


# ---------------------------------------------------------------------------------- auth and reload rules


def _key(path, text="k3y", mode=0o600):
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


def test_key_files_and_exposure_rules(tmp_path):
    from userfm.serve.config import auth_summary, check_exposure, is_loopback, read_key_file

    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "0.0.0.0", "10.0.0.5", "::")] == [
        True, True, True, True, False, False, False]
    with pytest.raises(ServeError, match=r"readable by every user on this machine \(mode 0o644\); chmod 600 it"):
        read_key_file(_key(tmp_path / "open", mode=0o644), "api_key_file")
    with pytest.raises(ServeError, match="api_key_file: no file"):
        read_key_file(str(tmp_path / "nope"), "api_key_file")
    with pytest.raises(ServeError, match="is empty"):
        read_key_file(_key(tmp_path / "blank", ""), "api_key_file")
    assert read_key_file(_key(tmp_path / "ok"), "api_key_file") == "k3y"
    # no key beyond loopback: refused, one line, naming the way out
    with pytest.raises(ServeError) as e:
        check_exposure(ServeConfig(host="0.0.0.0"))
    assert str(e.value) == ("refusing to serve on 0.0.0.0 without api_key_file: every route would be open to the network "
                            "(set api_key_file, and admin_key_file for /v1/admin/*; or allow_unauthenticated: true)")
    assert check_exposure(ServeConfig(host="127.0.0.1")) == {"read": "open", "admin": "off", "allow_unauthenticated": False}
    assert check_exposure(ServeConfig(host="0.0.0.0", allow_unauthenticated=True))["allow_unauthenticated"] is True
    read, admin = _key(tmp_path / "r", "read-key"), _key(tmp_path / "a", "admin-key")
    assert check_exposure(ServeConfig(host="0.0.0.0", api_key_file=read, admin_key_file=admin)) == {
        "read": "key", "admin": "key", "allow_unauthenticated": False}
    with pytest.raises(ServeError, match="hold the same key"):
        check_exposure(ServeConfig(api_key_file=read, admin_key_file=_key(tmp_path / "a2", "read-key")))
    assert auth_summary(ServeConfig(admin_key_file=admin))["admin"] == "key"


def test_reload_targets_stay_under_the_root(tmp_path):
    """Relative and absolute paths inside the root pass (resolved); `..`, absolute paths outside, symlinks that
    lead out and URIs without an allowed prefix are refused with the rule, never the server's paths."""
    from userfm.serve.config import reload_target

    root = tmp_path / "emb"
    (root / "v2").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "inside-link").symlink_to(root / "v2", target_is_directory=True)
    cfg = ServeConfig(embeddings=str(root / "v1"))  # root: the folder holding the served table
    assert reload_target("v2", cfg, str(root / "v1")) == str((root / "v2").resolve())
    assert reload_target(str(root / "v2"), cfg, str(root / "v1")) == str((root / "v2").resolve())
    assert reload_target("inside-link", cfg, str(root / "v1")) == str((root / "v2").resolve())
    assert reload_target(None, cfg, str(root / "v1")) == str(root / "v1")
    for bad in ("../outside", "v2/../../outside", str(tmp_path / "outside"), "/etc", "escape", "escape/x", "v2\x00", "v2\udc80"):
        with pytest.raises(PermissionError) as e:
            reload_target(bad, cfg, str(root / "v1"))
        assert str(tmp_path) not in str(e.value) and "embeddings_root" in str(e.value), bad
    for uri in ("s3://bucket/emb/v2", "file:///etc/passwd", "gs://x", "http://127.0.0.1/x"):
        with pytest.raises(PermissionError, match="reload_uri_prefixes"):
            reload_target(uri, cfg, str(root / "v1"))
    allowed = ServeConfig(embeddings=str(root / "v1"), reload_uri_prefixes=("s3://bucket/emb/",), embeddings_root=str(tmp_path))
    assert reload_target("s3://bucket/emb/v2", allowed, str(root / "v1")) == "s3://bucket/emb/v2"
    with pytest.raises(PermissionError):
        reload_target("s3://bucket/other", allowed, str(root / "v1"))
    assert reload_target("outside", allowed, str(root / "v1")) == str((tmp_path / "outside").resolve())  # a wider root


def test_guard_without_admin_key_turns_admin_routes_off():
    """The ingress's key guard alone (FastAPI's test client, no Serve): with no admin_key_file every admin
    route is 403 whatever key is sent; read routes follow api_key_file."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from userfm.serve.app import make_api

    for api_key in ("", "r3ad"):
        ing = SimpleNamespace(cfg=ServeConfig(), plan={}, api_key=api_key, admin_key="", heads={}, store=None, table=None)
        with TestClient(make_api(ing)) as c:
            for headers in ({}, {"x-api-key": "r3ad"}, {"x-api-key": "anything"}):
                r = c.post("/v1/admin/reload", json={}, headers=headers)
                assert (r.status_code, r.json()) == (403, {"detail": "admin routes are off: the server has no admin_key_file"})
            r = c.get("/v1/heads")
            assert r.status_code == (401 if api_key else 200)


def test_minilm_cache_comes_from_the_pretraining_run(tmp_path):
    from userfm.serve.config import resolve_minilm_cache

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (tmp_path / "ds" / "minilm_cache").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"pretrain": {"data": str(tmp_path / "ds"), "minilm_cache": ""}}))
    assert resolve_minilm_cache(ServeConfig(model=str(run / "model"))) == str(tmp_path / "ds" / "minilm_cache")
    (tmp_path / "mine").mkdir()
    assert resolve_minilm_cache(ServeConfig(model=str(run / "model"), minilm_cache=str(tmp_path / "mine"))) == str(tmp_path / "mine")
    (run / "config.json").write_text(json.dumps({"pretrain": {"data": str(tmp_path / "gone")}}))
    assert resolve_minilm_cache(ServeConfig(model=str(run / "model"))) == ""


def test_admin_routes_need_the_admin_key(app):
    base, uid = app["base"], app["ids"][3]
    for headers, status, detail in (({}, 401, "missing or wrong X-API-Key header"), (KEY, 403, "this key may read, not "
                                    "administer: admin routes need the admin key"), ({"x-api-key": "4dmin-not"}, 401, None)):
        r = httpx.post(f"{base}/v1/admin/reload", json={}, headers=headers)
        assert r.status_code == status and (detail is None or r.json()["detail"] == detail), (headers, r.text)
    r = httpx.post(f"{base}/v1/admin/reload", json={}, headers=ADMIN, timeout=60)  # re-read the current table
    assert r.status_code == 200 and r.json()["embeddings"]["users"] == len(app["ids"])
    assert httpx.get(f"{base}/v1/users/{uid}/embedding", headers=ADMIN).status_code == 401  # the admin key is not a read key
    assert httpx.get(f"{base}/healthz").json()["auth"] == {"read": "key", "admin": "key", "allow_unauthenticated": False}


def test_reload_outside_the_root_is_403_and_reads_nothing(app, tmp_path):
    """../, an absolute path elsewhere, a symlink in the root that leads out (to a valid table: a reload
    would succeed if it were read) and other schemes: 403 naming the rule, the served table unchanged."""
    import shutil

    root = app["root"]
    outside = tmp_path / "stolen"
    shutil.copytree(root / "emb-short", outside)
    link = root / "looks-inside"
    link.symlink_to(outside, target_is_directory=True)
    before = httpx.get(f"{app['base']}/healthz").json()["embeddings"]["table_version"]
    try:
        for target in (f"../{tmp_path.name}/stolen", str(outside), "looks-inside", "/etc", "s3://bucket/emb", "file:///etc"):
            r = httpx.post(f"{app['base']}/v1/admin/reload", json={"embeddings": target}, headers=ADMIN, timeout=60)
            detail = r.json()["detail"]
            assert r.status_code == 403 and ("embeddings_root" in detail or "reload_uri_prefixes" in detail), (target, r.text)
            assert str(tmp_path) not in r.text and str(root) not in r.text
        assert httpx.get(f"{app['base']}/healthz").json()["embeddings"]["table_version"] == before
    finally:
        link.unlink()


def test_cli_serve_beyond_loopback_without_keys_exits_with_one_line(capsys, tmp_path):
    from userfm.cli import main

    assert main(["serve", "--model", str(tmp_path / "m"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to serve on 0.0.0.0 without api_key_file" in err[0]
