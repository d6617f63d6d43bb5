"""``userfm sweep``: CLUE's scaling study as a Ray Tune experiment, and ``userfm sweep report``.

Each Tune trial is one point of the grid (model size x global contrastive batch x training users x
steps or epochs x output dimension). Its driver function (:func:`_trainable`, a 0.01-CPU bundle)
runs the whole pipeline for that point: :func:`userfm.train.pretrain.run_pretrain` (which builds the
``TorchTrainer``; ``Tuner(TorchTrainer)`` no longer works in Ray 2.60), a fixed-batch pretext test
loss, :func:`userfm.infer.embed.run_embed` and one downstream task through :func:`userfm.eval.evaluate.run_evaluate`
(one head, one seed, no baselines), then ``tune.report`` s one row. ``TuneReportCallback`` forwards the
training reports (step, loss, val_loss) so ASHA can stop a trial early.

Why a separate test loss: the contrastive validation loss of pretraining is computed over the
training batch (its floor is log(batch)), so it cannot compare trials of different batch sizes. The
sweep's ``test_loss`` is symmetric InfoNCE over test users in consecutive batches of ``test_batch``
pairs at the fixed temperature: the same yardstick for every trial (CLUE objective; other objectives
fall back to the final validation loss).

Experiment folder (``out``)::

    config.json            SweepConfig
    raw/ dataset/          synthetic logs and their ingested dataset (when ``data`` is "")
    trials/<key>/          pretrain/ (run folder), embed/, eval/, row.json
    tune/<name>/           Ray Tune experiment state (``--resume`` restores it with Tuner.restore)
    results.parquet results.csv   one row per trial (see :data:`COLUMNS`)
    report/                fig_*.png, summary.md, fits.json (``userfm sweep report``)
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from userfm.config import from_dict, to_dict
from userfm.errors import UserfmError


AXES = ("size", "global_batch", "train_users", "max_steps", "epochs", "out_dim")
_AXIS_TYPES = {"size": str, "global_batch": int, "train_users": int, "max_steps": int, "epochs": float, "out_dim": int}
COLUMNS = (
    "trial", "status", *AXES, "params", "params_non_embedding", "train_rows", "steps", "epochs_seen",
    "samples_seen", "events_seen", "flops", "pf_days", "wall_s", "train_s", "samples_per_s",
    "final_val_loss", "best_val_loss", "test_loss", "task", "metric", "downstream", "downstream_lo",
    "downstream_hi", "downstream_loss",
)


class SweepError(UserfmError):
    """Bad sweep config, experiment folder or results."""


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"  # experiment name: Tune's folder out/tune/<name>
    out: str = "runs/sweeps/sweep"  # experiment folder (dataset, trials/, tune/, results, report/)
    data: str = ""  # sequence dataset from `userfm ingest`; "" = synthesize and ingest one into out/dataset
    synth_users: int = 3000  # synthetic users (data "")
    synth_events_per_user: float = 30.0  # synthetic mean events per user (data "")
    synth_seed: int = 0  # synthetic data seed (data "")
    # The grid: each mapping is a cartesian product over the axes it lists (a list or one value); the
    # swept points are the union of all mappings, duplicates once. Axes it does not list take the
    # defaults below. Axes: size, global_batch, train_users, max_steps, epochs, out_dim.
    grids: tuple[dict[str, Any], ...] = ({},)
    size: str = "tiny"  # default named encoder size (encoders.SIZES)
    global_batch: int = 32  # default global contrastive batch (users per step over all workers)
    train_users: int = 0  # default training users (first N by user-id hash; 0 = all): dataset length
    max_steps: int = 100  # default optimizer steps (used when epochs is 0)
    epochs: float = 0.0  # default passes over the training users; > 0 sets the steps instead of max_steps
    out_dim: int = 0  # default user embedding size (0 = model width)
    # pretraining settings shared by every trial (PretrainConfig fields of the same name)
    objective: str = "clue"  # userfm.objectives.OBJECTIVES: mlm | simclr | clue | future | next | masked-item
    item_encoder: str = "text"  # category | text | minilm
    pooling: str = "mean"  # cls | mean
    max_events: int = 16  # most recent events per user
    max_text_tokens: int = 8  # BPE tokens per event
    text_vocab: int = 512  # BPE vocabulary size
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 10  # linear warm-up steps (at most half of a trial's steps)
    temperature: float = 0.1  # contrastive temperature (also the test loss's)
    num_workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: float = 0.5  # Ray CPUs per worker (fractional: room for Ray Data and a concurrent trial)
    threads_per_worker: int = 1  # torch intra-op threads per worker
    use_gpu: bool = False  # one GPU per Train worker (and per trial's embedding actor)
    precision: str = "fp32"  # fp32 | bf16
    mini_batch_size: int = 0  # GradCache mini-batch per worker for big contrastive batches (0 = plain backward)
    bucket_batches: int = 1  # pretraining's length bucketing (1 = off). Off by default: measured here, CLUE with
    #                          length-sorted batches stayed collapsed at loss = log(batch) for 240 steps (similar
    #                          short histories are near-identical negatives); unsorted batches learned in 50
    log_every: int = 10  # steps between training reports
    eval_every: int = 50  # steps between validation losses (ASHA decides on them); 0 = only at the end
    eval_batches: int = 4  # validation batches per evaluation
    checkpoint_every: int = 100  # steps between pretraining checkpoints (an interrupted trial resumes from one)
    seed: int = 0  # seeds every trial's model, data order and heads
    # measurement
    test_batch: int = 64  # pairs per batch of the fixed-batch pretext test loss
    task: str = "segment"  # downstream task name in tasks_file (the fixed task every point is scored on)
    tasks_file: str = "experiments/tasks/synthetic.yaml"  # task YAML (evaluate.TaskConfig list)
    head: str = "logreg"  # downstream head: logreg | mlp
    bootstrap_samples: int = 200  # resamples for the downstream metric's interval
    # Tune
    max_concurrent_trials: int = 2  # trials at once (each needs num_workers x cpus_per_worker CPUs + Data tasks)
    asha: bool = False  # ASHA early stopping on val_loss at training steps
    asha_grace_steps: int = 50  # steps every trial runs before ASHA may stop it
    asha_reduction_factor: int = 3  # ASHA keeps 1 / this of the trials at each rung
    trial_timeout_s: float = 3600.0  # stop a trial running longer than this (seconds; 0 = never)
    time_budget_s: float = 0.0  # stop the whole experiment after this many seconds (0 = no limit)
    stop_after_trials: int = 0  # end this invocation once N trials finished (continue with --resume); 0 = all

    def __post_init__(self):
        for name in ("num_workers", "test_batch", "max_concurrent_trials", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.grids:
            raise ValueError("grids must list at least one mapping ({} = the defaults alone)")


# ----------------------------------------------------------------------------------------- grid


def grid_points(cfg: SweepConfig) -> list[dict]:
    """The swept points: the union of every grid mapping's cartesian product, in order, each once."""
    from userfm.models.encoders import SIZES

    points, seen = [], set()
    for i, grid in enumerate(cfg.grids):
        if not isinstance(grid, dict):
            raise SweepError(f"grids[{i}]: expected a mapping of axis -> values, got {grid!r}")
        unknown = sorted(set(grid) - set(AXES))
        if unknown:
            raise SweepError(f"grids[{i}]: unknown axis {unknown}; axes: {list(AXES)}")
        values = []
        for axis in AXES:
            v = grid.get(axis, getattr(cfg, axis))
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            try:
                values.append([_AXIS_TYPES[axis](x) for x in vs])
            except (TypeError, ValueError):
                raise SweepError(f"grids[{i}].{axis}: expected {_AXIS_TYPES[axis].__name__} values, got {vs!r}") from None
        for combo in itertools.product(*values):
            p = dict(zip(AXES, combo))
            where = f"grids[{i}] point {p}"
            if p["size"] not in SIZES:
                raise SweepError(f"{where}: size must be one of {sorted(SIZES)}")
            if p["global_batch"] < cfg.num_workers or p["global_batch"] % cfg.num_workers:
                raise SweepError(f"{where}: global_batch must be a positive multiple of num_workers={cfg.num_workers}")
            if p["epochs"] < 0 or p["train_users"] < 0 or p["out_dim"] < 0 or (p["epochs"] == 0 and p["max_steps"] < 1):
                raise SweepError(f"{where}: epochs, train_users, out_dim must be >= 0 and max_steps >= 1")
            if p["epochs"]:
                p["max_steps"] = 0  # set from the data in the trial; 0 keeps the key (and trial) unique
            key = trial_key(p)
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def trial_key(p: dict) -> str:
    """Readable, stable folder name of a point: ``tiny-b32-uall-s100-dw`` (w: out_dim = model width)."""
    length = f"e{p['epochs']:g}" if p["epochs"] else f"s{p['max_steps']}"
    return f"{p['size']}-b{p['global_batch']}-u{p['train_users'] or 'all'}-{length}-d{p['out_dim'] or 'w'}"


