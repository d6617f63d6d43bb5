"""``userfm pretrain``: contrastive / masked pretraining of the user encoder on Ray Train (DDP).

Layout, as in Ray's docs code: the driver (:func:`run_pretrain`) fits vocabularies and the tokenizer,
builds the featurized Ray Datasets (sequence batches; CLUE service pairs), and launches a
``TorchTrainer``; the per-worker loop (:func:`train_loop`) only iterates its dataset shard.

Determinism, which resume and recovery rely on: every random draw of step ``s`` on rank ``r``
(dropout, masking, augmentation) is seeded from ``(seed, s, r)``, and the shard order is fixed
(``preserve_order`` + a per-epoch seeded local shuffle), so a run resumed from the checkpoint of step
``s`` computes the same step ``s + 1`` as an uninterrupted run.

Run folder (``out``)::

    config.json             PretrainConfig + EncoderConfig
    vocabs.json tokenizer.json
    metrics.jsonl metrics.csv  one row per log interval (rank 0), plus validation rows
    tb/                     TensorBoard event files
    ray/                    Ray Train storage: checkpoints (model/head safetensors, optimizer, step)
    model/                  the exported encoder: userfm.load_encoder(out + "/model")
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from userfm.objectives import objective_parts, reads_windows
from userfm.train.pretrain_config import PretrainConfig, PretrainError
from userfm.train.steps import featurize
from userfm.train.worker import train_loop


# ------------------------------------------------------------------------------------- driver


def _read_rows(path: str, split: str, train_users: int = 0):
    from userfm.data.dataset import read_sequences

    rows = read_sequences(path, split=split)
    return first_users(rows, train_users) if split == "train" else rows


def _train_rows(cfg: PretrainConfig):
    """The training users' sequences the vocabularies and tokenizer are fitted on (held-out events dropped)."""
    from userfm.data.sequences import drop_last_events

    return drop_last_events(_read_rows(cfg.data, "train", cfg.train_users), cfg.holdout_last)


