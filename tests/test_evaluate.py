"""userfm evaluate: tasks, splits, heads (save/load), and a tiny end-to-end run on synthetic data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.eval import metrics as M
from userfm.config import ConfigError
from userfm.data.dataset import load_manifest, read_attributes, read_sequences
from userfm.models.cooc import catalog_vectors
from userfm.eval.baselines import concat_features, minilm_mean_table, tfidf_features, user_texts
from userfm.eval.embeddings import load_embeddings, random_embeddings
from userfm.eval.evaluate import run_evaluate
from userfm.eval.heads import fit_logreg, fit_mlp, fit_retrieval, load_head, retrieval_ranks, save_head
from userfm.eval.task_data import item_histories, item_services, last_event_table, task_data, user_table
from userfm.eval.tasks import EvalConfig, EvalError, TaskConfig, load_tasks
from userfm.models.features import text_hash

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
TASKS = ("segment", "is_parent", "next_service", "n_future_events")


def _write_table(path: Path, ids: list[str], x: np.ndarray) -> Path:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])
    pq.write_table(pa.table({"user_id": pa.array(ids, pa.string()), "embedding": emb}), path)
    return path


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory, ray_local):
    """600 synthetic users ingested with both label tables, plus a 'leaky' embedding table that
    encodes segment and is_parent (it must beat the random floor on those tasks)."""
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    root = tmp_path_factory.mktemp("eval")
    raw, ds = root / "raw", root / "ds"
    generate(SynthConfig(n_users=600, events_per_user=20, seed=1), raw)
    run_ingest(IngestConfig(inputs=(str(raw / "events"),), out=str(ds),
                            attributes=(str(raw / "attributes.parquet"), str(raw / "future_labels.parquet"))),
               progress=lambda s: None)
    attrs = read_attributes(ds, "attributes")
    ids = attrs.column("user_id").to_pylist()
    segs = sorted(set(attrs.column("segment").to_pylist()))
    x = np.random.default_rng(0).normal(0, 1, (len(ids), 16))
    for i, (s, p) in enumerate(zip(attrs.column("segment").to_pylist(), attrs.column("is_parent").to_pylist())):
        x[i, segs.index(s)] += 3.0
        x[i, 15] += 3.0 * p
    leaky = _write_table(root / "leaky.parquet", ids, x)
    return {"root": root, "raw": raw, "ds": ds, "leaky": leaky}


def _cfg(env, out: str, **kw) -> EvalConfig:
    base = dict(data=str(env["ds"]), embeddings={"leaky": str(env["leaky"]), "random": "random"},
                tasks=str(REPO / "experiments/tasks/synthetic.yaml"), only_tasks=TASKS, out=str(env["root"] / out),
                seeds=2, bootstrap_samples=60, mlp_max_epochs=60, mlp_patience=5, logreg_c=(0.1, 1.0))
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def evaluated(synth_ds):
    digest = hashlib.sha256(synth_ds["leaky"].read_bytes()).hexdigest()
    results = run_evaluate(_cfg(synth_ds, "run1"), progress=lambda s: None)
    return results, digest


# ---------------------------------------------------------------------------------------- tasks


def test_shipped_task_files_load():
    syn = load_tasks(REPO / "experiments/tasks/synthetic.yaml")
    assert {t.name for t in syn} >= {"age_bracket", "is_parent", "segment", "next_service", "n_future_events"}
    assert {t.metric for t in syn if t.type == "binary" and t.table == "future_labels"} == {"auc"}
    ml = load_tasks(REPO / "experiments/tasks/movielens.yaml")
    assert [t.name for t in ml] == ["gender", "age_bracket", "occupation", "next_genre", "next_item"]
    assert [(t.type, t.metric) for t in ml if t.table == "last_event"] == [("multiclass", "accuracy"), ("retrieval", "hr@10")]
    az = load_tasks(REPO / "experiments/tasks/amazon-arts-office.yaml")
    assert [(t.holdout, t.users, t.catalog, t.history) for t in az if t.type == "retrieval"] == [
        (1, "all", "all", "all"), (1, "last_service:arts", "service", "all"), (2, "last_service:office", "service", "all"),
        (2, "last_service:office", "service", "service:arts"), (1, "last_service:arts", "service", "service:office")]
    assert {t.view for t in az} == {(1, ""), (2, ""), (2, "arts"), (1, "office")}
    # the Amazon subsets real.py --tasks runs are the full file's tasks, field for field, in its order
    by_name = {t.name: t for t in az}
    for subset, names in (("amazon-office-targets", ["next_item_office", "next_category_office"]),
                          ("amazon-category", ["next_category_arts", "next_category_office",
                                               "office_category_from_arts", "arts_category_from_office"]),
                          ("amazon-next-arts-category", ["next_category_arts"])):
        sub = load_tasks(REPO / f"experiments/tasks/{subset}.yaml")
        assert [t.name for t in sub] == names and list(sub) == [by_name[n] for n in names], subset
    held = load_tasks(REPO / "experiments/tasks/synthetic-heldout.yaml")
    assert {t.table for t in held} == {"last_event"} and "retrieval" in {t.type for t in held}


def test_task_config_errors(tmp_path):
    with pytest.raises(ValueError, match="auc"):
        TaskConfig(name="t", table="attributes", target="segment", type="multiclass", metric="auc")
    assert TaskConfig(name="t", table="a", target="b", type="regression").metric == "rmse"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: t, table: attributes, target: segment, type: multiclass, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_tasks(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("- {name: t, table: a, target: b, type: binary}\n- {name: t, table: a, target: c, type: binary}\n")
    with pytest.raises(EvalError, match="duplicate"):
        load_tasks(dup)
    with pytest.raises(EvalError, match="nope"):
        load_tasks(REPO / "experiments/tasks/synthetic.yaml", only=("nope",))
    with pytest.raises(ValueError, match="table: last_event and target: item_id"):
        TaskConfig(name="r", table="attributes", target="segment", type="retrieval")
    with pytest.raises(ValueError, match="ndcg@10"):
        TaskConfig(name="r", table="last_event", target="item_id", type="retrieval", metric="auc")
    assert TaskConfig(name="r", table="last_event", target="item_id", type="retrieval").metric == "hr@10"


def test_missing_column_error_names_column_and_table(synth_ds, tmp_path):
    tasks = tmp_path / "t.yaml"
    tasks.write_text("- {name: shoe_size, table: attributes, target: shoe_size, type: regression}\n")
    with pytest.raises(EvalError, match="column 'shoe_size' is not in table 'attributes'"):
        run_evaluate(_cfg(synth_ds, "bad", tasks=str(tasks), only_tasks=()), progress=lambda s: None)
    tasks.write_text("- {name: x, table: labels, target: y, type: binary}\n")
    with pytest.raises(EvalError, match="no attributes table 'labels'.*future_labels"):
        run_evaluate(_cfg(synth_ds, "bad", tasks=str(tasks), only_tasks=()), progress=lambda s: None)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------- data


def test_splits_are_user_disjoint_and_match_the_dataset(synth_ds):
    ds = synth_ds["ds"]
    users = user_table(ds)
    task = TaskConfig(name="segment", table="attributes", target="segment", type="multiclass")
    td = task_data(ds, task, users)
    train, val, test = (set(td.ids[s]) for s in ("train", "val", "test"))
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train) + len(val) + len(test) == read_attributes(ds, "attributes").num_rows
    seq = read_sequences(ds, columns=["user_id", "split"])
    split_of = dict(zip(seq.column("user_id").to_pylist(), seq.column("split").to_pylist()))
    assert all(split_of[u] == "test" for u in test) and all(split_of[u] == "train" for u in train)
    assert td.classes == sorted(td.classes) and td.y["train"].max() == len(td.classes) - 1


def test_users_filter_multi_service(synth_ds):
    ds = synth_ds["ds"]
    users = user_table(ds)
    task = TaskConfig(name="n", table="future_labels", target="next_service", type="multiclass", users="multi_service")
    td = task_data(ds, task, users)
    n_svc = dict(zip(users.column("user_id").to_pylist(), users.column("n_services").to_pylist()))
    kept = [u for s in td.ids for u in td.ids[s]]
    assert kept and all(n_svc[u] >= 2 for u in kept)
    assert td.left_out["users_filter"] > 0 and td.left_out["null_label"] > 0  # single-service users; no future event


def test_random_embeddings_depend_only_on_user_and_seed():
    a = random_embeddings(np.array(["u1", "u2"], object), 8, seed=0)
    b = random_embeddings(np.array(["u9", "u1"], object), 8, seed=0)
    np.testing.assert_array_equal(a[0], b[1])
    assert not np.allclose(a[0], random_embeddings(np.array(["u1"], object), 8, seed=1)[0])
    assert a.dtype == np.float32 and abs(a.std() - 1.0) < 0.6


def test_embeddings_missing_a_user_is_an_error(synth_ds, tmp_path):
    attrs = read_attributes(synth_ds["ds"], "attributes")
    ids = attrs.column("user_id").to_pylist()[:-5]
    path = _write_table(tmp_path / "short.parquet", ids, np.zeros((len(ids), 4)))
    table = load_embeddings(path, "short")
    assert table.dim == 4
    with pytest.raises(EvalError, match="5 labelled user"):
        table.lookup(np.array(attrs.column("user_id").to_pylist(), object))


# ---------------------------------------------------------------------------------------- heads


def _blobs(n=300, k=3, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(0, 1, (n, d)).astype(np.float32) * 5 + 10  # unstandardised on purpose
    x[np.arange(n), y] += 25.0  # 5 sd apart: near-separable, a working head is > 90 % right
    return x, y


@pytest.mark.parametrize("k", [2, 3])
def test_logreg_head_matches_sklearn_and_round_trips(tmp_path, k):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(k=k)
    task = TaskConfig(name="t", table="a", target="b", type="binary" if k == 2 else "multiclass")
    classes = ["no", "yes"] if k == 2 else ["a", "b", "c"]
    head = fit_logreg(x[:200], y[:200], x[200:250], y[200:250], task=task, classes=classes,
                      cfg=EvalConfig(logreg_c=(1.0,)), seed=0)
    mean, std = x[:200].mean(0), x[:200].std(0)
    ref = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit((x[:200] - mean) / std, y[:200])
    np.testing.assert_allclose(head.predict_proba(x[250:]), ref.predict_proba((x[250:] - mean) / std), atol=1e-5)
    loaded = load_head(save_head(tmp_path / "h", head))
    np.testing.assert_allclose(loaded.predict_proba(x[250:]), head.predict_proba(x[250:]), atol=1e-6)
    assert list(loaded.predict(x[250:253])) == [classes[i] for i in head.predict_proba(x[250:253]).argmax(1)]


def test_mlp_head_learns_early_stops_and_round_trips(tmp_path):
    x, y = _blobs(n=400)
    task = TaskConfig(name="t", table="a", target="b", type="multiclass")
    cfg = EvalConfig(mlp_hidden=32, mlp_max_epochs=100, mlp_patience=5, mlp_batch_size=64)
    head = fit_mlp(x[:300], y[:300], x[300:350], y[300:350], task=task, classes=["a", "b", "c"], cfg=cfg, seed=0)
    assert M.compute("accuracy", y[350:], head.predict_proba(x[350:])) > 0.9
    # Labels that are pure noise: the val loss is best within a few epochs, then training stops
    # `patience` epochs later and the best epoch's weights are the ones kept.
    noise = np.random.default_rng(1).integers(0, 3, 400)
    over = fit_mlp(x[:300], noise[:300], x[300:350], noise[300:350], task=task, classes=["a", "b", "c"],
                   cfg=dataclasses.replace(cfg, mlp_hidden=256), seed=0)
    assert over.meta["best_epoch"] < 50 and over.meta["epochs"] == over.meta["best_epoch"] + 1 + 5
    val_loss = M.log_loss(noise[300:350], over.predict_proba(x[300:350]))
    assert val_loss == pytest.approx(over.meta["val_loss"], rel=1e-4)
    again = fit_mlp(x[:300], y[:300], x[300:350], y[300:350], task=task, classes=["a", "b", "c"], cfg=cfg, seed=0)
    np.testing.assert_array_equal(again.predict_proba(x[350:]), head.predict_proba(x[350:]))  # seeded
    loaded = load_head(save_head(tmp_path / "mlp", head))
    np.testing.assert_allclose(loaded.predict_proba(x[350:]), head.predict_proba(x[350:]), atol=1e-6)
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))


def test_mlp_head_on_sparse_features_trains_as_on_the_same_dense_ones(tmp_path):
    """Sparse features (TF-IDF, bag-of-items) skip the standardising and are densified a mini-batch at a time.
    On +-1 columns balanced over the training rows the standardising is the identity (mean 0, sd 1 exactly),
    so the sparse path must train the very head the dense path does: same batches, same weights, same
    predictions, on dense or sparse test rows, before and after a save."""
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(0)
    x = np.concatenate([np.stack([rng.permutation(np.repeat([1.0, -1.0], 150)) for _ in range(8)], axis=1),
                        rng.choice([-1.0, 1.0], (100, 8))]).astype(np.float32)  # (400, 8): the 300 training rows balanced
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)  # 3 classes
    task = TaskConfig(name="t", table="a", target="b", type="multiclass")
    cfg = EvalConfig(mlp_hidden=16, mlp_max_epochs=200, mlp_patience=10, mlp_batch_size=32, mlp_lr=1e-2)
    dense = fit_mlp(x[:300], y[:300], x[300:350], y[300:350], task=task, classes=["a", "b", "c"], cfg=cfg, seed=0)
    sparse = fit_mlp(csr_matrix(x[:300]), y[:300], csr_matrix(x[300:350]), y[300:350], task=task, classes=["a", "b", "c"],
                     cfg=cfg, seed=0)
    np.testing.assert_array_equal(dense.w["x_mean"], 0.0)
    np.testing.assert_array_equal(dense.w["x_std"], 1.0)
    assert sparse.meta["epochs"] == dense.meta["epochs"] and sparse.meta["val_loss"] == pytest.approx(dense.meta["val_loss"], abs=1e-6)
    np.testing.assert_allclose(sparse.predict_proba(x[350:]), dense.predict_proba(x[350:]), atol=1e-6)
    np.testing.assert_allclose(sparse.predict_proba(csr_matrix(x[350:])), dense.predict_proba(x[350:]), atol=1e-6)
    assert M.compute("accuracy", y[350:], sparse.predict_proba(csr_matrix(x[350:]))) > 0.9
    loaded = load_head(save_head(tmp_path / "sparse", sparse))
    np.testing.assert_allclose(loaded.predict_proba(csr_matrix(x[350:])), sparse.predict_proba(x[350:]), atol=1e-6)
    assert loaded.predict_proba(csr_matrix((0, 8), dtype=np.float32)).shape == (0, 3)


def test_small_training_sets_get_at_least_mlp_min_steps_batches_per_epoch():
    """200 users at batch 256 would be one step per epoch (patience then counts single steps): the batch
    shrinks to ceil(n / mlp_min_steps); every row is seen once per epoch."""
    import torch

    from userfm.eval.heads import _early_stopped_fit, mlp_batch

    cfg = EvalConfig()
    assert (mlp_batch(200, cfg), mlp_batch(2048, cfg), mlp_batch(2049, cfg), mlp_batch(8000, cfg), mlp_batch(3, cfg)) == (25, 256, 256, 256, 1)
    assert mlp_batch(200, dataclasses.replace(cfg, mlp_min_steps=1)) == 200
    model = torch.nn.Linear(2, 1)
    sizes = []

    def batch_loss(idx):
        sizes.append(len(idx))
        return model(torch.ones(len(idx), 2)).sum()

    _early_stopped_fit(model, 200, batch_loss, lambda: torch.tensor(1.0), dataclasses.replace(cfg, mlp_patience=2),
                       torch.Generator().manual_seed(0))
    # epoch 0 sets the best (1.0), epochs 1 and 2 do not improve: 3 epochs of 8 batches of 25
    assert sizes == [25] * 24
    with pytest.raises(ValueError, match="mlp_min_steps must be >= 1"):
        EvalConfig(mlp_min_steps=0)


def test_regression_heads_predict_values(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 4)).astype(np.float32)
    y = 3.0 * x[:, 0] + 100.0 + rng.normal(0, 0.1, 300)
    task = TaskConfig(name="r", table="a", target="b", type="regression")
    cfg = EvalConfig(mlp_hidden=16, mlp_batch_size=32, logreg_c=(100.0,))
    for fit in (fit_logreg, fit_mlp):
        head = fit(x[:200], y[:200], x[200:250], y[200:250], task=task, classes=None, cfg=cfg, seed=0)
        assert M.rmse(y[250:], head.predict(x[250:])) < 0.6  # target sd is 3: the head learned it
        loaded = load_head(save_head(tmp_path / fit.__name__, head))
        np.testing.assert_allclose(loaded.predict(x[250:]), head.predict(x[250:]), rtol=1e-5)
        with pytest.raises(EvalError, match="regression"):
            loaded.predict_proba(x[:2])


# ---------------------------------------------------------------------------------------- end to end


def test_every_model_row_is_present(evaluated):
    results, _ = evaluated
    models = {"leaky/mlp", "leaky/logreg", "random/mlp", "random/logreg", "tfidf/logreg", "bag-of-items/logreg"}
    for task in TASKS:
        got = {r["model"] for r in results["rows"] if r["task"] == task}
        expected = models | ({"oracle"} if task in ("segment", "is_parent") else set())
        assert got == expected, task
    for r in results["rows"]:
        if r["model"] == "oracle":
            continue
        lo, hi = r["test"]["ci"]
        assert lo <= r["test"]["value"] <= hi or r["metric"] == "rmse", r  # seed mean inside its interval
        assert r["cold"]["n"] > 0 and r["heavy"]["n"] > 0 and len(r["per_seed"]) == 2
        assert r["train_s"] > 0 and r["infer_s"] >= 0
    out = Path(results["config"]["out"])
    on_disk = json.loads((out / "results.json").read_text())
    assert len(on_disk["rows"]) == len(results["rows"])
    md = (out / "results.md").read_text()
    assert "## segment" in md and "| leaky/logreg |" in md and "| oracle (accuracy) |" not in md
    assert json.loads((out / "config.json").read_text())["seeds"] == 2


def _bag_by_hand(synth_ds, task_name: str):
    """The task's TaskData and its binary user x item matrices (split -> dense), built with Python sets."""
    td = task_data(synth_ds["ds"], next(t for t in load_tasks(REPO / "experiments/tasks/synthetic.yaml") if t.name == task_name),
                   user_table(synth_ds["ds"]))
    seq = {r["user_id"]: {i for i in r["item_id"] if i is not None}
           for r in read_sequences(synth_ds["ds"], columns=["user_id", "item_id"]).to_pylist()}
    vocab = sorted(set().union(*(seq[u] for u in td.ids["train"])))
    col = {v: j for j, v in enumerate(vocab)}

    def matrix(split):
        x = np.zeros((len(td.ids[split]), len(vocab)), np.float32)
        for k, u in enumerate(td.ids[split]):
            x[k, [col[i] for i in seq[u] if i in col]] = 1.0
        return x

    return td, {s: matrix(s) for s in td.ids}


