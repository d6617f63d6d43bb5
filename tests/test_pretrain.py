"""Pretraining on Ray Train with 2 CPU workers: each objective learns, resume replays the same steps,
an injected worker failure recovers from the last checkpoint, and the export loads without Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch

from userfm.train.pretrain import run_pretrain
from userfm.train.pretrain_config import PretrainConfig, PretrainError
from userfm.train.steps import early_stop_state, lr_at

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    root = tmp_path_factory.mktemp("pretrain")
    generate(SynthConfig(n_users=600, events_per_user=20, seed=3), root / "raw")
    run_ingest(IngestConfig(inputs=(str(root / "raw" / "events"),), out=str(root / "ds")), progress=lambda s: None)
    return root


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def quick(root: Path, name: str, **kw) -> PretrainConfig:
    base = dict(data=str(root / "ds"), out=str(root / name), size="tiny", max_events=32, max_text_tokens=8,
                text_vocab=512, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2, eval_every=0,
                checkpoint_every=100, num_workers=2, peak_flops=1e10)
    base.update(kw)
    return PretrainConfig(**base)


# mlm and simclr are marked slow to keep the default suite near 15 min on a 2-vCPU box (each run is ~50 s of
# Ray Train start-up and steps): their losses are checked by hand in test_objectives / test_losses, and the
# Ray Train plumbing they share is the clue run's (and test_cli's demo run pretrains CLUE end to end).
@pytest.mark.parametrize("objective, item_encoder", [pytest.param("mlm", "category", marks=pytest.mark.slow),
                                                     pytest.param("simclr", "text", marks=pytest.mark.slow),
                                                     ("clue", "text"), pytest.param("future", "text", marks=pytest.mark.slow),
                                                     pytest.param("next", "text", marks=pytest.mark.slow),
                                                     pytest.param("masked-item", "text", marks=pytest.mark.slow)])
def test_two_worker_run_learns_and_exports(dataset, objective, item_encoder):
    # the clue run also fits the item co-occurrence table (checked in the export test below)
    cfg = quick(dataset, f"run-{objective}", objective=objective, item_encoder=item_encoder, max_steps=16, eval_every=4,
                cooc_dim=8 if objective in ("clue", "future") else 0, item_id_buckets=64 if objective in ("future", "next", "masked-item") else 0,
                pooling="last" if objective == "next" else "mean", windows=objective in ("next", "masked-item", "future"),
                cooc_windows=objective == "future")
    lines = []
    summary = run_pretrain(cfg, progress=lines.append)
    windowed = [ln for ln in lines if "training rows (every 32-event window of each history)" in ln]
    assert len(windowed) == cfg.windows, lines  # next, masked-item and future read every window, the others one row per user
    # the co-occurrence vectors count every event with cooc_windows and windows (future), else the last max_events (clue)
    cooc = [ln for ln in lines if "item co-occurrence vectors" in ln]
    assert len(cooc) == bool(cfg.cooc_dim) and all(("counting every event" if cfg.windows and cfg.cooc_windows
                                                    else "counting their last 32 events")
                                                   in ln for ln in cooc), cooc
    r = rows(Path(cfg.out))
    losses = [x["loss"] for x in r if "loss" in x]
    assert [x["step"] for x in r] == [2, 4, 6, 8, 10, 12, 14, 16]
    # learning, not noise: the validation loss (the same held-out batches each time) falls. Training
    # windows are length-bucketed, so their losses vary with the bucket and are not compared.
    val = [x["val_loss"] for x in r if "val_loss" in x]
    assert len(val) == 4 and val[-1] < val[0] * 0.98 and val[-1] == min(val), val
    assert np.mean(losses[-4:]) < np.mean(losses[:2]), losses
    last = r[-1]
    assert math.isfinite(last["val_loss"]) and last["samples_per_s"] > 0 and 0 < last["mfu"]
    assert last["lr"] == pytest.approx(lr_at(15, cfg))
    # FLOPs accumulate across intervals and convert to PF-days
    assert last["pf_days"] == pytest.approx(last["flops"] / (1e15 * 86400))
    assert r[-1]["flops"] > r[0]["flops"] > 0
    assert summary["final"]["step"] == 16
    import csv

    with open(Path(cfg.out) / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(x["step"]) for x in table] == [x["step"] for x in r]  # the CSV holds every row...
    assert float(table[-1]["val_loss"]) == pytest.approx(last["val_loss"])  # ...and keys first seen late
    assert any((Path(cfg.out) / "tb").iterdir())  # TensorBoard event file


def test_early_stop_state_by_hand():
    best, improved, stop = early_stop_state(None, 10, 5.0, patience=2)
    assert (best, improved, stop) == ({"step": 10, "val_loss": 5.0, "bad": 0}, True, False)
    best, improved, stop = early_stop_state(best, 20, 5.0, patience=2)  # equal is not lower
    assert (best, improved, stop) == ({"step": 10, "val_loss": 5.0, "bad": 1}, False, False)
    best, improved, stop = early_stop_state(best, 30, 4.0, patience=2)  # a new best resets the count
    assert (best, improved, stop) == ({"step": 30, "val_loss": 4.0, "bad": 0}, True, False)
    best, _, stop = early_stop_state(best, 40, 4.5, patience=2)
    assert not stop
    best, _, stop = early_stop_state(best, 50, 4.1, patience=2)
    assert stop and best == {"step": 30, "val_loss": 4.0, "bad": 2}
    assert not early_stop_state(best, 60, 9.0, patience=0)[2]  # patience 0: never stops


def test_epoch_budget_and_early_stop_export_the_best(dataset):
    """lr 0: the weights never change, so the second per-epoch validation loss equals the first (same held-out
    batches, same cuts) and patience 1 stops there, one epoch before the 3-epoch budget; model/ is the best
    (the first evaluation), model_last/ the step it stopped at. The objective is the multi-task sum clue+future
    (weights 1 and 0.5), so future's DDP plumbing (every parameter gets a gradient, targets through the encoder's
    forward) and a sum's (two forwards, one backward, two heads) run in the default suite: each logged loss is
    the weighted sum of its logged parts, and model/ carries the future head as an item scorer. That future
    learns is the slow future case of test_two_worker_run_learns_and_exports."""
    from userfm.data.dataset import read_sequences
    from userfm.infer.item_scorer import ItemScorer

    cfg = quick(dataset, "early", lr=0.0, epochs=3, early_stop=1, max_steps=999, objective=["clue", "future"],
                objective_weights=(1.0, 0.5), cooc_dim=8, item_id_buckets=64)
    summary = run_pretrain(cfg, progress=lambda s: None)
    logged = [x for x in rows(Path(cfg.out)) if "loss" in x]
    assert logged and all(x["loss"] == pytest.approx(x["clue/loss"] + 0.5 * x["future/loss"], rel=1e-5) for x in logged)
    model = Path(summary["model"])
    assert json.loads((model / "objective.json").read_text())["objective"] == "future"
    train = read_sequences(cfg.data, split="train")
    catalog = sorted({i for seq in train.column("item_id").to_pylist()[:20] for i in (seq or []) if i})[:5]
    scorer = ItemScorer(model, train, catalog)
    assert scorer.scores(np.zeros((2, scorer.model.config.embed_dim), np.float32)).shape == (2, len(catalog))
    spe = summary["steps_per_epoch"]
    assert summary["max_steps"] == 3 * spe
    saved = json.loads((Path(cfg.out) / "config.json").read_text())["pretrain"]
    assert (saved["max_steps"], saved["eval_every"], saved["checkpoint_every"]) == (3 * spe, spe, spe)
    val = [x for x in rows(Path(cfg.out)) if "val_loss" in x]
    assert [x["step"] for x in val] == [spe, 2 * spe] and val[0]["val_loss"] == val[1]["val_loss"]
    assert val[1]["early_stop"] == 1 and val[1]["best_step"] == spe
    assert summary["early_stopped"] and summary["final"]["step"] == 2 * spe
    assert summary["exported"] == {"step": spe, "val_loss": val[0]["val_loss"], "which": "best"}
    assert json.loads((Path(cfg.out) / "best" / "state.json").read_text())["step"] == spe
    assert (Path(cfg.out) / "model" / "config.json").exists() and (Path(cfg.out) / "model_last" / "config.json").exists()


def test_val_split_smaller_than_a_batch_still_gives_a_validation_loss(dataset):
    """~60 val users over 2 ranks fill no batch of 64: the partial batch is evaluated (MovieLens latest-small's
    73 val users at the demo's batch 64 used to log no validation loss at all)."""
    from userfm.data.dataset import read_sequences

    n_val = read_sequences(dataset / "ds", split="val", columns=["user_id"]).num_rows
    assert n_val < 2 * 64
    cfg = quick(dataset, "run-small-val", objective="mlm", item_encoder="category", batch_size=64, max_steps=2,
                time_fields=("weekday", "hour"))
    run_pretrain(cfg, progress=lambda s: None)
    last = rows(Path(cfg.out))[-1]
    assert last["step"] == 2 and math.isfinite(last["val_loss"]) and last["val_loss"] > 0
    # the run's calendar fields reach its vocabularies, its encoder and its MLM time heads
    import userfm

    model, vocabs, _ = userfm.load_encoder(Path(cfg.out) / "model")
    assert vocabs.config.time_fields == ("weekday", "hour") and vocabs.time_sizes == (2 + 7, 2 + 24)
    assert len(model.times) == 2 and "mlm/acc/weekday" in last and "mlm/acc/year" not in last


def test_export_loads_without_ray_and_gives_identical_embeddings(dataset):
    """The exported folder (safetensors + JSON) reproduces the trained weights' embeddings exactly."""
    from safetensors.torch import load_file

    import userfm
    from userfm.data.dataset import read_sequences
    from userfm.models.encoders import EncoderConfig, UserEncoder
    from userfm.models.features import make_batch, to_torch
    from userfm.train.pretrain import latest_checkpoint

    out = dataset / "run-clue"
    model, vocabs, tok = userfm.load_encoder(out / "model")
    assert tok is not None and not model.training
    ckpt = latest_checkpoint(out)
    ref = UserEncoder(EncoderConfig.from_json(json.dumps(json.loads((ckpt / "config.json").read_text())["encoder"])))
    ref.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    ref.eval()
    batch = to_torch(make_batch(read_sequences(dataset / "ds", split="test").slice(0, 20), vocabs, tok))
    with torch.no_grad():
        assert torch.equal(model(batch), ref(batch))
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (out / "model").iterdir())
    # the co-occurrence table travelled with the weights: exactly the one fitted on the training users
    from userfm.models.cooc import CoocConfig, fit_item_vectors

    hashes, vectors = fit_item_vectors(read_sequences(dataset / "ds", split="train"), CoocConfig(dim=8, max_events=32, key="item_id"))
    assert model.config.cooc_items == len(hashes) > 100 and model.config.cooc_dim == 8 and model.config.item_key == "item_id"
    assert torch.equal(model.cooc_hashes, torch.from_numpy(hashes))
    assert torch.allclose(model.cooc_vectors, torch.from_numpy(vectors))
    with torch.no_grad():  # and the embeddings read it
        model.cooc_vectors.zero_()
        assert not torch.allclose(model(batch), ref(batch))


