"""The Ray Train worker loop of ``userfm pretrain`` (``train_loop``): one DDP rank's steps, validation,
checkpoints and metrics."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from userfm.objectives import objective_parts
from userfm.train.pretrain_config import PretrainConfig
from userfm.train.steps import _objective_config, batch_flops, checkpoint_state, early_stop_state, eval_loss, load_checkpoint, lr_at, measure_peak_flops, save_best, save_checkpoint, step_inputs, step_seed


# ------------------------------------------------------------------------------ per-worker loop


class _MetricsLog:
    """Rank 0's metric rows: JSONL (the record), CSV (same rows, one column per key) and TensorBoard."""

    def __init__(self, out: Path):
        from tensorboardX import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path, self.csv_path = out / "metrics.jsonl", out / "metrics.csv"
        self.jsonl = open(self.jsonl_path, "a")
        self.tb = SummaryWriter(str(out / "tb"))

    def write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        header = None
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                header = next(csv.reader(f), None)
        if header is not None and set(row) <= set(header):
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(row)
        else:  # a key the CSV has no column for yet (e.g. the first val_loss): rewrite it from the JSONL
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines()]
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
            with open(self.csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, row["step"])
        self.tb.flush()

    def close(self):
        self.jsonl.close()
        self.tb.close()


def _to_device(nb: dict[str, np.ndarray], device) -> dict:
    """numpy batch -> tensors on ``device``; on CUDA through pinned memory with non-blocking copies."""
    import torch

    if device.type != "cuda":
        return {k: torch.as_tensor(v) for k, v in nb.items()}
    return {k: torch.as_tensor(v).pin_memory().to(device, non_blocking=True) for k, v in nb.items()}