def test_bag_of_items_row_by_hand(evaluated, synth_ds):
    """The bag-of-items row is a logistic regression on the binary user x item matrix of the training users'
    items, built here from the sequences with Python sets, at the C val chose."""
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import LogisticRegression

    results, _ = evaluated
    row = next(r for r in results["rows"] if r["task"] == "segment" and r["model"] == "bag-of-items/logreg")
    td, x = _bag_by_hand(synth_ds, "segment")
    assert row["bag_of_items"]["features"] == x["train"].shape[1] and row["bag_of_items"]["C"] in (0.1, 1.0)
    model = LogisticRegression(C=row["bag_of_items"]["C"], max_iter=1000, random_state=0).fit(csr_matrix(x["train"]), td.y["train"])
    acc = np.mean(model.predict(csr_matrix(x["test"])) == td.y["test"])
    assert acc == pytest.approx(row["per_seed"][0], abs=1e-6) and row["per_seed"] == [row["per_seed"][0]] * 2
    leaky = next(r for r in results["rows"] if r["task"] == "segment" and r["model"] == "leaky/logreg")
    assert set(leaky["paired"]) == {"tfidf/logreg", "bag-of-items/logreg"}


def test_sparse_mlp_rows_are_the_u_mlp_on_the_yardsticks_features(synth_ds):
    """``sparse-mlp`` adds ``tfidf/mlp`` and ``bag-of-items/mlp``: one U-MLP fit per seed on the very sparse
    matrices the logistic rows read (the bag rebuilt here by hand), and both compete for the best yardstick."""
    from scipy.sparse import csr_matrix

    results = run_evaluate(_cfg(synth_ds, "sparse", embeddings={"leaky": str(synth_ds["leaky"])}, only_tasks=("segment",),
                                baselines=("tfidf", "bag-of-items", "sparse-mlp")), progress=lambda s: None)
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"leaky/mlp", "leaky/logreg", "tfidf/logreg", "bag-of-items/logreg", "tfidf/mlp", "bag-of-items/mlp"}
    td, x = _bag_by_hand(synth_ds, "segment")
    cfg = EvalConfig(**{k: v for k, v in results["config"].items() if k in ("mlp_max_epochs", "mlp_patience")})
    bag = rows["bag-of-items/mlp"]
    assert bag["head"] == "mlp" and bag["embedding"] is None and len(bag["per_seed"]) == 2
    assert bag["sparse_mlp"]["features"] == x["train"].shape[1] and len(bag["sparse_mlp"]["epochs"]) == 2
    for seed in (0, 1):
        head = fit_mlp(csr_matrix(x["train"]), td.y["train"], csr_matrix(x["val"]), td.y["val"], task=td.task,
                       classes=td.classes, cfg=cfg, seed=seed)
        assert M.compute("accuracy", td.y["test"], head.predict_proba(csr_matrix(x["test"]))) == pytest.approx(bag["per_seed"][seed], abs=1e-6)
    assert rows["tfidf/mlp"]["sparse_mlp"]["features"] == rows["tfidf/logreg"]["tfidf"]["features"]
    info = next(t for t in results["tasks"] if t["name"] == "segment")
    assert info["best_yardstick"] == max(("tfidf/logreg", "bag-of-items/logreg", "tfidf/mlp", "bag-of-items/mlp"),
                                         key=lambda m: rows[m]["test"]["value"])
    # results.md names a paired column by the whole model when two heads of one yardstick are columns
    best = info["best_yardstick"]
    md = (Path(results["config"]["out"]) / "results.md").read_text()
    assert (f"| vs {best} | vs {best}, cold |" if best.endswith("/mlp") else f"| vs {best.split('/')[0]} |") in md


