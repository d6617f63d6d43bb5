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
from dataclasses import asdict, dataclass, replace
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
    objective: str = "clue"  # userfm.train.pretrain.OBJECTIVES: mlm | simclr | clue | future | next | masked-item
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
    from userfm.train.pretrain import first_users

    rows = first_users(read_sequences(data, split="train", columns=["user_id", "n_events"]), train_users)
    return int(pc.sum(pc.greater_equal(rows.column("n_events"), 2 if objective == "clue" else 1)).as_py() or 0)


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
    from userfm.train.pretrain import PretrainConfig, latest_checkpoint, run_pretrain

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
    from userfm.data.synth import SynthConfig, generate

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


# --------------------------------------------------------------------------------------- report


def _slice(df, x: str, vary: tuple[str, ...] = ("size",)):
    """The trials that vary ``x`` (and ``vary``) with every other axis fixed: the largest such group."""
    others = [a for a in AXES if a != x and a not in vary and not (x == "epochs" and a == "max_steps")]
    best = None
    for _, g in df.groupby([df[a].astype(str) for a in others], sort=False):
        if best is None or g[x].nunique() > best[x].nunique() or (
                g[x].nunique() == best[x].nunique() and len(g) > len(best)):
            best = g
    return best if best is not None else df.iloc[:0]


def _lines(ax, g, x: str, y: str, xlabel: str, ylabel: str, logx: bool = True, ci: bool = True):
    sizes = sorted(g["size"].unique(), key=lambda s: g[g["size"] == s]["params_non_embedding"].iloc[0])
    for s in sizes:
        h = g[g["size"] == s].sort_values(x)
        label = f"{s} ({int(h['params_non_embedding'].iloc[0]):,} non-emb. params)"
        if ci and {"downstream_lo", "downstream_hi"} <= set(h.columns) and y == "downstream":
            yerr = np.abs(np.stack([h[y] - h["downstream_lo"], h["downstream_hi"] - h[y]]).astype(float))
            ax.errorbar(h[x], h[y], yerr=yerr, marker="o", capsize=3, label=label)
        else:
            ax.plot(h[x], h[y], marker="o", label=label)
    if logx and len(g) and (g[x] > 0).all() and g[x].nunique() > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if g[x].nunique() < 2:
        ax.text(0.5, 0.5, f"{xlabel}: not varied in this sweep", transform=ax.transAxes, ha="center", alpha=0.6)
    if len(g):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _fit_or_none(x, y, offset=False):
    from userfm.train.scaling import fit_power_law

    try:
        return fit_power_law(x, y, offset=offset)
    except (ValueError, RuntimeError):
        return None


def _effect(g, x: str) -> list[dict]:
    """Per size: metric at the smallest and largest x of a slice, and their Spearman correlation."""
    from userfm.train.scaling import correlation

    out = []
    for s, h in g.groupby("size"):
        h = h.sort_values(x)
        if h[x].nunique() < 2:
            continue
        out.append({"size": s, "x_lo": h[x].iloc[0], "x_hi": h[x].iloc[-1], "lo": h["downstream"].iloc[0],
                    "hi": h["downstream"].iloc[-1], "spearman": correlation(h[x], h["downstream"])["spearman"],
                    "ci_half": float(np.nanmedian((h["downstream_hi"] - h["downstream_lo"]) / 2))})
    return out