@pytest.mark.slow  # ~2 min (four runs); checkpoint restore stays in the default suite through the injected-failure test
def test_resume_continues_with_the_same_next_losses(dataset):
    """Seeded: stopping at step 4 and resuming gives steps 5..8 the same losses as one run to 8."""
    whole = quick(dataset, "whole", objective="simclr", max_steps=8, log_every=1, checkpoint_every=4, num_workers=1)
    run_pretrain(whole, progress=lambda s: None)
    part = quick(dataset, "part", objective="simclr", max_steps=8, log_every=1, checkpoint_every=4, num_workers=1, stop_at_step=4)
    first = run_pretrain(part, progress=lambda s: None)
    assert first["final"]["step"] == 4
    with pytest.raises(PretrainError, match="exists; pass --resume"):
        run_pretrain(part, progress=lambda s: None)
    run_pretrain(PretrainConfig(**{**part.__dict__, "stop_at_step": 0}), resume=True, progress=lambda s: None)
    a = {x["step"]: x["loss"] for x in rows(Path(whole.out))}
    b = {x["step"]: x["loss"] for x in rows(Path(part.out))}
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_injected_worker_failure_recovers_from_the_last_checkpoint(dataset):
    from userfm.data.dataset import read_sequences

    cfg = quick(dataset, "fail", objective="clue", max_steps=6, log_every=1, checkpoint_every=2, fail_at_step=3, max_failures=1)
    lines = []
    summary = run_pretrain(cfg, progress=lines.append)
    # 6 steps read fewer rows than there are training users: only (6 + 1) x 16 x 2 = 224 of them are featurized,
    # and epochs are still counted over every training user
    train_users = read_sequences(cfg.data, split="train").num_rows
    assert summary["train_rows"] == train_users > 224
    assert any(f"{train_users:,} training rows" in ln and "224 featurized: what 6 steps read" in ln for ln in lines), lines
    steps = [x["step"] for x in rows(Path(cfg.out))]
    # rank 1 died after step 3 (before rank 0 logged step 3's row, or just after): the group restarted
    # from the step-2 checkpoint and ran 3..6 again
    assert steps[:2] == [1, 2] and steps[-4:] == [3, 4, 5, 6]
    assert summary["final"]["step"] == 6
    assert (Path(cfg.out) / "model" / "model.safetensors").exists()