def test_leaky_embeddings_beat_the_random_floor(evaluated):
    results, _ = evaluated
    row = {(r["task"], r["model"]): r for r in results["rows"]}
    for task in ("segment", "is_parent"):
        for head in ("mlp", "logreg"):
            leaky, rand = row[(task, f"leaky/{head}")], row[(task, f"random/{head}")]
            assert leaky["test"]["ci"][0] > rand["test"]["ci"][1], (task, head)
            assert leaky["vs_random"]["model"] == f"random/{head}" and leaky["vs_random"]["ci"][0] > 0
    # the floor is a floor: random embeddings are near chance on a 12-class task
    assert row[("segment", "random/logreg")]["test"]["value"] < 0.25


def test_oracle_row_comes_from_ground_truth(evaluated, synth_ds):
    results, _ = evaluated
    truth = json.loads((synth_ds["raw"] / "ground_truth.json").read_text())
    oracle = next(r for r in results["rows"] if r["task"] == "segment" and r["model"] == "oracle")
    assert oracle["test"]["value"] == pytest.approx(truth["attributes"]["segment"]["oracle_accuracy"], abs=1e-6)


def test_cold_and_heavy_are_test_quartiles(evaluated, synth_ds):
    results, _ = evaluated
    info = next(t for t in results["tasks"] if t["name"] == "segment")
    seq = read_sequences(synth_ds["ds"], split="test", columns=["n_events"]).column("n_events").to_numpy()
    lo, hi = np.quantile(seq, [0.25, 0.75])
    assert info["cold_max_events"] == lo and info["heavy_min_events"] == hi
    assert info["n_cold"] == int((seq <= lo).sum()) and info["n_heavy"] == int((seq >= hi).sum())


def test_saved_heads_reproduce_the_reported_numbers(evaluated, synth_ds):
    results, _ = evaluated
    out = Path(results["config"]["out"])
    users = user_table(synth_ds["ds"])
    td = task_data(synth_ds["ds"], TaskConfig(name="segment", table="attributes", target="segment", type="multiclass"), users)
    x_test = load_embeddings(synth_ds["leaky"]).lookup(td.ids["test"])
    for model in ("leaky/mlp", "leaky/logreg"):
        row = next(r for r in results["rows"] if r["task"] == "segment" and r["model"] == model)
        assert len(row["heads"]) == (2 if model == "leaky/mlp" else 1)  # deterministic logreg: fitted once
        head = load_head(out / row["heads"][-1])
        assert head.classes == td.classes
        assert M.compute("accuracy", td.y["test"], head.predict_proba(x_test)) == pytest.approx(row["per_seed"][-1], abs=1e-6)


def test_embedding_table_is_unchanged(evaluated, synth_ds):
    _, digest = evaluated
    assert hashlib.sha256(synth_ds["leaky"].read_bytes()).hexdigest() == digest


def test_same_seed_same_results(evaluated, synth_ds):
    results, _ = evaluated
    again = run_evaluate(_cfg(synth_ds, "run2", only_tasks=("segment", "n_future_events")), progress=lambda s: None)

    def strip(rows, tasks):
        drop = ("train_s", "infer_s", "infer_users_per_s")
        return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["task"] in tasks]

    assert strip(again["rows"], {"segment", "n_future_events"}) == strip(results["rows"], {"segment", "n_future_events"})


def test_worker_processes_fit_the_same_heads(evaluated, synth_ds):
    """workers=2 fits a task's heads and baselines in two processes: the same rows in the same order as the
    one-by-one run (U-MLP rows exactly: seeded torch on one thread either way; lbfgs within its tolerance,
    which the BLAS thread count can move: here at most one test user), and a progress line per job."""
    results, _ = evaluated
    lines = []
    par = run_evaluate(_cfg(synth_ds, "run_workers", only_tasks=("segment", "n_future_events"), workers=2),
                       progress=lines.append)
    one = [r for r in results["rows"] if r["task"] in {"segment", "n_future_events"}]
    assert [(r["task"], r["model"]) for r in par["rows"]] == [(r["task"], r["model"]) for r in one]
    for a, b in zip(par["rows"], one):
        if a["head"] == "mlp":
            assert a["per_seed"] == b["per_seed"], a["model"]
        n = max(r["test"]["n"] or 0 for r in one if r["task"] == b["task"])  # (the oracle row has none)
        assert abs(a["test"]["value"] - b["test"]["value"]) <= max(1.01 / n, 1e-3 * abs(b["test"]["value"])), a["model"]
        assert a.get("heads") == b.get("heads"), a["model"]
    done = [ln for ln in lines if " done (" in ln]
    # per task: 2 tables x 2 heads x 2 seeds, less one logreg seed on the fixed table, + bag-of-items + TF-IDF
    n_jobs = 2 * 2 * 2 - 1 + ("bag-of-items" in par["config"]["baselines"]) + ("tfidf" in par["config"]["baselines"])
    assert len(done) == 2 * n_jobs and done[-1].endswith(f"done ({n_jobs}/{n_jobs})"), done[-3:]


def test_t_trans_trains_from_scratch_and_beats_the_floor(synth_ds):
    # Future activity is predictable from the history itself (its length, recency): a transformer
    # trained on the task's training users must beat random embeddings (lower RMSE) on test users.
    cfg = _cfg(synth_ds, "ttrans", embeddings={"random": "random"}, heads=("mlp",), baselines=("t-trans",),
               only_tasks=("n_future_events",), seeds=1, t_trans_item_encoder="category", t_trans_max_events=32,
               t_trans_max_epochs=12, t_trans_lrs=(1e-3,), save_heads=False)
    results = run_evaluate(cfg, progress=lambda s: None)
    row = next(r for r in results["rows"] if r["model"] == "t-trans")
    assert row["vs_random"]["model"] == "random/mlp" and row["vs_random"]["ci"][1] < 0
    assert row["t_trans"]["params"] > 10_000 and row["t_trans"]["epochs"][0] <= 12
    assert row["train_s"] > row["infer_s"] > 0


# ---------------------------------------------------------------------------------------- held-out last event, retrieval


def test_last_event_labels_are_each_users_last_event(synth_ds):
    ds = synth_ds["ds"]
    seq = read_sequences(ds, columns=["user_id", "n_events", "item_id", "service", "category"]).to_pylist()
    last = {r["user_id"]: r for r in last_event_table(ds).to_pylist()}
    catalog, items = item_histories(ds)
    assert catalog == sorted({i for r in seq for i in r["item_id"] if i is not None})
    for r in seq[:200]:
        got = last[r["user_id"]]
        if r["n_events"] < 2:
            assert got["item_id"] is None and got["service"] is None  # no history would be left
            continue
        assert (got["item_id"], got["service"]) == (r["item_id"][-1], r["service"][-1])
        path = r["category"][-1]
        assert (got["category_top"], got["category_leaf"]) == ((path[0], path[-1]) if path else (None, None))
        assert [catalog[i] for i in items[r["user_id"]]] == [i for i in r["item_id"] if i is not None]
    task = TaskConfig(name="n", table="last_event", target="item_id", type="retrieval")
    td = task_data(ds, task, user_table(ds))
    n_ev = dict((r["user_id"], r["n_events"]) for r in seq)
    u = td.ids["test"][0]
    assert catalog[td.y["test"][0]] == last[u]["item_id"] and td.n_events["test"][0] == n_ev[u] - 1
    assert [catalog[i] for i in td.history["test"][0]] == [catalog[i] for i in items[u][:-1]]


def test_nth_last_event_tasks_service_filters_catalog_and_category_levels(synth_ds):
    ds = synth_ds["ds"]
    seq = {r["user_id"]: r for r in read_sequences(ds, columns=["user_id", "n_events", "item_id", "service", "category"]).to_pylist()}
    second = {r["user_id"]: r for r in last_event_table(ds, 2).to_pylist()}
    for u, r in list(seq.items())[:200]:
        got = second[u]
        if r["n_events"] < 3:
            assert got["item_id"] is None and got["category_path"] is None
            continue
        assert (got["item_id"], got["service"], got["category_path"]) == (r["item_id"][-2], r["service"][-2], r["category"][-2] or None)
    catalog, items = item_histories(ds)
    svc_of = {}
    for r in seq.values():
        for i, s in zip(r["item_id"], r["service"]):
            if i is not None:
                svc_of.setdefault(i, set()).add(s)
    assert all(len(v) == 1 for v in svc_of.values())  # the generator's items belong to one service each
    np.testing.assert_array_equal(item_services(ds, catalog), np.array([next(iter(svc_of[i])) for i in catalog], object))
    svc = next(iter(load_manifest(ds)["services"]))
    task = TaskConfig(name="n2", table="last_event", holdout=2, target="item_id", type="retrieval",
                      users=f"last_service:{svc}", catalog="service")
    assert task.label_table == "last_event@2"
    td = task_data(ds, task, user_table(ds))
    want = sorted(u for u, r in seq.items() if r["n_events"] >= 3 and r["item_id"][-2] is not None and r["service"][-2] == svc)
    assert sorted(u for s in ("train", "val", "test") for u in td.ids[s]) == want
    outside = {k for k, i in enumerate(catalog) if next(iter(svc_of[i])) != svc}
    for k, u in enumerate(td.ids["test"]):
        r = seq[u]
        assert catalog[td.y["test"][k]] == r["item_id"][-2] and td.n_events["test"][k] == r["n_events"] - 2
        assert [catalog[i] for i in td.history["test"][k]] == [i for i in r["item_id"][:-2] if i is not None]
        assert set(td.outside["test"][k].tolist()) == outside
        both = td.excluded("test", mask_seen=True)[k]
        assert set(both.tolist()) == outside | set(td.history["test"][k].tolist())
    assert td.excluded("test", mask_seen=False) is td.outside["test"]
    level = TaskConfig(name="c", table="last_event", target="category@1", type="multiclass")
    tl = task_data(ds, level, user_table(ds))
    for k, u in enumerate(tl.ids["test"][:50]):
        assert tl.classes[tl.y["test"][k]] == seq[u]["category"][-1][1]