def first_users(rows, n: int):
    """The ``n`` users of ``rows`` with the smallest user-id hash (all if ``n`` is 0): nested as ``n`` grows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from userfm.data.sequences import split_fraction

    users = sorted(set(rows.column("user_id").to_pylist()), key=split_fraction)
    if not n or len(users) <= n:
        return rows
    return rows.filter(pc.is_in(rows.column("user_id"), value_set=pa.array(users[:n])))


def _fit_resources(cfg: PretrainConfig, train_rows) -> tuple[Any, Any]:
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.models.tokenizer import TextTokenizer

    vocabs = fit_vocabs(train_rows, FeatureConfig(max_events=cfg.max_events, max_text_tokens=cfg.max_text_tokens,
                                                  time_fields=tuple(cfg.time_fields)))
    tok = None
    if cfg.item_encoder == "text":
        texts = [t for lst in train_rows.column("text").to_pylist() for t in (lst or [])]
        tok = TextTokenizer.fit(texts, vocab_size=cfg.text_vocab)
    return vocabs, tok


def _only_users(batch, ids):
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("user_id"), value_set=ids))


def featurize_limit(cfg: PretrainConfig, train_users: int) -> int | None:
    """Training rows worth featurizing: a fixed step budget (no ``epochs``) that reads fewer rows than there are
    training users featurizes only the first (max_steps + bucket_batches) x batch_size x num_workers of them (one
    length-bucketing window to spare), instead of materializing the whole set for a fraction of an epoch (1M
    synthetic users: 12 GB spilled to disk for 50 steps, 486 s). None: every row (an epoch budget reads them all)."""
    need = (cfg.max_steps + max(cfg.bucket_batches, 1)) * cfg.batch_size * cfg.num_workers
    return need if not cfg.epochs and need < train_users else None


def _datasets(cfg: PretrainConfig, vocabs, tok, vectors_dir: str | None, limit_train: int | None = None):
    import pyarrow as pa
    import ray

    from userfm.data.dataset import load_manifest

    manifest = load_manifest(cfg.data)
    folder = Path(cfg.data) / manifest["files"]["sequences"]
    kwargs = dict(
        objective=cfg.objective, vocabs_json=vocabs.to_json(), tokenizer_json=tok.to_json() if tok else None,
        # hashes only (vectors_dir None): each worker looks its step's MiniLM vectors up (add_vectors)
        vectors_dir=None, max_events=cfg.max_events, single_service=cfg.single_service, seed=cfg.seed,
        services=tuple(cfg.services), holdout_last=cfg.holdout_last, windows=cfg.windows,
    )
    out = {}
    for split in ("train", "val"):
        ds = ray.data.read_parquet(str(folder))
        if split == "train" and cfg.train_users:  # the data-length axis: a nested subset of the training users
            ids = pa.array(first_users(_read_rows(cfg.data, "train"), cfg.train_users).column("user_id").to_pylist())
            ds = ds.map_batches(_only_users, batch_format="pyarrow", fn_kwargs={"ids": ids})
        # materialized: row counts are known (equal steps per rank) and no Data task competes with
        # the training workers for CPUs (the 2-CPU Data + Train deadlock in ray-notes.md)
        ds = ds.map_batches(featurize, batch_format="pyarrow", batch_size=512, fn_kwargs={**kwargs, "split": split})
        if split == "train" and limit_train:  # a streaming limit: reading stops once the budget's rows are featurized
            ds = ds.limit(limit_train)
        out[split] = ds.materialize()
    return out


def order_only_time_fields(cfg: PretrainConfig, progress=print) -> PretrainConfig:
    """``cfg`` without calendar fields when the dataset's ``ts`` is not a time (ingest manifest ``time``
    "ordinal" / "none": a clock of positions, e.g. the shared Amazon and Tenrec sets), printing why: every
    event's date, hour and weekday there is the same made-up one. The order still shapes the sequence."""
    from userfm.data.dataset import DatasetError, load_manifest

    try:
        time_kind = load_manifest(cfg.data).get("time", "real")
    except DatasetError:  # an object-store dataset: its manifest is not read here
        return cfg
    if time_kind == "real" or not cfg.time_fields:
        return cfg
    progress(f"[pretrain] the dataset has order only (time: {time_kind}): no calendar fields "
             f"(time_fields {list(cfg.time_fields)} -> [])")
    return replace(cfg, time_fields=())


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False, progress=print, callbacks: tuple = ()) -> dict:
    """Fit vocabularies, build datasets, train on Ray Train, export ``out/model``. Returns a summary.

    ``callbacks``: Ray Train callbacks, e.g. ``TuneReportCallback()`` when a Tune trial drives this run.
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from userfm.models.encoders import config_for
    from userfm.runtime import init_ray

    if not cfg.data:
        raise PretrainError("data is required (a dataset folder from `userfm ingest`)")
    init_ray()
    out = Path(cfg.out).resolve()
    resume_from = None
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise PretrainError(f"{out} exists; pass --resume to continue it, or choose another --out")
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise PretrainError(f"{out}: no checkpoint to resume from")
        saved = json.loads((out / "config.json").read_text())["pretrain"]
        cfg = replace(cfg, **{k: saved[k] for k in ("objective", "item_encoder", "size", "out_dim", "pooling",
                                                    "max_events", "max_text_tokens", "text_vocab", "seed", "holdout_last") if k in saved},
                      services=tuple(saved.get("services", ())),
                      time_fields=tuple(saved.get("time_fields", PretrainConfig.time_fields)),
                      # a run from before the co-occurrence vectors has none: resume it without them
                      cooc_dim=saved.get("cooc_dim", 0), cooc_min_users=saved.get("cooc_min_users", 2),
                      windows=saved.get("windows", False),  # and before windows, one row per user
                      cooc_windows=saved.get("cooc_windows", False))  # and its vectors' table the same size
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, out=str(out))
    if resume_from is None:
        cfg = order_only_time_fields(cfg, progress)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # fixed shard order: resume replays the same batches
    ctx.enable_progress_bars = False  # per-epoch shard bars from every worker would drown the progress lines

    t0 = time.perf_counter()
    train_rows = _train_rows(cfg)
    if cfg.services:
        from userfm.data.dataset import load_manifest
        from userfm.data.sequences import restrict_services

        known = set(load_manifest(cfg.data).get("services", {}))
        unknown = sorted(set(cfg.services) - known) if known else []
        if unknown:
            raise PretrainError(f"services: {unknown} not in the dataset (it has {sorted(known)})")
        train_rows = restrict_services(train_rows, cfg.services)
    if train_rows.num_rows == 0:
        raise PretrainError(f"{cfg.data}: no training users")
    if resume_from is not None:
        from userfm.models.features import Vocabs
        from userfm.models.tokenizer import TextTokenizer

        vocabs = Vocabs.load(out / "vocabs.json")
        tok = TextTokenizer.load(out / "tokenizer.json") if (out / "tokenizer.json").exists() else None
    else:
        t_v = time.perf_counter()
        vocabs, tok = _fit_resources(cfg, train_rows)
        vocabs.save(out / "vocabs.json")
        if tok is not None:
            tok.save(out / "tokenizer.json")
        progress(f"[pretrain] vocabularies{' and tokenizer' if tok is not None else ''} fitted on "
                 f"{train_rows.num_rows:,} users ({time.perf_counter() - t_v:.1f}s)")
    vectors_dir = None
    extra: dict[str, Any] = {}
    if cfg.item_encoder == "minilm":
        vectors_dir = cfg.minilm_cache or str(Path(cfg.data) / "minilm_cache")
        from userfm.models.minilm import build_minilm_cache

        t_m = time.perf_counter()
        built = build_minilm_cache(cfg.data, vectors_dir, progress)
        progress(f"[pretrain] MiniLM cache ready: {built['encoded']:,} of {built['texts']:,} distinct texts encoded "
                 f"({time.perf_counter() - t_m:.1f}s)")
        extra["text_vector_dim"] = 384
    windows = cfg.windows and reads_windows(cfg.objective)  # the encoder trains on every window of each history
    cooc = None
    if cfg.cooc_dim:
        from userfm.models.cooc import CoocConfig, fit_item_vectors

        t_c = time.perf_counter()
        every = cfg.cooc_windows and windows  # count what the encoder trains on
        cooc = fit_item_vectors(train_rows, CoocConfig(dim=cfg.cooc_dim, min_users=cfg.cooc_min_users,
                                                       max_events=0 if every else cfg.max_events, seed=cfg.seed,
                                                       key=cfg.item_key))
        if len(cooc[0]):
            extra.update(cooc_items=len(cooc[0]), cooc_dim=cooc[1].shape[1])
        progress(f"[pretrain] item co-occurrence vectors: {len(cooc[0]):,} items x {cooc[1].shape[1]} "
                 f"(taken by >= {cfg.cooc_min_users} training users, counting "
                 f"{'every event' if every else f'their last {cfg.max_events} events'}; {time.perf_counter() - t_c:.1f}s)")
    enc_cfg = config_for(cfg.size, vocabs, tok, item_encoder=cfg.item_encoder, out_dim=cfg.out_dim,
                         pooling=cfg.pooling, dropout=cfg.dropout, max_events=cfg.max_events,
                         item_id_buckets=cfg.item_id_buckets, item_key=cfg.item_key, causal="next" in objective_parts(cfg.objective), **extra)
    progress(f"[pretrain] read the rows and fitted every input ({time.perf_counter() - t0:.1f}s: the lines above)")

    t1 = time.perf_counter()
    limit = featurize_limit(cfg, train_rows.num_rows)
    datasets = _datasets(cfg, vocabs, tok, vectors_dir, limit)
    n_train = featurized = datasets["train"].count()
    if limit and featurized == limit:  # a prefix: epochs are counted over the training users read for the fits
        n_train = train_rows.num_rows
    per_rank = n_train // cfg.num_workers
    steps_per_epoch = per_rank // cfg.batch_size
    if steps_per_epoch < 1:
        raise PretrainError(
            f"{n_train} training rows cannot fill one step of batch_size={cfg.batch_size} x num_workers={cfg.num_workers}"
        )
    if cfg.epochs:
        per_epoch = {"eval_every": steps_per_epoch, "checkpoint_every": steps_per_epoch} if not cfg.eval_every else {}
        want = max(1, round(cfg.epochs * steps_per_epoch))
        capped = want > cfg.max_steps
        cfg = replace(cfg, max_steps=min(want, cfg.max_steps), **per_epoch)
        progress(f"[pretrain] budget {cfg.epochs:g} epochs x {steps_per_epoch} steps/epoch = {want} steps"
                 + (f", capped at max_steps {cfg.max_steps} ({cfg.max_steps / steps_per_epoch:.1f} epochs)" if capped else "")
                 + (f", validation every {cfg.eval_every} steps" if cfg.eval_every else "")
                 + (f", early stop after {cfg.early_stop} evaluations without a lower val loss" if cfg.early_stop else ""))
    # once the budget is fixed: the steps an epoch budget came to are what a resume or a reader sees
    (out / "config.json").write_text(json.dumps({"pretrain": asdict(cfg), "encoder": json.loads(enc_cfg.to_json())}, indent=2))
    lengths = [datasets["train"].take(min(n_train, 256))]
    key = "a.length" if "clue" in objective_parts(cfg.objective) else "length"
    events_per_sample = float(np.mean([r[key] for r in lengths[0]]))
    progress(f"[pretrain] {n_train:,} training rows" + (f" (every {cfg.max_events}-event window of each history)" if windows else "")
             + f" ({steps_per_epoch} steps/epoch"
             + (f"; {featurized:,} featurized: what {cfg.max_steps} steps read" if featurized < n_train else "") + "), "
             f"{datasets['val'].count():,} validation rows ({time.perf_counter() - t1:.1f}s)")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": asdict(cfg), "encoder": enc_cfg.to_json(), "steps_per_epoch": steps_per_epoch,
            "events_per_sample": events_per_sample, "resume_from": str(resume_from) if resume_from else None,
            "cooc": cooc, "vectors_dir": vectors_dir,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(out / "ray"), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # rank 0 prints its own progress
        ),
        datasets=datasets,
    )
    t2 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t2
    if result.error:
        raise PretrainError(f"training failed: {result.error}")
    final_step = int(result.metrics.get("step", 0))
    early = bool(result.metrics.get("early_stop"))
    if final_step < cfg.max_steps and not early:
        progress(f"[pretrain] stopped at step {final_step}/{cfg.max_steps} (stop_at_step); continue with --resume")
    best = json.loads((out / "best" / "state.json").read_text()) if (out / "best" / "state.json").exists() else None
    with result.checkpoint.as_directory() as d:
        if cfg.export == "best" and best is not None and best["step"] != final_step:
            export(out / "best", out / "model", vocabs, tok)
            export(Path(d), out / "model_last", vocabs, tok)
            progress(f"[pretrain] model/ = step {best['step']} (lowest val loss {best['val_loss']:.4g}); "
                     f"model_last/ = step {final_step}")
        else:
            export(Path(d), out / "model", vocabs, tok)
            shutil.rmtree(out / "model_last", ignore_errors=True)
    summary = {"out": str(out), "model": str(out / "model"), "train_seconds": round(train_s, 1),
               "final": result.metrics, "steps_per_epoch": steps_per_epoch, "train_rows": n_train,
               "max_steps": cfg.max_steps, "early_stopped": early,
               "exported": {"step": best["step"] if cfg.export == "best" and best else final_step,
                            "val_loss": best["val_loss"] if cfg.export == "best" and best else result.metrics.get("val_loss"),
                            "which": cfg.export if best else "last"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    progress(f"[pretrain] done in {train_s:.1f}s: final {json.dumps({k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)})}")
    progress(f"[pretrain] exported encoder -> {out / 'model'} (userfm.load_encoder)")
    return summary


def export(checkpoint: Path, dest: Path, vocabs, tok) -> Path:
    """Checkpoint folder -> self-contained model folder (config, safetensors, vocabs, tokenizer), plus the
    objective's head (``head.safetensors`` and ``objective.json``, the ``ObjectiveConfig`` that rebuilds it)
    when the checkpoint has one: the item scorer of ``future``/``next`` (:mod:`userfm.eval.item_scorer`)."""
    from safetensors.torch import load_file

    from userfm.models.encoders import EncoderConfig, UserEncoder, save_encoder
    from userfm.train.steps import _objective_config

    saved = json.loads((checkpoint / "config.json").read_text())
    enc_cfg = EncoderConfig.from_json(json.dumps(saved["encoder"]))
    model = UserEncoder(enc_cfg)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    if dest.exists():
        shutil.rmtree(dest)
    save_encoder(dest, model, vocabs, tok)
    head = checkpoint / "head.safetensors"
    if head.exists() and "_empty" not in load_file(str(head)):
        ocfg = _objective_config(PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["pretrain"].items()}))
        if "+" in ocfg.objective:  # a multi-task sum: the head of its first item-scoring objective (else its first)
            from safetensors.torch import save_file

            from userfm.infer.item_scorer import SCORING_OBJECTIVES

            parts = objective_parts(ocfg.objective)
            name = next((p for p in parts if p in SCORING_OBJECTIVES), parts[0])
            prefix = f"heads.{name}."
            state = {k[len(prefix):]: v for k, v in load_file(str(head)).items() if k.startswith(prefix)}
            ocfg = replace(ocfg, objective=name, weights=())
            if state:
                save_file(state, str(dest / "head.safetensors"))
                (dest / "objective.json").write_text(json.dumps(asdict(ocfg), indent=2))
        else:
            shutil.copyfile(head, dest / "head.safetensors")
            (dest / "objective.json").write_text(json.dumps(asdict(ocfg), indent=2))
    return dest


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest step under ``out/ray`` (None if there is none)."""
    best, best_step = None, -1
    for state in (out / "ray").glob("**/state.json"):
        step = json.loads(state.read_text())["step"]
        if step > best_step:
            best, best_step = state.parent, step
    return best