def run_report(experiment: str | Path, progress=print) -> dict:
    """Fits, six figures and a Markdown summary of an experiment, into ``<experiment>/report/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from userfm.train.scaling import best_per_group, compute_frontier, correlation

    exp = Path(experiment)
    if not (exp / "results.parquet").exists():
        raise SweepError(f"{exp}: no results.parquet (run `userfm sweep --config ...` first)")
    table = pd.read_parquet(exp / "results.parquet")
    df = table[(table["status"] == "done") & table["test_loss"].notna()].copy()
    if df.empty:
        raise SweepError(f"{exp}: no finished trials in results.parquet")
    rep = exp / "report"
    rep.mkdir(exist_ok=True)
    higher = bool(df["metric"].iloc[0] not in ("rmse", "log_loss"))
    metric = f"{df['task'].iloc[0]} {df['metric'].iloc[0]}"

    # fits
    c, l = df["pf_days"].to_numpy(float), df["test_loss"].to_numpy(float)
    front = compute_frontier(c, l)
    fit_c, fit_c_off, fit_all = _fit_or_none(c[front], l[front]), _fit_or_none(c[front], l[front], True), _fit_or_none(c, l)
    base_dim = df["out_dim"].mode().iloc[0]
    n_keys, n_loss = best_per_group(df[df["out_dim"] == base_dim]["params_non_embedding"], df[df["out_dim"] == base_dim]["test_loss"])
    fit_n = _fit_or_none(np.array(n_keys, float), n_loss)
    corr_loss = correlation(df["test_loss"], df["downstream_loss"])
    corr_metric = correlation(df["test_loss"], df["downstream"])

    figs = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    g1 = _slice(df, "global_batch")
    _lines(ax, g1, "global_batch", "downstream", "global contrastive batch (users)", metric)
    ax.set_title("(1) downstream vs batch size x model size")
    figs["batch_size"] = g1
    fig.tight_layout(), fig.savefig(rep / "fig_batch_size.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g2 = _slice(df, "train_users")
    _lines(ax, g2, "train_rows", "downstream", "dataset length (training users)", metric)
    ax.set_title("(2) downstream vs dataset length x model size")
    figs["data_length"] = g2
    # L(D) on the data-length slice (every other axis fixed), per model size: the largest one with >= 3 lengths
    fit_d = None
    for _, h in sorted(g2.groupby("size"), key=lambda kv: -kv[1]["params_non_embedding"].iloc[0]):
        d_keys, d_loss = best_per_group(h["train_rows"], h["test_loss"])
        fit_d = fit_d or _fit_or_none(np.array(d_keys, float), d_loss)
    fig.tight_layout(), fig.savefig(rep / "fig_data_length.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, h in df.groupby("size"):
        ax.scatter(h["pf_days"], h["test_loss"], label=s, alpha=0.7)
    ax.plot(c[front][np.argsort(c[front])], l[front][np.argsort(c[front])], "k--", lw=1, label="compute frontier")
    if fit_c is not None:
        xs = np.geomspace(c.min(), c.max(), 100)
        ax.plot(xs, fit_c.predict(xs), "r-", label=f"fit: b = {fit_c.b:.3f} ± {fit_c.b_err:.3f}, R² = {fit_c.r2:.2f}")
    ax.set_xscale("log"), ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f")), ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("compute (PF-days)"), ax.set_ylabel(f"pretext test loss (batch {int(_cfg(exp).get('test_batch', 0))})")
    ax.set_title("(3) test loss vs compute"), ax.legend(fontsize=8), ax.grid(alpha=0.3, which="both")
    fig.tight_layout(), fig.savefig(rep / "fig_loss_vs_compute.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, h in df.groupby("size"):
        ax.scatter(h["test_loss"], h["downstream_loss"], label=s, alpha=0.7)
    if corr_loss["pearson"] is not None:
        k, b0 = np.polyfit(df["test_loss"], df["downstream_loss"], 1)
        xs = np.linspace(df["test_loss"].min(), df["test_loss"].max(), 10)
        ax.plot(xs, k * xs + b0, "k--", lw=1)
        ax.set_title(f"(4) pretext vs downstream loss: Pearson r = {corr_loss['pearson']:.2f} (p = {corr_loss['pearson_p']:.2g})", fontsize=9)
    else:
        ax.set_title("(4) pretext vs downstream loss (too few points for a correlation)", fontsize=9)
    ax.set_xlabel("pretext test loss"), ax.set_ylabel(f"downstream {df['task'].iloc[0]} loss"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(rep / "fig_pretext_vs_downstream.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g5 = _slice(df, "out_dim").copy()
    g5["dim"] = [d or _width(exp, t) for d, t in zip(g5["out_dim"], g5["trial"])]
    _lines(ax, g5, "dim", "downstream", "output embedding dimension", metric)
    ax.set_title("(5) downstream vs output dimension")
    figs["out_dim"] = g5
    fig.tight_layout(), fig.savefig(rep / "fig_out_dim.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g6 = _slice(df, "epochs") if df["epochs"].nunique() > 1 else _slice(df, "max_steps")
    _lines(ax, g6, "epochs_seen", "downstream", "epochs (passes over the training users)", metric)
    ax.set_title("(6) downstream vs epochs per model size")
    figs["epochs"] = g6
    fig.tight_layout(), fig.savefig(rep / "fig_epochs.png", dpi=120), plt.close(fig)

    fits = {"L(C)": fit_c, "L(C)+c": fit_c_off, "L(C) all points": fit_all, "L(N)": fit_n, "L(D)": fit_d}
    info = {
        "trials": {k: int(v) for k, v in table["status"].value_counts().items()},
        "fits": {k: (v.to_dict() if v is not None else None) for k, v in fits.items()},
        "frontier": df.loc[front, ["trial", "pf_days", "test_loss"]].to_dict("records"),
        "correlation_test_loss_vs_downstream_loss": corr_loss,
        "correlation_test_loss_vs_downstream_metric": corr_metric,
        "effects": {k: _effect(g, "epochs_seen" if k == "epochs" else ("dim" if k == "out_dim" else
                                                                       ("train_rows" if k == "data_length" else "global_batch")))
                    for k, g in figs.items()},
        "size_gap_by_batch": size_gaps(g1, "global_batch"),
        "figures": sorted(p.name for p in rep.glob("fig_*.png")),
    }
    (rep / "fits.json").write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    (rep / "summary.md").write_text(format_summary(exp, table, df, info, fits, metric, higher))
    progress(f"[sweep report] {fit_c.describe('C') if fit_c else 'L(C): too few frontier points to fit'}")
    progress(f"[sweep report] wrote {len(info['figures'])} figures, summary.md, fits.json -> {rep}")
    return info


def _cfg(exp: Path) -> dict:
    p = exp / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _width(exp: Path, trial: str) -> int:
    p = exp / "trials" / trial / "pretrain" / "model" / "config.json"
    return int(json.loads(p.read_text())["d_model"]) if p.exists() else 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _fmt_fit(f, x: str, y: str = "L") -> str:
    return f.describe(x, y) if f is not None else "not fitted (too few distinct points: 3 needed, 4 with the offset)"


def format_summary(exp: Path, table, df, info: dict, fits: dict, metric: str, higher: bool) -> str:
    """The Markdown summary: every sentence is computed from the results, none is canned."""
    better = "higher" if higher else "lower"
    c = df["pf_days"]
    lines = [
        f"# Scaling sweep: {exp.name}", "",
        f"{len(df)} of {len(table)} trials finished ({', '.join(f'{k}: {v}' for k, v in info['trials'].items())}). "
        f"Compute spans {c.min():.3g} to {c.max():.3g} PF-days ({math.log10(c.max() / c.min()):.2f} decades); "
        f"test loss {df['test_loss'].min():.4f} to {df['test_loss'].max():.4f}; downstream {metric} "
        f"{df['downstream'].min():.4f} to {df['downstream'].max():.4f} ({better} is better). "
        f"Trial wall time: median {df['wall_s'].median():.0f}s, total {df['wall_s'].sum() / 60:.1f} min.", "",
        "## Power laws", "",
        f"- Test loss vs compute, on the {len(info['frontier'])} frontier points: {_fmt_fit(fits['L(C)'], 'C')}",
        f"- With an irreducible term: {_fmt_fit(fits['L(C)+c'], 'C')}",
        f"- All {len(df)} points (not only the frontier): {_fmt_fit(fits['L(C) all points'], 'C')}",
        f"- Best test loss vs non-embedding parameters: {_fmt_fit(fits['L(N)'], 'N')}",
        f"- Test loss vs training users (the data-length slice, largest model with 3 lengths): {_fmt_fit(fits['L(D)'], 'D')}",
        "", "## What the sweep shows", "",
    ]
    f = fits["L(C)"]
    if f is not None:
        verdict = ("falls with compute" if f.b - 2 * f.b_err > 0 else "does not fall significantly with compute")
        lines.append(f"- **Loss vs compute**: test loss {verdict} along the frontier (b = {f.b:.4f} ± {f.b_err:.4f}, "
                     f"R² = {f.r2:.3f}); one decade more compute multiplies it by {10 ** -f.b:.3f}.")
    front = sorted(info["frontier"], key=lambda r: r["pf_days"])
    if front:
        seq = [r["trial"].split("-")[0] for r in front]
        runs = [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]
        lines.append(f"- **Frontier**: from low to high compute the best trials are {' -> '.join(runs)} "
                     f"({', '.join(r['trial'] for r in front)}).")
    cl, cm = info["correlation_test_loss_vs_downstream_loss"], info["correlation_test_loss_vs_downstream_metric"]
    if cl["pearson"] is not None:
        lines.append(f"- **Pretext vs downstream**: over {cl['n']} trials, test loss and downstream loss correlate with "
                     f"Pearson r = {cl['pearson']:.2f} (p = {cl['pearson_p']:.2g}), Spearman {cl['spearman']:.2f}; "
                     f"test loss vs {metric}: r = {cm['pearson']:.2f} (p = {cm['pearson_p']:.2g}).")
    eff = info["effects"]
    for e in eff["batch_size"]:
        lines.append(f"- **Batch ({e['size']})**: global batch {e['x_lo']:g} -> {e['x_hi']:g} moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}; median 95% CI half-width {e['ci_half']:.4f}).")
    gaps = info["size_gap_by_batch"]
    if gaps:
        text = "- **Batch x size**: bigger-minus-smaller model " + ", ".join(f"{g:+.4f} at batch {b:g}" for b, g in gaps)
        if len(gaps) > 1:
            change = gaps[-1][1] - gaps[0][1]
            noise = max((e["ci_half"] for e in eff["batch_size"]), default=float("nan"))
            text += (f"; from the smallest to the largest batch the bigger model's advantage changes by {change:+.4f}, "
                     f"{'within' if abs(change) <= noise else 'beyond'} the 95% CI half-width {noise:.4f}")
        lines.append(text + ".")
    for e in eff["data_length"]:
        lines.append(f"- **Data length ({e['size']})**: {e['x_lo']:g} -> {e['x_hi']:g} training users moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}, Spearman {_f(e['spearman'])}).")
    fn, fd = fits["L(N)"], fits["L(D)"]
    if fn is not None and fd is not None:
        lines.append(f"- **Size vs data**: loss exponents b_N = {fn.b:.4f} ± {fn.b_err:.4f}, b_D = {fd.b:.4f} ± {fd.b_err:.4f}: "
                     f"a decade of {'parameters' if fn.b > fd.b else 'data'} buys more.")
    for e in eff["out_dim"]:
        spread = e["hi"] - e["lo"]
        lines.append(f"- **Output dimension ({e['size']})**: {e['x_lo']:g} -> {e['x_hi']:g} dims moves {metric} by {spread:+.4f}, "
                     f"{'within' if abs(spread) <= e['ci_half'] else 'beyond'} the median 95% CI half-width {e['ci_half']:.4f}.")
    for e in eff["epochs"]:
        lines.append(f"- **Epochs ({e['size']})**: {e['x_lo']:.2f} -> {e['x_hi']:.2f} epochs moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}, Spearman {_f(e['spearman'])}).")
    lines += ["", "## Figures", ""] + [f"![{p}]({p})" for p in info["figures"]]
    lines += ["", "## Trials", "", "| trial | non-emb. params | steps | epochs | PF-days | test loss | best val loss | "
              f"{metric} | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.sort_values("pf_days").iterrows():
        lines.append(f"| {r['trial']} | {int(r['params_non_embedding']):,} | {int(r['steps'])} | {r['epochs_seen']:.2f} | "
                     f"{r['pf_days']:.3g} | {r['test_loss']:.4f} | {_f(r['best_val_loss'])} | {r['downstream']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def size_gaps(g, x: str) -> list[tuple[float, float]]:
    """``(x, downstream of the largest model - of the smallest)`` for each ``x`` of a slice run at >= 2 sizes."""
    out = []
    for v, h in g.groupby(x):
        if h["size"].nunique() >= 2:
            h = h.sort_values("params_non_embedding")
            out.append((float(v), float(h["downstream"].iloc[-1] - h["downstream"].iloc[0])))
    return sorted(out)