def test_nth_last_event_task_config_errors():
    with pytest.raises(ValueError, match="holdout applies to table last_event only"):
        TaskConfig(name="t", table="attributes", target="segment", type="multiclass", holdout=1)
    with pytest.raises(ValueError, match="holdout must be >= 1"):
        TaskConfig(name="t", table="last_event", target="service", type="multiclass", holdout=0)
    with pytest.raises(ValueError, match="catalog applies to retrieval tasks only"):
        TaskConfig(name="t", table="last_event", target="service", type="multiclass", catalog="service")
    with pytest.raises(ValueError, match="catalog must be one of"):
        TaskConfig(name="t", table="last_event", target="item_id", type="retrieval", catalog="arts")
    with pytest.raises(ValueError, match="filters on the held-out event"):
        TaskConfig(name="t", table="attributes", target="segment", type="multiclass", users="last_service:news")
    with pytest.raises(ValueError, match="category@<k>"):
        TaskConfig(name="t", table="last_event", target="category@x", type="multiclass")
    assert TaskConfig(name="t", table="last_event", target="category@0", type="multiclass").holdout == 1
    assert TaskConfig(name="t", table="attributes", target="segment", type="multiclass").holdout == 0


def test_service_catalog_run_popularity_by_hand(synth_ds):
    """holdout 2 + catalog service end to end: popularity ranks the 2nd-last item among its service's items
    only; a table embedded with the last event only held out is refused (it has seen the label)."""
    root, ds = synth_ds["root"], synth_ds["ds"]
    ids = read_sequences(ds, columns=["user_id"]).column("user_id").to_pylist()
    x = np.random.default_rng(5).normal(0, 1, (len(ids), 8)).astype(np.float32)
    tables = {}
    for h in (1, 2):
        tables[h] = root / f"held{h}.parquet"
        pq.write_table(pa.table({"user_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
                                 "holdout_last": pa.array([h] * len(ids), pa.int64())}), tables[h])
    svc = next(iter(load_manifest(ds)["services"]))
    tasks = root / "svc.yaml"
    tasks.write_text(f"- {{name: n2, table: last_event, holdout: 2, target: item_id, type: retrieval, "
                     f"users: 'last_service:{svc}', catalog: service}}\n")
    kw = dict(tasks=str(tasks), only_tasks=(), heads=("logreg",), baselines=("popularity",), seeds=1)
    with pytest.raises(EvalError, match=r"last 2 event\(s\).*holdout_last=1.*--set holdout_last=2"):
        run_evaluate(_cfg(synth_ds, "svc1", embeddings={"e": str(tables[1])}, **kw), progress=lambda s: None)
    results = run_evaluate(_cfg(synth_ds, "svc2", embeddings={"e": str(tables[2])}, **kw), progress=lambda s: None)
    seq = read_sequences(ds, columns=["user_id", "split", "n_events", "item_id", "service"]).to_pylist()
    svc_items = {i for r in seq for i, s in zip(r["item_id"], r["service"]) if i is not None and s == svc}
    labelled = [r for r in seq if r["n_events"] >= 3 and r["item_id"][-2] is not None and r["service"][-2] == svc]
    counts = {}
    for r in labelled:
        if r["split"] == "train":  # the training users' items before and at the target (the last one is never read)
            for i in r["item_id"][:-1]:
                if i is not None:
                    counts[i] = counts.get(i, 0) + 1
    test = [r for r in labelled if r["split"] == "test"]
    ranks = [sum(1 for i in svc_items if i != r["item_id"][-2] and counts.get(i, 0) >= counts.get(r["item_id"][-2], 0))
             for r in test]
    info = results["tasks"][0]
    assert info["catalog"] == "service" and info["n_items_ranked"] == [len(svc_items)] and info["holdout_last"] == 2
    pop = next(r for r in results["rows"] if r["model"] == "popularity")
    assert pop["test"]["n"] == len(test)
    assert pop["test"]["value"] == pytest.approx(np.mean(np.array(ranks) < 10), abs=1e-6)


def test_transfer_task_reads_one_services_history(synth_ds):
    """history service:<B>: every model reads the user's B events before the held-out event, nothing else;
    users with none are left out with a reason; an embedding table of every event is refused, one embedded
    from B's events only (its manifest says so) is scored."""
    from userfm.eval.bag_of_items import user_items
    from userfm.eval.baselines import user_texts

    root, ds = synth_ds["root"], synth_ds["ds"]
    seq = {r["user_id"]: r for r in read_sequences(ds, columns=["user_id", "n_events", "item_id", "service", "text"]).to_pylist()}

    def n_users(a, b):  # test users of the task "a's target from b's history"
        return sum(r["n_events"] >= 3 and r["item_id"][-2] is not None and r["service"][-2] == a and b in r["service"][:-2]
                   for r in seq.values())
    services = sorted(load_manifest(ds)["services"])
    a, b = max(((a, b) for a in services for b in services if a != b), key=lambda ab: n_users(*ab))
    task = TaskConfig(name="x", table="last_event", holdout=2, target="item_id", type="retrieval",
                      users=f"last_service:{a}", catalog="service", history=f"service:{b}")
    assert (task.view, task.history_service) == ((2, b), b)
    labelled = [u for u, r in seq.items() if r["n_events"] >= 3 and r["item_id"][-2] is not None and r["service"][-2] == a]
    b_events = {u: [k for k, s in enumerate(seq[u]["service"][:-2]) if s == b] for u in labelled}
    td = task_data(ds, task, user_table(ds))
    assert sorted(u for s in ("train", "val", "test") for u in td.ids[s]) == sorted(u for u in labelled if b_events[u])
    assert td.left_out.get("no_history_in_service", 0) == sum(not v for v in b_events.values())
    for split in ("train", "val", "test"):
        for k, u in enumerate(td.ids[split]):
            r = seq[u]
            assert [td.classes[i] for i in td.history[split][k]] == [r["item_id"][j] for j in b_events[u] if r["item_id"][j] is not None]
            assert td.n_events[split][k] == len(b_events[u]) and td.classes[td.y[split][k]] == r["item_id"][-2]
    u = td.ids["test"][0]
    assert user_texts(ds, 2, b)[u] == "\n".join(seq[u]["text"][j] for j in b_events[u])
    assert user_items(ds, 2, b)[u] == [seq[u]["item_id"][j] for j in b_events[u] if seq[u]["item_id"][j] is not None]
    ids = list(seq)
    x = np.random.default_rng(5).normal(0, 1, (len(ids), 8)).astype(np.float32)
    emb = root / "held2_b" / "embeddings"
    emb.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
                             "holdout_last": pa.array([2] * len(ids), pa.int64())}), emb / "part-0.parquet")
    tasks = root / "transfer.yaml"
    tasks.write_text(f"- {{name: x, table: last_event, holdout: 2, target: item_id, type: retrieval, users: 'last_service:{a}', "
                     f"catalog: service, history: 'service:{b}'}}\n")
    kw = dict(tasks=str(tasks), only_tasks=(), heads=("logreg",), baselines=("popularity",), seeds=1)
    with pytest.raises(EvalError, match=rf"reads {b} events only.*made from every event.*history_service={b}"):
        run_evaluate(_cfg(synth_ds, "tr1", embeddings={"e": str(emb.parent)}, **kw), progress=lambda s: None)
    (emb.parent / "manifest.json").write_text(json.dumps({"kind": "userfm.embeddings", "holdout_last": 2, "history_service": b}))
    other = root / "held2_b_other"
    shutil.copytree(emb.parent, other)
    pq.write_table(pa.table({"user_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[:, ::-1].ravel()), 8),
                             "holdout_last": pa.array([2] * len(ids), pa.int64())}), other / "embeddings" / "part-0.parquet")
    # reference: every other table's rows are paired with the reference table's row of the same head
    results = run_evaluate(_cfg(synth_ds, "tr2", embeddings={"e": str(emb.parent), "f": str(other)}, reference="e", **kw),
                           progress=lambda s: None)
    info = results["tasks"][0]
    assert info["history"] == f"service:{b}" and info["users"]["test"] == len(td.ids["test"])
    assert {r["model"]: r["test"]["n"] for r in results["rows"]} == dict.fromkeys(
        ("e/logreg", "f/logreg", "val-chosen", "popularity", "popularity-unseen"), len(td.ids["test"]))
    row = {r["model"]: r for r in results["rows"]}
    assert row["f/logreg"]["paired"]["e/logreg"]["test"]["value"] == pytest.approx(
        row["f/logreg"]["test"]["value"] - row["e/logreg"]["test"]["value"], abs=1e-6)
    assert "e/logreg" not in row["e/logreg"]["paired"]
    md = (Path(results["config"]["out"]) / "results.md").read_text()  # results.md shows it in its own column
    f_line = next(line for line in md.splitlines() if line.startswith("| f/logreg |"))
    assert "vs e (same head) |" in md and f" {row['f/logreg']['paired']['e/logreg']['test']['value']:+.3f} [" in f_line
    with pytest.raises(ValueError, match="reference 'g' must name one of the embedding tables"):
        _cfg(synth_ds, "tr3", reference="g")
    with pytest.raises(ValueError, match="history must be 'all' or 'service:<name>'"):
        TaskConfig(name="t", table="last_event", target="service", type="multiclass", history="arts")
    with pytest.raises(EvalError, match="history 'service:tv': no service 'tv'"):
        task_data(ds, TaskConfig(name="t", table="last_event", target="service", type="multiclass", history="service:tv"),
                  user_table(ds))