# --------------------------------------------------------------------------------------- trials


def training_rows(data: str, train_users: int, objective: str) -> int:
    """Training rows pretraining will see: users with >= 2 events for CLUE pairs, >= 1 otherwise."""
    import pyarrow.compute as pc

    from userfm.data.dataset import read_sequences
    from userfm.objectives import objective_parts
    from userfm.train.pretrain import first_users

    rows = first_users(read_sequences(data, split="train", columns=["user_id", "n_events"]), train_users)
    return int(pc.sum(pc.greater_equal(rows.column("n_events"), 2 if "clue" in objective_parts(objective) else 1)).as_py() or 0)


def pretext_test_loss(model_dir: str | Path, data: str, *, batch: int, temperature: float,
                      single_service: str = "time_split", split: str = "test") -> tuple[float | None, int]:
    """Mean symmetric InfoNCE of ``split`` users' CLUE pairs in consecutive batches of ``batch`` pairs.

    Pairs are sorted by user id (the same batches for every model); a last partial batch is dropped, so
    every batch has the same log(batch) floor. Returns ``(loss or None if < batch pairs, pairs used)``.
    """
    import torch

    from userfm.data.dataset import read_sequences
    from userfm.models.encoders import load_encoder
    from userfm.models.features import to_torch
    from userfm.objectives.losses import symmetric_info_nce
    from userfm.objectives.pretext import clue_batch, split_views
    from userfm.data.sequences import service_rows

    model, vocabs, tok = load_encoder(model_dir)
    a, b = split_views(clue_batch(service_rows(read_sequences(data, split=split)), vocabs, tok,
                                  single_service=single_service, seed=0))
    n = len(a["length"]) // batch * batch
    losses = []
    with torch.no_grad():
        for i in range(0, n, batch):
            za = model(to_torch({k: v[i:i + batch] for k, v in a.items()}))  # (batch, D)
            zb = model(to_torch({k: v[i:i + batch] for k, v in b.items()}))  # (batch, D)
            losses.append(float(symmetric_info_nce(za, zb, temperature, gather=False)))
    return (float(np.mean(losses)) if losses else None), n