def test_bad_configs_are_rejected(dataset):
    with pytest.raises(ValueError, match="objective must be one of"):
        PretrainConfig(objective="bert")
    with pytest.raises(ValueError, match="mini_batch_size must be in"):
        PretrainConfig(batch_size=8, mini_batch_size=16)
    with pytest.raises(ValueError, match=r"time_fields must be distinct names .* got \['hour', 'hour'\]"):
        PretrainConfig(time_fields=("hour", "hour"))
    with pytest.raises(ValueError, match=r"got \['week'\]"):
        PretrainConfig(time_fields=("week",))
    with pytest.raises(PretrainError, match="cannot fill one step"):
        run_pretrain(quick(dataset, "huge-batch", batch_size=4096), progress=lambda s: None)


def test_featurize_limit_by_hand():
    from userfm.train.pretrain import featurize_limit

    cfg = quick(Path("unused"), "limit", max_steps=50, batch_size=64, num_workers=2, bucket_batches=8)
    assert featurize_limit(cfg, 800_000) == (50 + 8) * 64 * 2  # 7,424: what the steps read, one bucketing window more
    assert featurize_limit(cfg, 7_424) is None  # the budget reads every row anyway
    assert featurize_limit(quick(Path("unused"), "limit", max_steps=50, epochs=0.5), 800_000) is None  # epoch budgets read all