def _clusters(n=700, groups=10, per=5, d=16, seed=0):
    """Users in ``groups`` taste groups, each owning ``per`` of the 50 items; the embedding shows the group."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    x = rng.normal(0, 1, (n, d)).astype(np.float32)
    x[np.arange(n), g] += 4.0
    y = g * per + rng.integers(0, per, n)
    hist = [g[i] * per + rng.integers(0, per, 3) for i in range(n)]
    return x, y, hist


@pytest.mark.parametrize("factorized", [False, True])
@pytest.mark.parametrize("hidden", [0, 32])
def test_retrieval_head_learns_and_round_trips(tmp_path, hidden, factorized):
    x, y, hist = _clusters()
    items = [f"i{k:03d}" for k in range(50)]
    task = TaskConfig(name="r", table="last_event", target="item_id", type="retrieval")
    cfg = EvalConfig(mlp_max_epochs=60, mlp_patience=5, mlp_batch_size=64, mlp_lr=1e-2)
    vectors = catalog_vectors(hist[:400], 50, 16) if factorized else None
    head = fit_retrieval(x[:400], y[:400], x[400:500], y[400:500], task=task, classes=items, cfg=cfg, seed=0,
                         history=hist[:400], hidden=hidden, item_vectors=vectors)
    assert head.meta["item_factors"] == (16 if factorized else 0)
    ranks = M.target_rank(head.logits(x[500:]), y[500:])
    # the 5 items of the user's group are what a head that learned ranks first: chance HR@10 is 0.2
    assert M.hit_rate_at_k(ranks, 10) > 0.85 and M.ndcg_at_k(ranks, 10) > 0.4
    np.testing.assert_array_equal(retrieval_ranks(lambda r: head.logits(x[500:][r]), 200, y[500:], chunk=7), ranks)
    loaded = load_head(save_head(tmp_path / "h", head))
    assert loaded.meta["kind"] == ("mlp" if hidden else "softmax") and loaded.classes == items
    np.testing.assert_allclose(loaded.logits(x[500:]), head.logits(x[500:]), rtol=1e-5, atol=1e-5)
    assert loaded.predict_proba(x[500:502]).shape == (2, 50)
    top = loaded.predict(x[500:])  # the top item is one of the user's group
    assert np.mean([int(t[1:]) // 5 == yy // 5 for t, yy in zip(top, y[500:])]) > 0.85


def test_factorized_head_ranks_items_no_training_user_held_out():
    """Each group's items 3 and 4 are never a training target, only in histories. The dense head can rank them
    only by their small history share; the head factorized through the catalog's co-occurrence vectors learns
    the group's direction once and ranks all five of the group's items first.

    The vectors have one dimension per group (10). Histories stay within a group, so the PPMI is
    block-diagonal with one 5 x 5 block per group; each block's leading singular value (its Perron vector,
    positive) is ~4x its others (a 5-clique a(J - I) has singular values 4a once and a four times), so the top
    10 directions are the 10 blocks' and every item's vector is its group's axis whatever BLAS kernel runs the
    SVD (checked below, to rounding). With 9 dimensions for 10 near-equal blocks, which 9 directions survive
    was up to the kernel, and so was this test's result (issue 24: HR@5 0.59 to 0.74).
    """
    items = [f"i{k:03d}" for k in range(50)]
    task = TaskConfig(name="r", table="last_event", target="item_id", type="retrieval")
    cfg = EvalConfig(mlp_max_epochs=60, mlp_patience=5, mlp_batch_size=64, mlp_lr=1e-2, retrieval_history_weight=0.05)
    group = np.arange(50) // 5
    hits = {"dense": [], "factorized": []}
    for data_seed in (0, 1, 2):  # three draws of users: the claim is checked on 234 test users, not one draw's 70
        x, y, hist = _clusters(seed=data_seed)
        rare = y % 5 >= 3
        tr = np.flatnonzero(~rare[:400])
        vectors = catalog_vectors(hist[:400], 50, 10)
        np.testing.assert_allclose(vectors @ vectors.T / 10, group[:, None] == group[None, :], atol=1e-4)
        test = 500 + np.flatnonzero(rare[500:])  # users whose held-out item is one of their group's unseen two
        for name, v in (("dense", None), ("factorized", vectors)):
            head = fit_retrieval(x[tr], y[tr], x[400:500][~rare[400:500]], y[400:500][~rare[400:500]], task=task,
                                 classes=items, cfg=cfg, seed=0, history=[hist[i] for i in tr], item_vectors=v)
            if v is not None:  # one vector per group: a group's items differ by their bias alone
                coef = head.w["coef"].reshape(10, 5, -1)
                np.testing.assert_allclose(coef, np.broadcast_to(coef[:, :1], coef.shape), atol=1e-3 * np.abs(coef).max())
            hits[name].append(M.target_rank(head.logits(x[test]), y[test]) < 5)
    hr = {k: float(np.concatenate(h).mean()) for k, h in hits.items()}
    # chance HR@5 over 50 items is 0.1. A group's unseen items lie 4th and 5th in the factorized ranking whenever
    # the group's direction outscores the others by more than the bias gap, so its HR@5 is the share of test
    # users whose group the head reads; the dense head has only the 0.05-weight history targets for them. The
    # bounds hold with >= 3.5 binomial standard errors of 234 users to spare on either side (measured 0.765 and
    # 0.038, the same under the Haswell, Sandybridge, Prescott and SkylakeX kernels).
    assert hr["factorized"] > 0.66 and hr["dense"] < 0.1 and hr["factorized"] - hr["dense"] > 0.5, hr


def test_target_mass_is_the_soft_targets_summed():
    from userfm.eval.heads import _soft_targets, _target_mass

    y, hist = np.array([0, 2, 2, 1]), [np.array([1, 1, 3]), np.array([], np.int64), np.array([0]), np.array([2, 3])]
    for w in (0.0, 0.5):
        np.testing.assert_allclose(_target_mass(y, hist, 5, w), _soft_targets(y, hist, 5, w).sum(0), rtol=1e-6)
    # by hand at 0.5: item 0 = 0.5 (user 0) + 0.5 (user 2's history); item 1 = 2 x 0.5 / 3 + 0.5; item 4 = 0
    np.testing.assert_allclose(_target_mass(y, hist, 5, 0.5), [1.0, 1 / 3 + 0.5, 1.0 + 0.5 + 0.25, 0.5 / 3 + 0.25, 0.0])


def test_catalog_vectors_by_hand():
    """Two taste groups over a 7-item catalog: users take pairs or all of items 0-2, or of 3-5; item 6 is
    nobody's. PPMI's top-2 directions are the two groups: in-group cosine 1, across 0, item 6 stays zero."""
    h = [np.array(a) for a in ([0, 1], [1, 2], [0, 2], [0, 1, 2], [3, 4], [4, 5], [3, 5], [3, 4, 5])]
    v = catalog_vectors(h, 7, 2)
    assert v.shape == (7, 2)
    np.testing.assert_allclose(np.linalg.norm(v[:6], axis=1), np.sqrt(2), rtol=1e-5)  # rows scaled to sqrt(dim)
    np.testing.assert_array_equal(v[6], 0.0)
    group = np.repeat([0, 1], 3)
    np.testing.assert_allclose((v[:6] @ v[:6].T) / 2, (group[:, None] == group[None, :]).astype(float), atol=1e-4)
    assert catalog_vectors(h, 7, 16).shape == (7, 6)  # dim <= catalog - 1
    assert catalog_vectors([np.array([0])], 2, 8).shape == (2, 0)  # nothing co-occurs


def test_retrieval_ranks_can_mask_seen_items():
    scores = np.array([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    target = np.array([2, 0])
    assert retrieval_ranks(lambda r: scores[r], 2, target).tolist() == [2, 3]
    seen = [np.array([0, 2]), np.array([3])]  # the target itself is never masked
    assert retrieval_ranks(lambda r: scores[r], 2, target, seen, chunk=1).tolist() == [1, 2]


@pytest.fixture(scope="module")
def heldout(synth_ds):
    root = synth_ds["root"]
    attrs = read_sequences(synth_ds["ds"], columns=["user_id"])
    ids = attrs.column("user_id").to_pylist()
    x = np.random.default_rng(3).normal(0, 1, (len(ids), 8)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)
    loo = root / "loo.parquet"
    pq.write_table(pa.table({"user_id": ids, "embedding": emb, "holdout_last": pa.array([1] * len(ids), pa.int64())}), loo)
    tasks = root / "heldout.yaml"
    tasks.write_text((REPO / "experiments/tasks/synthetic-heldout.yaml").read_text()
                     + "  - {name: gender, table: user_attrs, target: gender, type: binary}\n")
    cfg = _cfg(synth_ds, "heldout", embeddings={"loo": str(loo), "random": "random"}, tasks=str(tasks),
               only_tasks=("last_service", "next_item", "gender"), seeds=1, mlp_max_epochs=15)
    return run_evaluate(cfg, progress=lambda s: None), cfg


def test_heldout_run_rows_popularity_by_hand_and_skipped_task(heldout, synth_ds):
    results, cfg = heldout
    assert results["skipped_tasks"] == [{"task": "gender", "reason": results["skipped_tasks"][0]["reason"]}]
    assert "no attributes table 'user_attrs'" in results["skipped_tasks"][0]["reason"]
    models = {t: {r["model"] for r in results["rows"] if r["task"] == t} for t in ("last_service", "next_item")}
    assert models["last_service"] == {"loo/mlp", "loo/logreg", "random/mlp", "random/logreg", "tfidf/logreg",
                                      "bag-of-items/logreg"}
    assert models["next_item"] == {"loo/mlp", "loo/logreg", "random/mlp", "random/logreg", "popularity",
                                   "popularity-unseen", "item-knn"}
    info = next(t for t in results["tasks"] if t["name"] == "next_item")
    seq = read_sequences(synth_ds["ds"], columns=["user_id", "split", "n_events", "item_id"]).to_pylist()
    catalog = {i for r in seq for i in r["item_id"] if i is not None}
    assert info["n_items"] == len(catalog) and info["holdout_last"] == 1 and info["classes"] is None
    # popularity by hand: counts over the training users' items (held-out ones included), ties against the target
    labelled = [r for r in seq if r["n_events"] >= 2 and r["item_id"][-1] is not None]
    counts = dict.fromkeys(catalog, 0)
    for r in labelled:
        if r["split"] == "train":
            for i in r["item_id"]:
                if i is not None:
                    counts[i] += 1
    test = [r for r in labelled if r["split"] == "test"]
    ranks = [sum(1 for i, c in counts.items() if c >= counts[r["item_id"][-1]] and i != r["item_id"][-1]) for r in test]
    pop = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "popularity")
    assert pop["test"]["n"] == len(test) and info["users"]["test"] == len(test)
    assert pop["test"]["value"] == pytest.approx(np.mean(np.array(ranks) < 10), abs=1e-6)
    assert pop["other_metrics"]["ndcg@10"] == pytest.approx(np.mean([1 / np.log2(k + 2) if k < 10 else 0 for k in ranks]), abs=1e-6)
    for r in results["rows"]:
        assert 0 <= r["test"]["value"] <= 1 and r["cold"]["n"] > 0 and r["heavy"]["n"] > 0
    # popularity-unseen by hand: the same counts, the user's own history items dropped (a repeat ranks last)
    unseen = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "popularity-unseen")
    ranks_u = []
    for r in test:
        target, seen = r["item_id"][-1], {i for i in r["item_id"][:-1] if i is not None}
        ranks_u.append(len(catalog) - 1 if target in seen else
                       sum(1 for i, c in counts.items() if i not in seen and i != target and c >= counts[target]))
    assert unseen["test"]["value"] == pytest.approx(np.mean(np.array(ranks_u) < 10), abs=1e-6)
    # retrieval rows of a real table are paired with every yardstick (the acceptance: beat popularity, item-kNN)
    loo = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "loo/mlp")
    assert list(loo["paired"]) == ["popularity", "popularity-unseen", "item-knn"]
    for ref in loo["paired"]:
        ref_row = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == ref)
        for key in ("test", "cold"):
            assert loo["paired"][ref][key]["value"] == pytest.approx(loo[key]["value"] - ref_row[key]["value"], abs=2e-6)
    yard = [r for r in results["rows"] if r["task"] == "next_item" and r["model"] in ("popularity", "popularity-unseen", "item-knn")]
    assert info["best_yardstick"] == max(yard, key=lambda r: r["test"]["value"])["model"]
    md = (Path(cfg.out) / "results.md").read_text()
    assert "| vs popularity | vs popularity, cold |" in md and "| vs item-knn | vs item-knn, cold |" in md
    assert f"Best yardstick (no pretraining; picked on test, which favours it): `{info['best_yardstick']}`" in md
    best = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == info["best_yardstick"])
    for r in results["rows"]:  # every other row is paired with the best yardstick
        if r["task"] == "next_item" and r is not best:
            assert r["vs_best"]["model"] == best["model"]
            assert r["vs_best"]["value"] == pytest.approx(r["test"]["value"] - best["test"]["value"], abs=2e-6)
    assert "vs_best" not in best
    knn = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "item-knn")
    assert knn["item_knn"]["last"] in cfg.item_knn_last and set(knn["item_knn"]["val_hr@10"]) == {"1", "3", "10", "0"}
    # the saved retrieval head reproduces its row
    row = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "loo/logreg")
    head = load_head(Path(cfg.out) / row["heads"][0])
    td = task_data(synth_ds["ds"], TaskConfig(name="n", table="last_event", target="item_id", type="retrieval"), user_table(synth_ds["ds"]))
    x = load_embeddings(Path(synth_ds["root"]) / "loo.parquet").lookup(td.ids["test"])
    assert M.hit_rate_at_k(M.target_rank(head.logits(x), td.y["test"])) == pytest.approx(row["per_seed"][0], abs=1e-6)
    assert "## next_item" in (Path(cfg.out) / "results.md").read_text()


def test_heldout_tasks_refuse_tables_that_saw_the_label(synth_ds, tmp_path):
    cfg = _cfg(synth_ds, "refuse", tasks=str(REPO / "experiments/tasks/synthetic-heldout.yaml"), only_tasks=("next_item",))
    with pytest.raises(EvalError, match=r"embeddings 'leaky'.*holdout_last=unknown.*--set holdout_last=1"):
        run_evaluate(cfg, progress=lambda s: None)


# ---------------------------------------------------------------------------------------- fair baselines


def _fake_vectors(texts: list[str]) -> np.ndarray:
    """A seeded unit vector per text (the cache's format, 384-d): a stand-in for MiniLM that costs nothing."""
    out = np.empty((len(texts), 384), np.float32)
    for i, h in enumerate(text_hash(texts)):
        v = np.random.default_rng(int(h) & 0xFFFFFFFF).standard_normal(384)
        out[i] = v / np.linalg.norm(v)
    return out


class FakeMiniLM:
    """Encoder with MiniLMEncoder's call format (texts -> text_hash, vector) that records what it encodes."""

    def __init__(self):
        self.seen = []

    def __call__(self, texts):
        texts = [t or "" for t in texts]
        self.seen.extend(texts)
        return {"text_hash": text_hash(texts), "vector": _fake_vectors(texts)}


def _distinct_texts(ds) -> list[str]:
    import pyarrow.compute as pc

    return pc.unique(pc.list_flatten(read_sequences(ds, columns=["text"]).column("text"))).to_pylist()


def test_minilm_mean_is_the_mean_of_each_users_cached_vectors(synth_ds, tmp_path):
    from userfm.models.minilm import build_cache

    ds = synth_ds["ds"]
    texts = _distinct_texts(ds)
    missing = texts[:3]
    build_cache(texts[3:], tmp_path, encoder=FakeMiniLM())  # a cache that lacks 3 of the dataset's texts
    enc = FakeMiniLM()
    table = minilm_mean_table(ds, 0, tmp_path, encoder=enc, progress=lambda s: None)
    assert sorted(enc.seen) == sorted(missing)  # only the missing texts were encoded ...
    assert len(list(tmp_path.glob("part-*.parquet"))) == 2  # ... and appended to the cache
    enc.seen.clear()
    loo = minilm_mean_table(ds, 1, tmp_path, encoder=enc, progress=lambda s: None)
    assert enc.seen == [] and len(list(tmp_path.glob("part-*.parquet"))) == 2  # second time: all cached
    assert table.dim == 384 and table.holdout_last == 0 and loo.holdout_last == 1

    seq = read_sequences(ds, columns=["user_id", "text"]).to_pylist()
    ids = np.array([r["user_id"] for r in seq[:40]], object)
    got, got_loo = table.lookup(ids), loo.lookup(ids)
    for r, g, g_loo in zip(seq[:40], got, got_loo):
        events = _fake_vectors(r["text"])  # (n_events, 384), by hand
        np.testing.assert_allclose(g, events.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(g_loo, events[:-1].mean(axis=0) if len(events) > 1 else 0.0, atol=1e-6)
    assert len(table.ids) == len(seq)


@pytest.fixture(scope="module")
def strong(synth_ds):
    """Every baseline of the fair comparison on one task, two seeds, a MiniLM cache of stand-in vectors."""
    from userfm.models.minilm import build_cache

    cache = synth_ds["root"] / "fake_minilm_cache"
    build_cache(_distinct_texts(synth_ds["ds"]), cache, encoder=FakeMiniLM())
    cfg = _cfg(synth_ds, "strong", only_tasks=("segment",), baselines=("tfidf", "t-trans", MINILM, "concat-tfidf"),
               minilm_cache=str(cache), t_trans_lrs=(1e-5, 3e-3), t_trans_item_encoder="category",
               t_trans_max_events=32, t_trans_max_epochs=4, t_trans_patience=2, concat_tfidf_weights=(0.3, 1.0),
               logreg_c=(1.0,), logreg_max_iter=200)  # (lbfgs on 384 + TF-IDF dims is the slow part: keep it short)
    results = run_evaluate(cfg, progress=lambda s: None)
    td = task_data(synth_ds["ds"], TaskConfig(name="segment", table="attributes", target="segment", type="multiclass"),
                   user_table(synth_ds["ds"]))
    return results, cfg, {r["model"]: r for r in results["rows"]}, td


MINILM = "minilm-mean"


def test_fair_baseline_rows_share_users_and_splits(strong):
    results, cfg, rows, td = strong
    assert set(rows) == {"leaky/mlp", "leaky/logreg", "random/mlp", "random/logreg", "minilm-mean/mlp", "minilm-mean/logreg",
                         "tfidf/logreg", "leaky+tfidf/logreg", "minilm-mean+tfidf/logreg", "t-trans"}
    info = results["tasks"][0]
    for name, r in rows.items():  # every model is scored on the same test users, cold subset included
        assert (r["test"]["n"], r["cold"]["n"]) == (len(td.ids["test"]), info["n_cold"]), name
    assert results["embeddings"][MINILM]["dim"] == 384 and rows["minilm-mean/mlp"]["embedding"] == MINILM
    md = (Path(cfg.out) / "results.md").read_text()
    assert "| vs tfidf | vs tfidf, cold | vs t-trans | vs t-trans, cold |" in md
    assert "| minilm-mean+tfidf/logreg |" in md and "t-trans: lr 0.003" in md


def test_minilm_mean_rows_use_the_mean_vectors(strong, synth_ds):
    _, cfg, rows, td = strong
    seq = read_sequences(synth_ds["ds"], columns=["user_id", "text"]).to_pylist()
    by_user = {r["user_id"]: _fake_vectors(r["text"]).mean(axis=0) for r in seq}
    x_test = np.stack([by_user[u] for u in td.ids["test"]])
    for head in ("logreg", "mlp"):
        row = rows[f"minilm-mean/{head}"]
        saved = load_head(Path(cfg.out) / row["heads"][0])
        assert saved.meta["input_dim"] == 384
        assert M.compute("accuracy", td.y["test"], saved.predict_proba(x_test)) == pytest.approx(row["per_seed"][0], abs=1e-6)


def test_concat_tables_by_hand():
    from userfm.eval.embeddings import EmbeddingTable, concat_tables

    a = EmbeddingTable("a", "a", pa.array(["u3", "u1", "u2"]), np.arange(6, dtype=np.float32).reshape(3, 2), 1)
    b = EmbeddingTable("m", "m", pa.array(["u1", "u2", "u9"]), np.array([[10.0], [20.0], [90.0]], np.float32), 1)
    c = concat_tables(a, b, "a+m")  # u3 has no b row: left out; a's order kept
    assert c.ids.to_pylist() == ["u1", "u2"] and (c.holdout_last, c.history_service) == (1, "")
    np.testing.assert_array_equal(c.x, [[2, 3, 10], [4, 5, 20]])
    with pytest.raises(EvalError, match="read different histories"):
        concat_tables(a, EmbeddingTable("m", "m", b.ids, b.x, 0), "a+m")


def test_concat_minilm_rows_read_the_table_beside_the_mean_vectors(synth_ds):
    """``concat-minilm``: row ``leaky+minilm-mean/<head>`` is a head on [leaky | mean MiniLM vector] (its saved
    head reproduces the row from features built by hand); the plain tables' rows are unchanged by it."""
    from userfm.models.minilm import build_cache

    cache = synth_ds["root"] / "fake_minilm_cache_concat"
    build_cache(_distinct_texts(synth_ds["ds"]), cache, encoder=FakeMiniLM())
    cfg = _cfg(synth_ds, "concat_minilm", only_tasks=("segment",), baselines=(MINILM, "concat-minilm"), heads=("logreg",),
               minilm_cache=str(cache), seeds=1, logreg_c=(1.0,), logreg_max_iter=200)
    results = run_evaluate(cfg, progress=lambda s: None)
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"leaky/logreg", "random/logreg", "minilm-mean/logreg", "leaky+minilm-mean/logreg"}
    td = task_data(synth_ds["ds"], TaskConfig(name="segment", table="attributes", target="segment", type="multiclass"),
                   user_table(synth_ds["ds"]))
    seq = read_sequences(synth_ds["ds"], columns=["user_id", "text"]).to_pylist()
    mean = {r["user_id"]: _fake_vectors(r["text"]).mean(axis=0) for r in seq}
    leaky = load_embeddings(synth_ds["leaky"])
    x_test = np.hstack([leaky.lookup(td.ids["test"]), np.stack([mean[u] for u in td.ids["test"]])])
    row = rows["leaky+minilm-mean/logreg"]
    saved = load_head(Path(cfg.out) / row["heads"][0])
    assert saved.meta["input_dim"] == leaky.dim + 384 and row["test"]["n"] == len(td.ids["test"])
    assert M.compute("accuracy", td.y["test"], saved.predict_proba(x_test)) == pytest.approx(row["per_seed"][0], abs=1e-6)
    assert "minilm-mean/logreg" in row["paired"]  # paired with the best yardstick, as every real table's row


def test_concat_features_and_row_by_hand(strong, synth_ds):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    _, cfg, rows, td = strong
    texts = user_texts(synth_ds["ds"])
    vocab = len(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=50_000)
                .fit([texts[u] for u in td.ids["train"]]).vocabulary_)
    row = rows["leaky+tfidf/logreg"]
    assert rows["tfidf/logreg"]["tfidf"]["features"] == row["concat"]["tfidf_features"] == vocab
    assert row["concat"]["n_features"] == 16 + vocab and row["concat"]["embedding_dim"] == 16
    assert row["concat"]["C"] in cfg.logreg_c and row["concat"]["tfidf_weight"] in cfg.concat_tfidf_weights

    feats = tfidf_features(td, texts, cfg)
    emb = {s: load_embeddings(synth_ds["leaky"]).lookup(td.ids[s]) for s in td.ids}
    x = concat_features(emb, feats, row["concat"]["tfidf_weight"])
    assert x["train"].shape == (len(td.ids["train"]), 16 + vocab) and x["test"].shape[0] == len(td.ids["test"])
    mean, std = emb["train"].mean(axis=0), emb["train"].std(axis=0)
    np.testing.assert_allclose(x["test"][:, :16].toarray(), (emb["test"] - mean) / std, rtol=1e-4, atol=1e-5)
    # the TF-IDF block times weight * sqrt(16): at weight 1 its unit-norm rows weigh as much as the 16 z-scores
    np.testing.assert_allclose(x["test"][:, 16:].toarray(), row["concat"]["tfidf_weight"] * 4.0 * feats.x["test"].toarray(),
                               rtol=1e-5, atol=1e-6)
    model = LogisticRegression(C=row["concat"]["C"], max_iter=cfg.logreg_max_iter, random_state=0).fit(x["train"], td.y["train"])
    acc = np.mean(model.predict(x["test"]) == td.y["test"])
    assert acc == pytest.approx(row["per_seed"][0], abs=1e-6) and row["per_seed"] == [row["per_seed"][0]] * 2