def make_optimizer(params, cfg: PretrainConfig):
    """AdamW, fused (one kernel over every parameter, CPU and CUDA) where this torch has it: on the
    ``small`` encoder a step costs 0.77 ms fused vs 2.6 ms for the per-tensor loop (1 thread)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train_loop(config: dict) -> None:
    """Ray Train per-worker function (every rank runs it)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from userfm.models.encoders import EncoderConfig, UserEncoder, flops_per_sample
    from userfm.models.features import bucket_by_length, trim_events
    from userfm.objectives.pretext import add_vectors, build_head, loss_and_backward

    cfg = PretrainConfig(**config["cfg"])
    enc_cfg = EncoderConfig.from_json(config["encoder"])
    ocfg = _objective_config(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")

    model = UserEncoder(enc_cfg)
    if enc_cfg.cooc_items:
        model.set_cooc(*config["cooc"])
    head = build_head(ocfg, enc_cfg)
    params = list(model.parameters()) + list(head.parameters())
    opt = make_optimizer(params, cfg)

    step = 0
    restored = ray.train.get_checkpoint()  # set when Ray restarts the workers after a failure
    resume_from = config.get("resume_from")
    saved_flops, best = None, None
    if restored is not None:
        with restored.as_directory() as d:
            step = load_checkpoint(Path(d), model, head, opt)
            saved_flops, best = checkpoint_state(Path(d))
    elif resume_from:
        step = load_checkpoint(Path(resume_from), model, head, opt)
        saved_flops, best = checkpoint_state(Path(resume_from))
    head.to(device)
    # gradient_as_bucket_view: DDP's all-reduce buckets are the .grad tensors themselves (no copy in and
    # out of the buckets each step, and one gradient-sized buffer less). broadcast_buffers off: the only
    # buffers are the co-occurrence table, set identically on every rank and never changed (else ~1 MB a step)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy="ddp" if world > 1 else None,
        parallel_strategy_kwargs={"gradient_as_bucket_view": True, "broadcast_buffers": False} if world > 1 else None)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    no_sync = getattr(model, "no_sync", None)
    for g in opt.param_groups:  # optimizer state tensors follow the parameters' device
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    opt.state[p][k] = v.to(device)

    out = Path(cfg.out)
    log = _MetricsLog(out) if rank == 0 else None
    peak = cfg.peak_flops or measure_peak_flops(cfg.threads_per_worker)
    steps_per_epoch = config["steps_per_epoch"]
    events_per_sample = config["events_per_sample"]
    views = sum(1 if o in ("mlm", "next", "masked-item") else 2 for o in objective_parts(cfg.objective))  # encoder passes a row
    flops_sample = flops_per_sample(enc_cfg, n_events=max(1, round(events_per_sample)), n_tokens=cfg.max_text_tokens) * views
    if cfg.mini_batch_size:
        flops_sample *= 4 / 3  # GradCache: one extra forward
    vectors = None
    if config.get("vectors_dir"):  # the rows hold text hashes; each step looks its MiniLM vectors up
        from userfm.models.minilm import VectorCache

        vectors = VectorCache.load(config["vectors_dir"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    # cumulative compute: exact from the checkpoint when it recorded it, else the average-length estimate
    cum_flops = saved_flops if saved_flops is not None else step * flops_sample * cfg.batch_size * world
    window = {"t0": time.perf_counter(), "samples": 0, "events": 0, "flops": 0.0, "loss": [], "metrics": {}}

    val_batches: list[dict] | None = None

    def run_eval() -> float | None:
        nonlocal val_batches
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        rng = np.random.default_rng(step_seed(cfg.seed, -1, rank))  # the same masks every evaluation
        torch.manual_seed(step_seed(cfg.seed, -1, rank))
        if val_batches is None:
            # Read once and kept (eval_batches x batch_size rows): every evaluation scores the same users, and
            # the later ones skip a Ray Data run of the whole val split (~2 s each on a 2-core box).
            # The last batch may be partial: a small val split (MovieLens: 73 users over 2 ranks) would otherwise
            # fill no batch and leave no validation loss; Ray Train's shards are equal, so ranks see equal batch counts
            val_batches = list(itertools.islice(
                val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False),
                cfg.eval_batches))
        for nb in val_batches:
            batch = _to_device(add_vectors(trim_events(step_inputs(nb, cfg, rng)), vectors), device)
            with autocast:
                total[0] += float(eval_loss(model, head, batch, cfg))
            total[1] += 1
        if world > 1:
            dist.all_reduce(total)
        model.train()
        return float(total[0] / total[1]) if total[1] else None

    model.train()
    stop = False
    epoch_start = step // steps_per_epoch
    for epoch in range(epoch_start, 10**9):
        if step >= cfg.max_steps:
            break
        skip = step - epoch * steps_per_epoch
        it = bucket_by_length(train_shard.iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch,
        ), cfg.bucket_batches, seed=step_seed(cfg.seed, epoch, 0))  # same bucket order on every rank: a DDP
        #                                                            step waits for its slowest rank
        for i, nb in enumerate(it):
            if i >= steps_per_epoch or step >= cfg.max_steps:
                break
            if i < skip:
                continue
            seed = step_seed(cfg.seed, step, rank)
            torch.manual_seed(seed)
            nb_step = trim_events(step_inputs(nb, cfg, np.random.default_rng(seed)))
            batch = _to_device(add_vectors(nb_step, vectors), device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss, metrics = loss_and_backward(model, head, batch, ocfg, no_sync=no_sync, time_fields=cfg.time_fields)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            window["samples"] += len(nb["length"]) if "length" in nb else len(nb["a.length"])
            window["events"] += int(sum(np.sum(v) for k, v in nb.items() if k.endswith("length")))
            window["flops"] += batch_flops(nb_step, enc_cfg, cfg.max_text_tokens, bool(cfg.mini_batch_size))
            window["loss"].append(float(loss))
            for k, v in metrics.items():
                window["metrics"].setdefault(k, []).append(v)
            if cfg.fail_at_step and step == cfg.fail_at_step and rank == world - 1 and restored is None:
                raise RuntimeError(f"injected failure at step {step} (fail_at_step)")

            last = step >= cfg.max_steps or step == cfg.stop_at_step
            do_log = step % cfg.log_every == 0 or last
            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or last
            do_ckpt = step % cfg.checkpoint_every == 0 or last
            if not (do_log or do_eval or do_ckpt):
                continue
            stop = False
            row: dict[str, Any] = {"step": step, "epoch": epoch}
            if window["loss"]:
                dt = time.perf_counter() - window["t0"]
                samples = window["samples"] * world  # every rank runs the same number of batches
                flops = torch.tensor([window["flops"]], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(flops)  # ranks' batches differ in length: sum their real FLOPs
                flops = float(flops[0])
                cum_flops += flops
                row.update({
                    "loss": float(np.mean(window["loss"])),
                    "lr": lr_at(step - 1, cfg),
                    "samples_per_s": samples / dt,
                    "events_per_s": window["events"] * world / dt,
                    "flops": cum_flops,
                    "pf_days": cum_flops / (1e15 * 86400),
                    "mfu": flops / dt / (peak * world),
                    **{k: float(np.mean(v)) for k, v in window["metrics"].items() if k != "loss"},
                })
            if do_eval:
                val = run_eval()
                if val is not None:
                    row["val_loss"] = val
                    # every rank gets the same all-reduced loss, so every rank takes the same decision
                    best, improved, stop = early_stop_state(best, step, val, cfg.early_stop)
                    if improved and rank == 0:
                        save_best(out / "best", model, step, val, cfg, config["encoder"], head)
                    row["best_step"] = best["step"]
                    if stop:
                        row["early_stop"] = 1
                        do_ckpt = True
            ckpt = None
            if do_ckpt:
                tmp = Path(tempfile.mkdtemp(prefix="userfm-ckpt-"))
                if rank == 0:
                    save_checkpoint(tmp, model, head, opt, step, cfg, config["encoder"], flops=cum_flops, best=best)
                    ckpt = ray.train.Checkpoint.from_directory(str(tmp))
            if log is not None:
                log.write(row)
                shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k in ("loss", "val_loss", "samples_per_s", "mfu"))
                print(f"[pretrain] step {step}/{cfg.max_steps} (epoch {step / steps_per_epoch:.1f}) {shown}"
                      + (f" (best val at step {best['step']})" if do_eval and best else "")
                      + (f"; stopping early: {cfg.early_stop} evaluations without a lower val loss" if stop else ""), flush=True)
            ray.train.report(row, checkpoint=ckpt)
            if do_ckpt:
                shutil.rmtree(tmp, ignore_errors=True)
            window = {"t0": time.perf_counter(), "samples": 0, "events": 0, "flops": 0.0, "loss": [], "metrics": {}}
            if step == cfg.stop_at_step or stop:
                break
        if step == cfg.stop_at_step or stop:
            break
    if log is not None:
        log.close()