def embed_cpus(cfg: SweepConfig) -> float:
    """CPUs of a trial's embedding actor: small enough that, with every concurrent trial embedding at
    once, one whole CPU stays free for the Ray Data read tasks the actors wait on (else all of them hang:
    the Data + actors deadlock of ray-notes.md)."""
    from userfm.runtime import cluster_cpus

    return round(min(0.5, max(0.05, (cluster_cpus() - 1) / cfg.max_concurrent_trials - 0.02)), 3)


def _metrics_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def run_trial(point: dict, cfg: SweepConfig, data: str, *, callbacks: tuple = (), progress=print) -> dict:
    """One grid point end to end; returns its results row (the keys of :data:`COLUMNS`) and writes row.json."""
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.models.encoders import EncoderConfig, expected_num_params
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig
    from userfm.train.pretrain import latest_checkpoint, run_pretrain
    from userfm.train.pretrain_config import PretrainConfig

    t0 = time.perf_counter()
    key = trial_key(point)
    tdir = Path(cfg.out).resolve() / "trials" / key
    tdir.mkdir(parents=True, exist_ok=True)
    per_worker = point["global_batch"] // cfg.num_workers
    steps = point["max_steps"]
    if point["epochs"]:
        rows = training_rows(data, point["train_users"], cfg.objective)
        steps_per_epoch = rows // cfg.num_workers // per_worker  # pretraining's own arithmetic (drop_last)
        if steps_per_epoch < 1:
            raise SweepError(f"trial {key}: {rows} training rows cannot fill one batch of {point['global_batch']}")
        steps = max(1, math.ceil(point["epochs"] * steps_per_epoch))
    pcfg = PretrainConfig(
        data=data, out=str(tdir / "pretrain"), objective=cfg.objective, item_encoder=cfg.item_encoder, size=point["size"],
        out_dim=point["out_dim"], pooling=cfg.pooling, max_events=cfg.max_events, max_text_tokens=cfg.max_text_tokens,
        text_vocab=cfg.text_vocab, batch_size=per_worker, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, steps // 2),
        max_steps=steps, temperature=cfg.temperature, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
        log_every=min(cfg.log_every, steps), eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, seed=cfg.seed, train_users=point["train_users"],
        threads_per_worker=cfg.threads_per_worker, use_gpu=cfg.use_gpu, precision=cfg.precision,
        mini_batch_size=min(cfg.mini_batch_size, per_worker), bucket_batches=cfg.bucket_batches,
    )
    run = Path(pcfg.out)
    summary_path = run / "summary.json"
    done = summary_path.exists() and json.loads(summary_path.read_text())["final"].get("step") == steps
    if not done:  # a trial Tune restarts continues its pretraining from the last checkpoint
        resume = run.exists() and latest_checkpoint(run) is not None
        if run.exists() and not resume:
            shutil.rmtree(run)
        progress(f"[sweep] trial {key}: pretraining {steps} steps" + (" (resumed)" if resume else ""))
        run_pretrain(pcfg, resume=resume, progress=progress, callbacks=callbacks)
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    logged = _metrics_rows(run)
    vals = [r["val_loss"] for r in logged if "val_loss" in r]
    windows = [r["events_per_s"] / r["samples_per_s"] for r in logged if r.get("samples_per_s")]
    enc = EncoderConfig.from_json((run / "model" / "config.json").read_text())
    samples = int(final["step"]) * point["global_batch"]

    if cfg.objective == "clue":
        test_loss, _ = pretext_test_loss(run / "model", data, batch=cfg.test_batch, temperature=cfg.temperature)
    else:
        test_loss = final.get("val_loss")
    emb = tdir / "embed"
    run_embed(EmbedConfig(model=str(run / "model"), data=data, out=str(emb), actors=1, cpus_per_actor=embed_cpus(cfg),
                          gpus=1.0 if cfg.use_gpu else 0.0, overwrite=True), progress=progress)
    res = run_evaluate(EvalConfig(
        data=data, embeddings={"trial": str(emb / "embeddings")}, tasks=cfg.tasks_file, only_tasks=(cfg.task,),
        out=str(tdir / "eval"), heads=(cfg.head,), baselines=(), seed=cfg.seed, seeds=1,
        bootstrap_samples=cfg.bootstrap_samples, save_heads=False, charts=False,
    ), progress=progress)
    r = next(x for x in res["rows"] if x["model"] == f"trial/{cfg.head}")
    loss_metric = r["metric"] if r["metric"] in ("log_loss", "rmse") else "log_loss"
    row = {
        "trial": key, "status": "done", **point, "max_steps": steps,
        "params": expected_num_params(enc), "params_non_embedding": expected_num_params(enc, non_embedding=True),
        "train_rows": int(summary["train_rows"]), "steps": int(final["step"]),
        "epochs_seen": int(final["step"]) / summary["steps_per_epoch"],
        "samples_seen": samples, "events_seen": float(samples * np.mean(windows)) if windows else None,
        "flops": final.get("flops"), "pf_days": final.get("pf_days"),
        # a trial whose pretraining finished in an earlier invocation: its fit time stands in for that part
        "wall_s": round(time.perf_counter() - t0 + (summary["train_seconds"] if done else 0.0), 1),
        "train_s": summary["train_seconds"],
        "samples_per_s": final.get("samples_per_s"),
        "final_val_loss": vals[-1] if vals else None, "best_val_loss": min(vals) if vals else None,
        "test_loss": test_loss, "task": cfg.task, "metric": r["metric"], "downstream": r["test"]["value"],
        "downstream_lo": r["test"]["ci"][0], "downstream_hi": r["test"]["ci"][1],
        "downstream_loss": r["test"]["value"] if loss_metric == r["metric"] else r["other_metrics"].get(loss_metric),
    }
    (tdir / "row.json").write_text(json.dumps(row, indent=2))
    progress(f"[sweep] trial {key}: test_loss {test_loss if test_loss is None else round(test_loss, 4)}, "
             f"{r['metric']} {row['downstream']}, {row['pf_days']:.3g} PF-days, {row['wall_s']:.0f}s")
    return row