def test_t_trans_learning_rate_is_chosen_on_val(strong):
    _, _, rows, _ = strong
    tt = rows["t-trans"]["t_trans"]
    grid = tt["lr_grid"]
    assert [g["lr"] for g in grid] == [1e-5, 3e-3]
    losses = [g["val_loss"] for g in grid]
    # 1e-5 barely moves the weights in 4 epochs: its val loss stays near the initial one; the winner is not the first
    assert tt["lr"] == grid[int(np.argmin(losses))]["lr"] == 3e-3 and losses[1] < losses[0]
    assert len(tt["epochs"]) == 2 and all(e <= 4 for e in tt["epochs"]) and tt["lr_search_s"] > 0


def test_paired_differences_vs_tfidf_and_t_trans(strong):
    results, _, rows, _ = strong
    n_cold = results["tasks"][0]["n_cold"]
    paired = {m for m, r in rows.items() if "paired" in r}
    assert paired == {"leaky/mlp", "leaky/logreg", "minilm-mean/mlp", "minilm-mean/logreg", "leaky+tfidf/logreg",
                      "minilm-mean+tfidf/logreg"}  # real tables only: not the random floor, not the baselines
    for m in paired:
        for ref in ("tfidf/logreg", "t-trans"):
            for key in ("test", "cold"):
                d = rows[m]["paired"][ref][key]
                # same users, same seed means: the paired difference is the difference of the two rows' values
                assert d["value"] == pytest.approx(rows[m][key]["value"] - rows[ref][key]["value"], abs=2e-6), (m, ref, key)
                assert d["ci"][0] <= d["value"] <= d["ci"][1], (m, ref, key)
            assert rows[m]["paired"][ref]["cold"]["n"] == n_cold
    # the leaky table encodes the segment: it beats TF-IDF, with an interval above 0
    assert rows["leaky/logreg"]["paired"]["tfidf/logreg"]["test"]["ci"][0] > 0


