"""What one pretraining step is made of, shared by the Ray Train worker and the driver: Ray Data featurization,
seeds, the learning-rate schedule, step inputs, the validation loss, FLOP counts, checkpoints and the early-stop
state."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from userfm.objectives import objective_parts, reads_windows
from userfm.train.pretrain_config import PretrainConfig


# -------------------------------------------------------------------------------------- helpers


def _objective_config(cfg: PretrainConfig):
    from userfm.objectives.pretext import ObjectiveConfig

    return ObjectiveConfig(
        objective=cfg.objective,
        mask_rate=cfg.mask_rate,
        temperature=cfg.temperature,
        learnable_temperature=cfg.learnable_temperature,
        single_service=cfg.single_service,
        mini_batch_size=cfg.mini_batch_size,
        proj_dim=cfg.proj_dim,
        clue_crop=cfg.clue_crop,
        future_window=cfg.future_window,
        weights=tuple(cfg.objective_weights),
    )


_CACHE: dict[str, Any] = {}


def _resources(vocabs_json: str, tokenizer_json: str | None, vectors_dir: str | None):
    """Vocabs / tokenizer / MiniLM vectors, built once per worker process."""
    key = f"{hash(vocabs_json)}-{hash(tokenizer_json)}-{vectors_dir}"
    if key not in _CACHE:
        from userfm.models.features import Vocabs
        from userfm.models.tokenizer import TextTokenizer

        vocabs = Vocabs.from_json(vocabs_json)
        tok = TextTokenizer.from_json(tokenizer_json) if tokenizer_json else None
        vectors = None
        if vectors_dir:
            from userfm.models.minilm import VectorCache

            vectors = VectorCache.load(vectors_dir)
        _CACHE.clear()
        _CACHE[key] = (vocabs, tok, vectors)
    return _CACHE[key]


def featurize(batch, *, split: str, objective: str, vocabs_json: str, tokenizer_json: str | None,
              vectors_dir: str | None, max_events: int, single_service: str, seed: int,
              services: tuple[str, ...] = (), holdout_last: int = 0, windows: bool = False) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: sequence rows -> fixed-shape feature rows.

    mlm / simclr: one row per user with events (masking and augmentation are drawn per step in the
    loop, so every epoch sees new ones). clue: one row per user pair (a.* / b.*: two services, or an
    earlier/later split of a one-service history), built here, not in the loop. ``holdout_last``: each
    user's last n events are dropped first (the leave-one-out evaluation's labels). ``windows`` (event objectives
    alone, :func:`userfm.objectives.reads_windows`): one row per ``max_events`` window of each history, not only its last.
    """
    from userfm.models.features import make_batch, pad_events
    from userfm.objectives.pretext import add_vectors, clue_batch
    from userfm.data.sequences import restrict_services, service_rows

    import pyarrow.compute as pc

    vocabs, tok, vectors = _resources(vocabs_json, tokenizer_json, vectors_dir)
    batch = batch.filter(pc.equal(batch.column("split"), split))
    if holdout_last:
        from userfm.data.sequences import drop_last_events

        batch = drop_last_events(batch, holdout_last)
    if services:
        batch = restrict_services(batch, services)
    if windows and reads_windows(objective):
        from userfm.data.sequences import history_windows

        batch = history_windows(batch, max_events)
    if "clue" in objective_parts(objective):  # a sum with clue: its pairs (the other objectives read their views)
        uid = batch.column("user_id").to_pylist()
        # a per-batch seed from its content: the same pairs whatever block boundaries Ray Data chose
        s = seed + sum(hash_user(u) for u in uid) % 1_000_003
        out = clue_batch(service_rows(batch), vocabs, tok, single_service=single_service, seed=s, vectors=vectors)
    else:
        out = add_vectors(make_batch(batch, vocabs, tok), vectors)
        keep = out["length"] > 0
        out = {k: v[keep] for k, v in out.items()}
    return pad_events(out, max_events)  # fixed shapes: Ray Data stores them as tensor columns