def _trainable(config: dict, sweep: dict, data: str) -> None:
    """Tune driver function: one trial = one grid point (see the module docstring)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # one line per stage, not bars from every trial
    cfg = from_dict(SweepConfig, sweep)
    row = run_trial(config["point"], cfg, data, callbacks=(TuneReportCallback(),))
    tune.report({**row, "trial_done": True})


# ----------------------------------------------------------------------------------- experiment

_STOP_AFTER = 0  # this invocation's stop_after_trials (a restored Tuner's pickled stopper reads it here)


def _stopper():
    from ray import tune

    class SweepStopper(tune.Stopper):
        """Stops a trial past ``trial_timeout_s``; the experiment once ``_STOP_AFTER`` trials finished."""

        def __init__(self, timeout_s: float):
            self.timeout_s, self.done = timeout_s, 0

        def __call__(self, trial_id, result):
            self.done += bool(result.get("trial_done"))
            return bool(self.timeout_s) and result.get("time_total_s", 0) > self.timeout_s

        def stop_all(self):
            return bool(_STOP_AFTER) and self.done >= _STOP_AFTER

    return SweepStopper


def _progress_callback(n: int):
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.finished = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("trial_done"):
                self.finished += 1
                print(f"[sweep] {self.finished} trial(s) finished this run ({n} in the grid): {result['trial']} "
                      f"test_loss {result.get('test_loss')} {result.get('metric')} {result.get('downstream')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[sweep] trial {trial.config['point']} failed: see {trial.local_path}", flush=True)

    return Progress()


def prepare_data(cfg: SweepConfig, out: Path, progress=print) -> str:
    """The dataset folder: ``cfg.data``, or synthetic logs generated and ingested once into out/dataset."""
    if cfg.data:
        if not (Path(cfg.data) / "manifest.json").exists():
            raise SweepError(f"data: {cfg.data} is not a dataset folder from `userfm ingest` (no manifest.json)")
        return str(Path(cfg.data).resolve())
    ds = out / "dataset"
    if (ds / "manifest.json").exists():
        return str(ds)
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    raw = out / "raw"
    progress(f"[sweep] synthesizing {cfg.synth_users:,} users -> {raw}")
    generate(SynthConfig(n_users=cfg.synth_users, events_per_user=cfg.synth_events_per_user, seed=cfg.synth_seed), raw)
    run_ingest(IngestConfig(inputs=(str(raw / "events"),), out=str(ds), overwrite=True,
                            attributes=(str(raw / "attributes.parquet"), str(raw / "future_labels.parquet"))))
    return str(ds)


def _experiments(out: Path, name: str) -> list[Path]:
    """Tune experiment folders of this sweep, oldest first: ``name``, then ``name-2``, ``name-3``..."""
    found = [p for p in (out / "tune").glob(f"{name}*") if p.name == name or p.name.removeprefix(f"{name}-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(f"{name}-")) if p.name != name else 1)


def _new_tuner(cfg: SweepConfig, trainable, points: list[dict], name: str):
    import os

    from ray import tune

    scheduler = None
    if cfg.asha:
        from ray.tune.schedulers import ASHAScheduler

        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # val_loss comes every eval_every steps only
        scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=10**9,
                                  grace_period=cfg.asha_grace_steps, reduction_factor=cfg.asha_reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, scheduler=scheduler,
                                    time_budget_s=cfg.time_budget_s or None, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg.out) / "tune"), verbose=0,
                                  stop=_stopper()(cfg.trial_timeout_s), callbacks=[_progress_callback(len(points))],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def run_sweep(cfg: SweepConfig, *, resume: bool = False, progress=print) -> dict:
    """Run (or with ``resume`` continue) the experiment; write and return the results table summary.

    Resume restores the latest Tune experiment (``Tuner.restore``: its unfinished and errored trials run
    again, finished ones are kept). Tune marks its search as finished when an experiment is stopped
    (Ctrl-C, ``time_budget_s``, ``stop_after_trials``), so grid points it had not started yet are never
    created on restore; they run next, as a follow-up Tune experiment ``<name>-2``, ``-3``... A trial
    is finished when ``trials/<key>/row.json`` exists, so no experiment reruns it; an interrupted
    trial continues its pretraining from its last checkpoint.
    """
    from ray import tune

    from userfm.runtime import init_ray

    global _STOP_AFTER
    out = Path(cfg.out).resolve()
    if resume:
        if not (out / "config.json").exists() or not _experiments(out, cfg.name):
            raise SweepError(f"{out}: no experiment to resume (no config.json or Tune state in {out / 'tune'})")
        saved = from_dict(SweepConfig, json.loads((out / "config.json").read_text()), where=str(out / "config.json"))
        cfg = replace(saved, stop_after_trials=cfg.stop_after_trials)  # the grid is the saved one
    elif (out / "tune" / cfg.name).exists():
        raise SweepError(f"{out} already holds experiment {cfg.name!r}; pass --resume to continue it, or choose another out")
    cfg = replace(cfg, out=str(out), tasks_file=_resolve_tasks(cfg))
    points = grid_points(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    init_ray()
    data = prepare_data(cfg, out, progress)
    _STOP_AFTER = cfg.stop_after_trials
    trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=to_dict(cfg), data=data), {"cpu": 0.01})
    t0 = time.perf_counter()
    grids = []
    if resume:
        latest = _experiments(out, cfg.name)[-1]
        progress(f"[sweep] restoring Tune experiment {latest}")
        grids.append(tune.Tuner.restore(str(latest), trainable, resume_unfinished=True, resume_errored=True).fit())
    stopped = _early_stopped(out) if cfg.asha else set()
    todo = [p for p in points if not _finished(out, p) and trial_key(p) not in stopped]
    if todo and not (resume and _STOP_AFTER and sum(_finished(out, p) for p in points) >= _STOP_AFTER):
        name = cfg.name if not resume else f"{cfg.name}-{len(_experiments(out, cfg.name)) + 1}"
        progress(f"[sweep] {len(todo)} of {len(points)} trials to run, {cfg.max_concurrent_trials} at a time, "
                 f"on {data} -> {out / 'tune' / name}")
        grids.append(_new_tuner(cfg, trainable, todo, name).fit())
    table = results_table(grids, out, points)
    summary = write_results(table, out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    progress(f"[sweep] {summary['done']}/{len(points)} trials done ({summary['seconds']:.0f}s) -> {out / 'results.parquet'}"
             + ("; continue with --resume" if summary["done"] < len(points) else ""))
    return summary


def _finished(out: Path, point: dict) -> bool:
    return (out / "trials" / trial_key(point) / "row.json").exists()


def _early_stopped(out: Path) -> set[str]:
    """Trials ASHA stopped in an earlier invocation (from its results table): not rerun on resume."""
    import pandas as pd

    path = out / "results.parquet"
    if not path.exists():
        return set()
    t = pd.read_parquet(path, columns=["trial", "status"])
    return set(t.loc[t["status"] == "stopped", "trial"])


def _resolve_tasks(cfg: SweepConfig) -> str:
    """The task file as an absolute path (Tune runs trials in their own folders), checked up front."""
    from userfm.eval.tasks import load_tasks

    path = Path(cfg.tasks_file)
    if not path.is_absolute() and not path.exists():  # e.g. the default, run from outside the repository
        path = Path(__file__).resolve().parents[3] / cfg.tasks_file
    path = path.resolve()
    try:
        load_tasks(path, (cfg.task,))
    except (UserfmError, ValueError) as exc:
        raise SweepError(f"tasks_file / task: {exc}") from None
    return str(path)


def _trial_dirname(trial) -> str:
    return f"{trial.trial_id}-{trial_key(trial.config['point'])}"


def results_table(grids, out: Path, points: list[dict]):
    """One row per grid point (:data:`COLUMNS`): finished trials from their ``row.json``, the others with
    their last status in ``grids`` (this invocation's Tune results): error, stopped, or not_run."""
    import pandas as pd

    last = {}
    for grid in grids:
        for r in grid:
            point = (r.config or {}).get("point")
            if point:
                last[trial_key(point)] = r
    rows = []
    for p in points:
        key = trial_key(p)
        saved = out / "trials" / key / "row.json"
        if saved.exists():
            rows.append({c: json.loads(saved.read_text()).get(c) for c in COLUMNS})
            continue
        r = last.get(key)
        m = (r.metrics or {}) if r is not None else {}
        status = "not_run" if r is None or not m and not r.error else ("error" if r.error else "stopped")
        rows.append({**{c: None for c in COLUMNS}, **p, "trial": key, "status": status, "steps": m.get("step"),
                     "final_val_loss": m.get("val_loss"), "pf_days": m.get("pf_days"), "flops": m.get("flops")})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.sort_values(["status", "pf_days"], na_position="last").reset_index(drop=True)


def write_results(table, out: Path) -> dict:
    table.to_parquet(out / "results.parquet", index=False)
    table.to_csv(out / "results.csv", index=False)
    counts = table["status"].value_counts().to_dict()
    return {"trials": len(table), "done": int(counts.get("done", 0)), "by_status": counts,
            "results": str(out / "results.parquet")}