def test_fair_baseline_config_errors():
    with pytest.raises(ValueError, match="t_trans_lrs"):
        EvalConfig(t_trans_lrs=())
    with pytest.raises(ValueError, match="concat_tfidf_weights"):
        EvalConfig(concat_tfidf_weights=(0.0,))
    with pytest.raises(ValueError, match="'minilm-mean' is a baseline"):
        EvalConfig(embeddings={"minilm-mean": "x.parquet"})
    with pytest.raises(ValueError, match="no '/' or '\\+'"):
        EvalConfig(embeddings={"a+tfidf": "x.parquet"})
    with pytest.raises(ValueError, match="baselines: unknown"):
        EvalConfig(baselines=("mean-minilm",))


# --------------------------------------------------------------------------------- cross-fitting


def test_cross_fit_scores_every_labelled_user_once_popularity_by_hand(synth_ds, heldout):
    """folds=3: fold f (user-id hash) is test, f+1 val, the rest train; every labelled user is scored once,
    and popularity's counts come from each fold's own training users (recomputed here by hand)."""
    from userfm.eval.task_data import fold_of

    cfg = dataclasses.replace(heldout[1], out=str(synth_ds["root"] / "crossfit"), folds=3, heads=("logreg",),
                              only_tasks=("last_service", "next_item"), embeddings={"loo": str(synth_ds["root"] / "loo.parquet")})
    results = run_evaluate(cfg, progress=lambda s: None)
    seq = read_sequences(synth_ds["ds"], columns=["user_id", "n_events", "item_id"]).to_pylist()
    labelled = [r for r in seq if r["n_events"] >= 2 and r["item_id"][-1] is not None]
    fold = dict(zip([r["user_id"] for r in labelled], fold_of(np.array([r["user_id"] for r in labelled], dtype=object), 3)))
    assert sorted(set(fold.values())) == [0, 1, 2]
    info = next(t for t in results["tasks"] if t["name"] == "next_item")
    assert info["users"]["test"] == len(labelled) and info["users"]["folds"] == 3
    assert info["users"]["train"] == [sum(1 for v in fold.values() if v not in (f, (f + 1) % 3)) for f in range(3)]
    assert info["users"]["val"] == [sum(1 for v in fold.values() if v == (f + 1) % 3) for f in range(3)]
    catalog = sorted({i for r in seq for i in r["item_id"] if i is not None})
    ranks = []
    for f in range(3):
        counts = dict.fromkeys(catalog, 0)
        for r in labelled:
            if fold[r["user_id"]] not in (f, (f + 1) % 3):
                for i in r["item_id"]:
                    if i is not None:
                        counts[i] += 1
        for r in labelled:
            if fold[r["user_id"]] == f:
                t = r["item_id"][-1]
                ranks.append(sum(1 for i, c in counts.items() if c >= counts[t] and i != t))
    pop = next(r for r in results["rows"] if r["task"] == "next_item" and r["model"] == "popularity")
    assert pop["test"]["n"] == len(labelled)
    assert pop["test"]["value"] == pytest.approx(np.mean(np.array(ranks) < 10), abs=1e-6)
    # a classification task: one class order for every fold, every labelled user scored, heads saved per fold
    svc = next(t for t in results["tasks"] if t["name"] == "last_service")
    assert svc["users"]["test"] == len([r for r in seq if r["n_events"] >= 2])
    row = next(r for r in results["rows"] if r["task"] == "last_service" and r["model"] == "loo/logreg")
    assert row["test"]["n"] == svc["users"]["test"] and len(row["heads"]) == 3 and row["heads"][2].endswith("fold2")
    tf = next(r for r in results["rows"] if r["task"] == "last_service" and r["model"] == "tfidf/logreg")
    assert len(tf["tfidf"]["per_fold"]) == 3
    # the three saved fold heads, each on its own fold's test users, reproduce the stacked row
    task = TaskConfig(name="s", table="last_event", target="service", type="multiclass")
    table, hits = load_embeddings(synth_ds["root"] / "loo.parquet"), []
    for f in range(3):
        td = task_data(synth_ds["ds"], task, user_table(synth_ds["ds"]), fold=(f, 3))
        head = load_head(Path(cfg.out) / row["heads"][f])
        hits += list(np.asarray(head.predict(table.lookup(td.ids["test"])), dtype=object) == np.asarray(td.classes, dtype=object)[td.y["test"]])
    assert row["per_seed"][0] == pytest.approx(np.mean(hits), abs=1e-6)
    assert "3-fold cross-fit: all" in (Path(cfg.out) / "results.md").read_text()


def test_cross_fit_needs_three_folds():
    for k in (1, 2, -1):
        with pytest.raises(ValueError, match="folds must be 0"):
            EvalConfig(data="d", out="o", folds=k)


def test_cross_fit_refuses_encoders_pretrained_on_the_held_out_events(synth_ds, heldout, tmp_path):
    """Folds score the encoder's own pretraining users: for last_event tasks its pretraining must have held
    the last event out (the pretrain run's config.json, found through the embed manifest's model)."""
    import shutil

    for held, ok in ((0, False), (1, True)):
        run = tmp_path / f"pre{held}"
        (run / "model").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"pretrain": {"holdout_last": held}}))
        emb = tmp_path / f"emb{held}"
        (emb / "embeddings").mkdir(parents=True)
        shutil.copy(synth_ds["root"] / "loo.parquet", emb / "embeddings" / "part-0.parquet")
        (emb / "manifest.json").write_text(json.dumps({"kind": "userfm.embeddings", "holdout_last": 1,
                                                       "config": {"model": str(run / "model")}}))
        cfg = dataclasses.replace(heldout[1], out=str(tmp_path / f"out{held}"), folds=3, heads=("logreg",), seeds=1,
                                  only_tasks=("next_item",), embeddings={"clue": str(emb)}, baselines=("popularity",))
        if ok:
            seq = read_sequences(synth_ds["ds"], columns=["n_events", "item_id"]).to_pylist()
            n = sum(1 for r in seq if r["n_events"] >= 2 and r["item_id"][-1] is not None)
            assert run_evaluate(cfg, progress=lambda s: None)["rows"][0]["test"]["n"] == n
        else:
            with pytest.raises(EvalError, match=r"pretrained on whole histories \(holdout_last=0\).*holdout_last=1"):
                run_evaluate(cfg, progress=lambda s: None)