def test_lr_schedule_by_hand():
    cfg = PretrainConfig(lr=1.0, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert np.all(np.diff([lr_at(s, cfg) for s in range(4, 15)]) <= 0)


def test_minilm_item_encoder_builds_its_vector_cache_with_ray_data(tmp_path, ray_local):
    """The frozen-MiniLM path: cache built by a Ray Data job, read back by the workers, reused."""
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.models.minilm import VectorCache, cached_hashes
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    generate(SynthConfig(n_users=80, events_per_user=6, seed=9), tmp_path / "raw")
    run_ingest(IngestConfig(inputs=(str(tmp_path / "raw" / "events"),), out=str(tmp_path / "ds")), progress=lambda s: None)
    cfg = quick(tmp_path, "run", data=str(tmp_path / "ds"), item_encoder="minilm", max_steps=2, batch_size=8,
                num_workers=1, log_every=1, checkpoint_every=2)
    messages = []
    run_pretrain(cfg, progress=messages.append)
    cache = tmp_path / "ds" / "minilm_cache"
    n = len(cached_hashes(cache))
    assert n > 0 and VectorCache.load(cache).lookup(cached_hashes(cache)[:3]).shape == (3, 384)
    assert any(f"{n:,} to encode" in m for m in messages)
    from userfm.models.minilm import build_minilm_cache

    again = build_minilm_cache(str(tmp_path / "ds"), str(cache), progress=lambda s: None)
    assert again == {"texts": n, "encoded": 0}  # second build reuses every vector


def test_holdout_last_drops_each_users_last_event_before_featurizing(dataset):
    """holdout_last=1: pretraining sees every history without its last event (what a leave-one-out
    evaluation holds out); users with one event drop out; vocabularies are fitted without them too."""
    from userfm.data.dataset import read_sequences
    from userfm.train.pretrain import _fit_resources, _train_rows
    from userfm.train.steps import featurize

    cfg = quick(dataset, "unused-holdout", objective="mlm", item_encoder="category", holdout_last=1)
    rows_ = read_sequences(cfg.data)
    vocabs, _ = _fit_resources(cfg, _train_rows(cfg))
    kw = dict(split="train", objective="mlm", vocabs_json=vocabs.to_json(), tokenizer_json=None, vectors_dir=None,
              max_events=256, single_service="time_split", seed=0)
    full, held = featurize(rows_, **kw), featurize(rows_, **kw, holdout_last=1)
    lengths = np.asarray([len(r["ts"]) for r in rows_.to_pylist() if r["split"] == "train"])
    cap = cfg.max_events  # the most recent max_events events are kept
    assert list(full["length"]) == list(np.minimum(lengths[lengths > 0], cap))
    assert list(held["length"]) == list(np.minimum(lengths[lengths > 1] - 1, cap))
    n_full, n_held = lengths[lengths > 0], lengths[lengths > 1]
    f_rows = full["category"][n_full > 1]  # the full rows whose user is still there, same order
    checked = 0
    for f_row, h_row, n in zip(f_rows, held["category"], n_held):
        if n <= cap:  # not truncated: the same events, the last one gone
            assert (h_row[:n - 1] == f_row[:n - 1]).all() and (h_row[n - 1:] == 0).all()
            checked += 1
    assert checked > 100
    assert _train_rows(cfg).column("n_events").to_pylist() == [max(n - 1, 0) for n in
                                                               read_sequences(cfg.data, split="train").column("n_events").to_pylist()]
    with pytest.raises(ValueError, match="holdout_last"):
        quick(dataset, "x", holdout_last=-1)


def test_windows_featurize_every_window_of_each_history_for_event_objectives(dataset):
    """windows=True at max_events 8: an event objective gets one row per window_bounds window (a history of 20
    events: 3 rows), each row the same events as a plain featurize of that window's events; contrastive
    objectives (clue, simclr, a sum with either) read one row per user as before."""
    from userfm.data.dataset import read_sequences
    from userfm.data.sequences import window_bounds
    from userfm.objectives import reads_windows
    from userfm.train.pretrain import _fit_resources, _train_rows
    from userfm.train.steps import featurize

    from userfm.models.features import make_batch

    cfg = quick(dataset, "unused-windows", objective="mlm", item_encoder="category", max_events=8)
    rows_ = read_sequences(cfg.data)
    vocabs, _ = _fit_resources(cfg, _train_rows(cfg))
    kw = dict(split="train", vocabs_json=vocabs.to_json(), tokenizer_json=None, vectors_dir=None, max_events=8,
              single_service="time_split", seed=0)
    train = rows_.filter(pa.compute.equal(rows_.column("split"), "train"))
    lengths = np.asarray([len(t) for t in train.column("ts").to_pylist()])
    assert lengths.max() > 2 * 8  # some histories span three windows or more
    plain, win = featurize(rows_, objective="mlm", **kw), featurize(rows_, objective="mlm", windows=True, **kw)
    row, start, end = window_bounds(lengths, 8)
    assert list(win["length"]) == list((end - start)[end > start]) and len(plain["length"]) == (lengths > 0).sum()
    u = int(np.argmax(lengths))  # the longest history: its windows, newest first, come after those of the users before it
    first = int(((end > start) & (row < u)).sum())
    cats = make_batch(train.slice(u, 1), vocabs, None, max_events=256)["category"][0]  # every event of it
    assert len(start[row == u]) >= 3
    for k, (a, b) in enumerate(zip(start[row == u], end[row == u])):
        assert (win["category"][first + k][:b - a] == cats[a:b]).all() and win["length"][first + k] == b - a
    assert (win["category"][first] == plain["category"][int((lengths[:u] > 0).sum())]).all()  # the newest: the plain row
    for objective in ("clue", "simclr", "mlm+simclr"):
        assert not reads_windows(objective)
    assert reads_windows("future+next") and reads_windows("masked-item")
    assert len(featurize(rows_, objective="simclr", windows=True, **kw)["length"]) == len(plain["length"])
    assert len(featurize(rows_, objective="clue", windows=True, **kw)["a.length"]) == len(featurize(rows_, objective="clue", **kw)["a.length"])


def test_order_only_datasets_drop_the_calendar_fields(tmp_path):
    """A dataset whose ts is a clock of positions (ingest manifest time ordinal / none) gets no calendar
    fields, and pretraining says so; real time keeps the configured ones."""
    import json

    from userfm.train.pretrain import order_only_time_fields
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.data.schema import SCHEMA_VERSION

    said = []
    for kind, expect in (("real", PretrainConfig.time_fields), ("ordinal", ()), ("none", ())):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "time": kind}))
        cfg = order_only_time_fields(PretrainConfig(data=str(tmp_path / kind)), said.append)
        assert cfg.time_fields == expect, kind
    assert said == [f"[pretrain] the dataset has order only (time: {k}): no calendar fields (time_fields "
                    f"{list(PretrainConfig.time_fields)} -> [])" for k in ("ordinal", "none")]