def hash_user(user_id: str) -> int:
    from userfm.data.sequences import split_fraction

    return int(split_fraction(user_id) * 2**31)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of everything random in step ``step`` on ``rank`` (independent of where a run resumed)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine to 0.1 x ``lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def step_inputs(nb: dict[str, np.ndarray], cfg: PretrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-step randomness on a featurized batch: mlm masks, simclr's two augmented views, future's cut.

    A multi-task sum (``clue+future``): each objective's inputs under ``<name>/`` (``future/a.length``), drawn in
    the sum's order from one ``rng``; with clue in the sum the rows are its pairs, and the others read the
    pairs' views stacked as histories (:func:`userfm.objectives.multitask.stack_views`)."""
    if "+" not in cfg.objective:
        return _one_objective_inputs(nb, cfg.objective, cfg, rng)
    from userfm.objectives.multitask import stack_views

    parts = objective_parts(cfg.objective)
    histories = stack_views(nb) if "clue" in parts else nb
    out = {}
    for name in parts:
        one = _one_objective_inputs(nb if name == "clue" else histories, name, cfg, rng)
        out.update({f"{name}/{k}": v for k, v in one.items()})
    return out


def _one_objective_inputs(nb: dict[str, np.ndarray], objective: str, cfg: PretrainConfig,
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
    from userfm.objectives.pretext import crop_views, mask_events, simclr_views

    if objective in ("mlm", "masked-item"):
        return mask_events(nb, cfg.mask_rate, rng)
    if objective == "simclr":
        return simclr_views(nb, replace(_objective_config(cfg), objective="simclr", weights=()), rng)
    if objective == "future":
        from userfm.objectives.future import future_views

        return future_views(nb, cfg.future_window, rng)
    if objective == "next":  # no per-step randomness; nothing masked (keeps [MASK] in DDP's graph)
        return {**nb, "masked": np.zeros(nb["service"].shape, bool)}
    return crop_views(nb, cfg.clue_crop, rng)


def eval_loss(model, head, batch, cfg: PretrainConfig):
    """Pretext loss without gradients (the validation loss of the scaling study)."""
    import torch

    from userfm.objectives.pretext import pretext_loss

    with torch.no_grad():
        return pretext_loss(model, head, batch, _objective_config(cfg))[0]


def measure_peak_flops(threads: int, seconds: float = 1.0, n: int = 1024, dtype=None, device: str = "cpu") -> float:
    """n^3 matmul FLOP/s at ``threads`` torch threads (the MFU denominator; fp32 on the CPU unless
    ``dtype`` / ``device`` say otherwise, e.g. bf16 on a CPU with AMX, or a CUDA device)."""
    import torch

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, dtype=dtype or torch.float32, device=device) for _ in range(2))
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    torch.set_num_threads(old)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, head, opt, step: int, cfg: PretrainConfig, enc_json: str, flops: float = 0.0,
                    best: dict | None = None) -> None:
    """Unwrapped weights as safetensors, optimizer via torch.save (read back with weights_only)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    m = getattr(model, "module", model)
    save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(path / "model.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()} or {"_empty": torch.zeros(1)},
              str(path / "head.safetensors"))
    torch.save(opt.state_dict(), path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "flops": flops, "best": best}))
    (path / "config.json").write_text(json.dumps({"pretrain": asdict(cfg), "encoder": json.loads(enc_json)}))


def load_checkpoint(path: Path, model, head, opt) -> int:
    import torch
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    head_state = load_file(str(path / "head.safetensors"))
    head_state.pop("_empty", None)
    head.load_state_dict(head_state)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


def save_best(path: Path, model, step: int, val_loss: float, cfg: PretrainConfig, enc_json: str, head=None) -> None:
    """The encoder (and objective head) weights of the lowest validation loss so far (what :func:`export`
    reads), replacing the last."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = getattr(model, "module", model)
    save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp / "model.safetensors"))
    if head is not None and head.state_dict():
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    (tmp / "config.json").write_text(json.dumps({"pretrain": asdict(cfg), "encoder": json.loads(enc_json)}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def early_stop_state(best: dict | None, step: int, val: float, patience: int) -> tuple[dict, bool, bool]:
    """One validation loss -> (the new best-so-far record {step, val_loss, bad}, whether this one is the new
    best, whether to stop: ``patience`` > 0 evaluations in a row without a lower loss). Pure, for the loop."""
    if best is None or val < best["val_loss"]:
        return {"step": step, "val_loss": val, "bad": 0}, True, False
    new = {**best, "bad": best["bad"] + 1}
    return new, False, bool(patience) and new["bad"] >= patience


def checkpoint_state(path: Path) -> tuple[float | None, dict | None]:
    """(cumulative training FLOPs, the early-stop best-so-far record) a checkpoint recorded; None for either
    when the checkpoint predates it."""
    state = json.loads((path / "state.json").read_text())
    return state.get("flops"), state.get("best")


def batch_flops(batch: dict[str, np.ndarray], enc_cfg, n_tokens: int, mini_batch: bool) -> float:
    """Training FLOPs of one step's batch, from each view's real history lengths (padding excluded)."""
    from userfm.models.encoders import flops_per_sample
    from userfm.models.features import _view_prefixes

    total = 0.0
    for p in _view_prefixes(batch):
        lengths, counts = np.unique(batch[p + "length"], return_counts=True)
        total += sum(int(c) * flops_per_sample(enc_cfg, n_events=max(1, int(n)), n_tokens=n_tokens)
                     for n, c in zip(lengths, counts))
    return total * (4 / 3 if mini_batch else 1.0)  # GradCache: one extra forward