def test_cross_fit_fold_with_one_training_class_is_a_clear_error(synth_ds):
    """A fold whose training users share one class cannot fit a classifier: the error names the fold."""
    from userfm.eval.task_data import fold_of

    users = user_table(synth_ds["ds"])
    ids = np.asarray(users.column("user_id").to_pylist(), dtype=object)
    f = fold_of(ids, 4)
    label = pa.table({"user_id": ids, "split": users.column("split"), "y": pa.array((f == 1).astype(np.int64))})
    task = TaskConfig(name="t", table="tbl", target="y", type="binary")
    with pytest.raises(EvalError, match="training users of cross-fitting fold 0 of 4 have one class only"):
        task_data(synth_ds["ds"], task, users, {"tbl": label}, fold=(0, 4))  # train = folds 2, 3: all 0
    td = task_data(synth_ds["ds"], task, users, {"tbl": label}, fold=(2, 4))  # train = folds 0, 1: both classes
    assert len(td.ids["train"]) == int(np.isin(f, [0, 1]).sum()) and len(td.ids["val"]) == int((f == 3).sum())
    assert sorted(td.ids["test"]) == sorted(ids[f == 2]) and td.classes == [0, 1]


# --------------------------------------------------------------------------------- label budget


def _check_budget_split(full_ids, full_y, ids, n):
    """ids: exactly n users of full_ids; per class within 1 of n x its share; within each class, the first
    by label_rank."""
    from userfm.eval.task_data import label_rank

    assert len(ids) == n and len(set(ids)) == n and set(ids) <= set(full_ids)
    y_of = dict(zip(full_ids, full_y))
    for c in np.unique(full_y):
        members = full_ids[full_y == c]
        kept = [u for u in ids if y_of[u] == c]
        assert abs(len(kept) - n * len(members) / len(full_ids)) < 1, (c, len(kept))
        assert sorted(kept) == sorted(members[np.argsort(label_rank(members), kind="stable")[: len(kept)]])


def test_label_budget_keeps_the_first_users_by_salted_hash_and_leaves_test_alone(synth_ds):
    """labels=n: train = n training users, the first by label_rank within each class in the classes'
    proportions; val = the same share of val users (rounded); test and classes unchanged; budgets nested;
    every dropped user counted."""
    from userfm.eval.task_data import label_rank

    users = user_table(synth_ds["ds"])
    task = TaskConfig(name="seg", table="attributes", target="segment", type="multiclass")
    full = task_data(synth_ds["ds"], task, users)
    n_tr, n_va = len(full.ids["train"]), len(full.ids["val"])
    assert n_tr > 100 and "label_budget" not in full.left_out
    small, big = (task_data(synth_ds["ds"], task, users, labels=n) for n in (40, 100))
    for td, n in ((small, 40), (big, 100)):
        n_val = round(n * n_va / n_tr)
        _check_budget_split(full.ids["train"], full.y["train"], td.ids["train"], n)
        _check_budget_split(full.ids["val"], full.y["val"], td.ids["val"], n_val)
        assert list(td.ids["test"]) == list(full.ids["test"]) and list(td.y["test"]) == list(full.y["test"])
        assert td.classes == full.classes
        assert td.left_out["label_budget"] == (n_tr - n) + (n_va - n_val)
        y_of = dict(zip(full.ids["train"], full.y["train"]))  # labels follow their users
        assert [y_of[u] for u in td.ids["train"]] == list(td.y["train"])
    assert set(small.ids["train"]) < set(big.ids["train"])  # nested
    # a regression task has no classes: the first n by label_rank
    reg = TaskConfig(name="n", table="future_labels", target="n_future_events", type="regression")
    rfull, rsmall = task_data(synth_ds["ds"], reg, users), task_data(synth_ds["ds"], reg, users, labels=50)
    assert sorted(rsmall.ids["train"]) == sorted(rfull.ids["train"][np.argsort(label_rank(rfull.ids["train"]))[:50]])
    # a budget at least the training set changes nothing
    same = task_data(synth_ds["ds"], task, users, labels=n_tr)
    assert list(same.ids["train"]) == list(full.ids["train"]) and list(same.ids["val"]) == list(full.ids["val"])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        EvalConfig(labels=-1)


def test_budget_pick_quotas_by_hand():
    from userfm.eval.task_data import budget_pick

    idx = np.arange(10) + 100
    rank = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    strata = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])  # 70 % / 30 %
    # n = 4: shares 2.8 / 1.2 -> floors 2 / 1, the larger remainder (0.8) gets the last one: 3 / 1
    # class 0 by rank: 101 (0.1), 105 (0.2), 103 (0.3); class 1: 109 (0.0)
    assert list(budget_pick(idx, rank, 4, strata)) == [101, 103, 105, 109]
    assert list(budget_pick(idx, rank, 4)) == [109, 101, 105, 103]  # plain: the first 4 by rank


def test_label_budget_with_one_class_is_a_clear_error(synth_ds):
    users = user_table(synth_ds["ds"])
    ids = np.asarray(users.column("user_id").to_pylist(), dtype=object)
    label = pa.table({"user_id": ids, "split": users.column("split"), "y": pa.array(np.arange(len(ids)) % 2)})
    task = TaskConfig(name="t", table="tbl", target="y", type="binary")
    with pytest.raises(EvalError, match=r"label budget \(labels=1\) have one class only"):
        task_data(synth_ds["ds"], task, users, {"tbl": label}, labels=1)
    assert len(task_data(synth_ds["ds"], task, users, {"tbl": label}, labels=2).ids["train"]) == 2


def test_label_budget_runs_every_model_on_the_budget(synth_ds):
    """run_evaluate(labels=n): heads and TF-IDF fit on n users, test users as without a budget; the
    markdown says so."""
    kw = dict(only_tasks=("is_parent",), heads=("logreg",), seeds=1, baselines=("tfidf",))
    full = run_evaluate(_cfg(synth_ds, "lab0", **kw), progress=lambda s: None)
    res = run_evaluate(_cfg(synth_ds, "lab60", labels=60, **kw), progress=lambda s: None)
    u0, u = full["tasks"][0]["users"], res["tasks"][0]["users"]
    assert u["train"] == 60 and u["val"] == round(60 * u0["val"] / u0["train"]) and u["test"] == u0["test"]
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["tfidf/logreg"]["test"]["n"] == u0["test"] and rows["leaky/logreg"]["test"]["n"] == u0["test"]
    assert "Label budget: heads and baselines train on 60 labelled" in (synth_ds["root"] / "lab60" / "results.md").read_text()


# --------------------------------------------------------------------------------- val-chosen row


def test_val_chosen_by_hand():
    """Per seed, the candidate with the best val metric (ties: the first; NaN never wins), and its test scores."""
    from userfm.eval.val_chosen import val_chosen

    a, b, c = (np.full(3, k, float) for k in (1, 2, 3))
    cands = {"e1/logreg": {"val": [0.50, 0.70], "scores": [a, a]},
             "e1/mlp": {"val": [0.60, 0.70], "scores": [b, b]},
             "e2/mlp": {"val": [float("nan"), 0.65], "scores": [c, c]}}
    chosen, scores = val_chosen(cands, higher_is_better=True)
    assert chosen == ["e1/mlp", "e1/logreg"] and scores[0] is b and scores[1] is a
    chosen, scores = val_chosen(cands, higher_is_better=False)  # rmse-like: the lowest wins
    assert chosen == ["e1/logreg", "e2/mlp"] and scores[1] is c
    only_nan = {"x/mlp": {"val": [float("nan")], "scores": [a]}, "y/mlp": {"val": [float("nan")], "scores": [b]}}
    assert val_chosen(only_nan, True)[0] == ["x/mlp"]


def test_val_chosen_row_is_the_val_best_table_per_fold_and_seed(synth_ds):
    """Two pretrained tables (the leaky one and a noisier copy), 3 folds, 2 seeds: each fold's saved heads,
    scored here on that fold's val users, give the val metrics the row records; per fold and seed the row
    takes the test predictions of the (table, head) best on val, and its value is recomputed from those heads."""
    leaky = load_embeddings(synth_ds["leaky"])
    ids = leaky.ids.to_pylist()
    noisy_x = leaky.lookup(ids) + np.random.default_rng(5).normal(0, 2.0, (len(ids), leaky.dim))
    noisy = _write_table(synth_ds["root"] / "noisy.parquet", ids, noisy_x)
    cfg = _cfg(synth_ds, "valchosen", embeddings={"leaky": str(synth_ds["leaky"]), "noisy": str(noisy)},
               only_tasks=("segment",), folds=3, baselines=("tfidf",))
    results = run_evaluate(cfg, progress=lambda s: None)
    rows = {r["model"]: r for r in results["rows"]}
    row = rows["val-chosen"]
    assert row["embedding"] == "val-chosen" and row["vs_best"]["model"] == "tfidf/logreg"
    per_fold = row["val_chosen"]["per_fold"]
    assert len(per_fold) == 3 and all(len(f["chosen"]) == 2 for f in per_fold)
    task = TaskConfig(name="segment", table="attributes", target="segment", type="multiclass")
    tables = {"leaky": leaky, "noisy": load_embeddings(noisy)}
    hits = {0: [], 1: []}
    for f in range(3):
        td = task_data(synth_ds["ds"], task, user_table(synth_ds["ds"]), fold=(f, 3))
        val, test_pred = {}, {}
        for model in ("leaky/logreg", "leaky/mlp", "noisy/logreg", "noisy/mlp"):
            saved = [h for h in rows[model]["heads"] if h.endswith(f"fold{f}")]
            heads = [load_head(Path(cfg.out) / h) for h in saved] * (2 // len(saved))  # logreg: one fit, both seeds
            table = tables[model.split("/")[0]]
            val[model] = [M.compute("accuracy", td.y["val"], h.predict_proba(table.lookup(td.ids["val"]))) for h in heads]
            test_pred[model] = [h.predict_proba(table.lookup(td.ids["test"])).argmax(1) for h in heads]
            assert per_fold[f]["val"][model] == pytest.approx(val[model], abs=1e-6)
        for seed in range(2):
            best = max(val, key=lambda m: val[m][seed])  # dict order = row order: a tie keeps the first
            assert per_fold[f]["chosen"][seed] == best
            hits[seed] += list(test_pred[best][seed] == td.y["test"])
    assert row["per_seed"] == pytest.approx([np.mean(hits[0]), np.mean(hits[1])], abs=1e-6)
    assert row["test"]["n"] == rows["leaky/mlp"]["test"]["n"] == len(hits[0])
    assert "val-chosen: " in (Path(cfg.out) / "results.md").read_text()


def test_no_val_chosen_row_with_one_pretrained_table(evaluated):
    """One real table (the random floor does not count): nothing to choose between, no row."""
    assert not any(r["model"] == "val-chosen" for r in evaluated[0]["rows"])
