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

import csv
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from userfm.errors import UserfmError
from userfm.models.features import CALENDAR_FIELDS

OBJECTIVES = ("mlm", "simclr", "clue", "future", "next", "masked-item")
PRECISIONS = ("fp32", "bf16")


class PretrainError(UserfmError):
    """Bad pretraining config or data."""


@dataclass(frozen=True)
class PretrainConfig:
    data: str = ""  # sequence dataset folder (from `userfm ingest`)
    out: str = "runs/pretrain"  # run folder: metrics, checkpoints, exported model
    objective: str = "clue"  # mlm (ShopperBERT) | simclr | clue | future (PinnerFormer dense all-action, userfm.objectives.future) |
    #                          next (SASRec-style next item, causal encoder, pooling "last": userfm.objectives.next_event) |
    #                          masked-item (BERT4Rec masked item prediction: userfm.objectives.masked_item)
    item_encoder: str = "text"  # category | text (BPE + item transformer) | minilm (frozen vectors)
    size: str = "tiny"  # named encoder size: tiny | small | base | large
    out_dim: int = 0  # user embedding size; 0 = the model width
    pooling: str = "mean"  # cls | mean | last (next needs last)
    dropout: float = 0.1  # dropout probability. 0 trained 1.20x faster on a 2-vCPU CPU box (train_throughput --ref-dropout 0)
    #                       and gave the same downstream metrics on the demo, but a worse validation loss (docs/pretraining.md)
    max_events: int = 64  # most recent events per user fed to the encoder
    max_text_tokens: int = 16  # BPE tokens per event text (text item encoder)
    text_vocab: int = 2048  # BPE vocabulary size to fit (text item encoder)
    minilm_cache: str = ""  # MiniLM vector cache folder (minilm); "" = <data>/minilm_cache
    batch_size: int = 32  # users per worker per step (the global contrastive batch = x num_workers)
    mini_batch_size: int = 0  # GradCache mini-batch per worker (simclr/clue); 0 = plain backward
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 20  # linear warm-up steps, then cosine decay to 10% of lr
    max_steps: int = 200  # optimizer steps in total (with epochs: at most)
    epochs: float = 0.0  # > 0: the budget in passes over the training users: max_steps = min(max_steps, round(epochs x
    #                      steps per epoch)), fixed once the data is read (written to config.json); with eval_every 0,
    #                      validation (and a checkpoint) once per epoch
    early_stop: int = 0  # > 0: stop after this many validation evaluations in a row without a lower val loss
    export: str = "best"  # model/ = the "best" weights by validation loss (model_last/ = the last step's), or the "last"
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    temperature: float = 0.1  # contrastive softmax temperature (initial value if learnable)
    learnable_temperature: bool = False  # learn the temperature (CLIP-style)
    proj_dim: int = 0  # simclr/clue: SimCLR projection MLP (embed_dim -> embed_dim -> proj_dim) under the loss; embeddings are taken before it; 0 = none
    mask_rate: float = 0.15  # mlm / masked-item: fraction of events masked
    future_window: int = 16  # future: events after each step's random cut that the user embedding predicts
    single_service: str = "time_split"  # clue: users of one service: time_split | skip
    clue_crop: float = 1.0  # clue: each step, each view keeps a random time window of U[clue_crop, 1] x its span; 1 = whole views (fixed pairs)
    services: tuple[str, ...] = ()  # pretrain on these services' events only (cross-service transfer); () = all
    precision: str = "fp32"  # fp32 | bf16 (autocast; GPU, or CPU with bf16 support)
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 0.5  # Ray CPU reservation per worker (fractional: leaves room for Ray Data)
    threads_per_worker: int = 1  # torch intra-op threads per worker (Ray sets 1 by default)
    log_every: int = 10  # steps between metric rows
    eval_every: int = 50  # steps between validation-loss evaluations; 0 = only at the end
    eval_batches: int = 4  # validation batches per evaluation (per worker)
    checkpoint_every: int = 50  # steps between checkpoints (the last step always checkpoints)
    keep_checkpoints: int = 2  # checkpoints kept on storage
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    peak_flops: float = 0.0  # per-worker peak FLOP/s for MFU; 0 = measure fp32 matmul at start
    seed: int = 0  # seeds model init, data order, masking, augmentation, dropout
    bucket_batches: int = 1  # sort each run of this many batches by history length, so a step pads little (1 = off).
    #                          Off by default: contrastive batches of equally short histories are near-identical
    #                          negatives; a tiny CLUE/text sweep trial stayed at loss log(batch) with it on (the demo's
    #                          minilm CLUE learned with 8). Always on-safe for mlm.
    item_id_buckets: int = 0  # > 0: the encoder adds a learned embedding per hashed item identity (EncoderConfig.item_id_buckets)
    cooc_dim: int = 32  # > 0: fit item co-occurrence vectors of this size on the training users (userfm.models.cooc) and add
    #                     them to each event's input, so items whose titles share their words can be told apart by
    #                     who takes them (demo data: CLUE age_bracket 0.350 -> 0.478, docs/pretraining.md, "Item co-occurrence vectors"); 0 = off
    cooc_min_users: int = 2  # items taken by fewer training users get no co-occurrence vector
    time_fields: tuple[str, ...] = CALENDAR_FIELDS  # calendar fields each event embeds
    #                     (FeatureConfig.time_fields; "recency" also valid). Absolute date fields let a time-split CLUE pair
    #                     be matched by the date the two halves share: drop them for single-service data rated in sessions
    compile: bool = False  # torch.compile the encoder (dynamic shapes); pays on GPU for long runs, measure first
    stop_at_step: int = 0  # end this invocation after this step, checkpointed (continue with --resume); 0 = run to max_steps
    holdout_last: int = 0  # pretrain on each user's history without its last n events (every split): the encoder never
    #                        sees the events a leave-one-out evaluation holds out (next item / genre), also for users
    #                        a cross-fitted evaluation (`evaluate --set folds=k`) scores; 0 = whole histories
    train_users: int = 0  # use only the first N training users by user-id hash (0 = all): the data-length axis of scaling sweeps
    fail_at_step: int = 0  # testing: the last rank raises after this step, once (0 = never)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "max_steps", "num_workers", "max_events", "log_every", "checkpoint_every", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cooc_dim < 0 or self.cooc_min_users < 1:
            raise ValueError(f"cooc_dim must be >= 0 and cooc_min_users >= 1, got {self.cooc_dim}, {self.cooc_min_users}")
        if self.holdout_last < 0:
            raise ValueError(f"holdout_last must be >= 0, got {self.holdout_last}")
        if self.epochs < 0 or self.early_stop < 0:
            raise ValueError(f"epochs and early_stop must be >= 0, got {self.epochs}, {self.early_stop}")
        if self.export not in ("best", "last"):
            raise ValueError(f"export must be 'best' or 'last', got {self.export!r}")
        from userfm.models.features import FeatureConfig

        FeatureConfig(time_fields=tuple(self.time_fields))  # the features' own check: known and distinct names
        if self.objective in ("future", "next", "masked-item") and self.mini_batch_size:
            raise ValueError(f"mini_batch_size (GradCache) applies to simclr/clue, not {self.objective}")
        if (self.objective == "next") != (self.pooling == "last"):
            raise ValueError(f"objective next reads the state after the last event: it needs pooling 'last' (and only it "
                             f"does); got objective {self.objective!r} with pooling {self.pooling!r}")
        if self.future_window < 1:
            raise ValueError(f"future_window must be >= 1, got {self.future_window}")
        if self.mini_batch_size < 0 or self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size must be in [0, batch_size], got {self.mini_batch_size}")


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
              services: tuple[str, ...] = (), holdout_last: int = 0) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: sequence rows -> fixed-shape feature rows.

    mlm / simclr: one row per user with events (masking and augmentation are drawn per step in the
    loop, so every epoch sees new ones). clue: one row per user pair (a.* / b.*: two services, or an
    earlier/later split of a one-service history), built here, not in the loop. ``holdout_last``: each
    user's last n events are dropped first (the leave-one-out evaluation's labels).
    """
    from userfm.models.features import make_batch, pad_events
    from userfm.objectives.pretext import _with_vectors, clue_batch
    from userfm.data.sequences import restrict_services, service_rows

    import pyarrow.compute as pc

    vocabs, tok, vectors = _resources(vocabs_json, tokenizer_json, vectors_dir)
    batch = batch.filter(pc.equal(batch.column("split"), split))
    if holdout_last:
        from userfm.data.sequences import drop_last_events

        batch = drop_last_events(batch, holdout_last)
    if services:
        batch = restrict_services(batch, services)
    if objective == "clue":
        uid = batch.column("user_id").to_pylist()
        # a per-batch seed from its content: the same pairs whatever block boundaries Ray Data chose
        s = seed + sum(hash_user(u) for u in uid) % 1_000_003
        out = clue_batch(service_rows(batch), vocabs, tok, single_service=single_service, seed=s, vectors=vectors)
    else:
        out = _with_vectors(make_batch(batch, vocabs, tok), vectors)
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
    """Per-step randomness on a featurized batch: mlm masks, simclr's two augmented views, future's cut."""
    from userfm.objectives.pretext import crop_views, mask_events, simclr_views

    if cfg.objective in ("mlm", "masked-item"):
        return mask_events(nb, cfg.mask_rate, rng)
    if cfg.objective == "simclr":
        return simclr_views(nb, _objective_config(cfg), rng)
    if cfg.objective == "future":
        from userfm.objectives.future import future_views

        return future_views(nb, cfg.future_window, rng)
    if cfg.objective == "next":  # no per-step randomness; nothing masked (keeps [MASK] in DDP's graph)
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


def save_best(path: Path, model, step: int, val_loss: float, cfg: PretrainConfig, enc_json: str) -> None:
    """The encoder weights of the lowest validation loss so far (what :func:`export` reads), replacing the last."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = getattr(model, "module", model)
    save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp / "model.safetensors"))
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
    from userfm.objectives.pretext import build_head, loss_and_backward

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
    views = 1 if cfg.objective in ("mlm", "next", "masked-item") else 2
    flops_sample = flops_per_sample(enc_cfg, n_events=max(1, round(events_per_sample)), n_tokens=cfg.max_text_tokens) * views
    if cfg.mini_batch_size:
        flops_sample *= 4 / 3  # GradCache: one extra forward
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    # cumulative compute: exact from the checkpoint when it recorded it, else the average-length estimate
    cum_flops = saved_flops if saved_flops is not None else step * flops_sample * cfg.batch_size * world
    window = {"t0": time.perf_counter(), "samples": 0, "events": 0, "flops": 0.0, "loss": [], "metrics": {}}

    def run_eval() -> float | None:
        model.eval()
        total, count = torch.zeros(2, dtype=torch.float64), 0
        rng = np.random.default_rng(step_seed(cfg.seed, -1, rank))  # the same masks every evaluation
        torch.manual_seed(step_seed(cfg.seed, -1, rank))
        # the last batch may be partial: a small val split (MovieLens: 73 users over 2 ranks) would otherwise
        # fill no batch and leave no validation loss; Ray Train's shards are equal, so ranks see equal batch counts
        for i, nb in enumerate(val_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False)):
            if i >= cfg.eval_batches:
                break
            batch = _to_device(trim_events(step_inputs(nb, cfg, rng)), device)
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
            batch = _to_device(nb_step, device)
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
                        save_best(out / "best", model, step, val, cfg, config["encoder"])
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


def _datasets(cfg: PretrainConfig, vocabs, tok, vectors_dir: str | None):
    import pyarrow as pa
    import ray

    from userfm.data.dataset import load_manifest

    manifest = load_manifest(cfg.data)
    folder = Path(cfg.data) / manifest["files"]["sequences"]
    kwargs = dict(
        objective=cfg.objective, vocabs_json=vocabs.to_json(), tokenizer_json=tok.to_json() if tok else None,
        vectors_dir=vectors_dir, max_events=cfg.max_events, single_service=cfg.single_service, seed=cfg.seed,
        services=tuple(cfg.services), holdout_last=cfg.holdout_last,
    )
    out = {}
    for split in ("train", "val"):
        ds = ray.data.read_parquet(str(folder))
        if split == "train" and cfg.train_users:  # the data-length axis: a nested subset of the training users
            ids = pa.array(first_users(_read_rows(cfg.data, "train"), cfg.train_users).column("user_id").to_pylist())
            ds = ds.map_batches(_only_users, batch_format="pyarrow", fn_kwargs={"ids": ids})
        # materialized: row counts are known (equal steps per rank) and no Data task competes with
        # the training workers for CPUs (the 2-CPU Data + Train deadlock in ray-notes.md)
        out[split] = ds.map_batches(featurize, batch_format="pyarrow", batch_size=512, fn_kwargs={**kwargs, "split": split}).materialize()
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

    from userfm.models.encoders import config_for, save_encoder
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
                      cooc_dim=saved.get("cooc_dim", 0), cooc_min_users=saved.get("cooc_min_users", 2))
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
        vocabs, tok = _fit_resources(cfg, train_rows)
        vocabs.save(out / "vocabs.json")
        if tok is not None:
            tok.save(out / "tokenizer.json")
    vectors_dir = None
    extra: dict[str, Any] = {}
    if cfg.item_encoder == "minilm":
        vectors_dir = cfg.minilm_cache or str(Path(cfg.data) / "minilm_cache")
        from userfm.models.minilm import build_minilm_cache

        build_minilm_cache(cfg.data, vectors_dir, progress)
        extra["text_vector_dim"] = 384
    cooc = None
    if cfg.cooc_dim:
        from userfm.models.cooc import CoocConfig, fit_item_vectors

        t_c = time.perf_counter()
        cooc = fit_item_vectors(train_rows, CoocConfig(dim=cfg.cooc_dim, min_users=cfg.cooc_min_users,
                                                       max_events=cfg.max_events, seed=cfg.seed))
        if len(cooc[0]):
            extra.update(cooc_items=len(cooc[0]), cooc_dim=cooc[1].shape[1])
        progress(f"[pretrain] item co-occurrence vectors: {len(cooc[0]):,} items x {cooc[1].shape[1]} "
                 f"(taken by >= {cfg.cooc_min_users} training users; {time.perf_counter() - t_c:.1f}s)")
    enc_cfg = config_for(cfg.size, vocabs, tok, item_encoder=cfg.item_encoder, out_dim=cfg.out_dim,
                         pooling=cfg.pooling, dropout=cfg.dropout, max_events=cfg.max_events,
                         item_id_buckets=cfg.item_id_buckets, causal=cfg.objective == "next", **extra)
    progress(f"[pretrain] vocabularies and tokenizer fitted on {train_rows.num_rows:,} users ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    datasets = _datasets(cfg, vocabs, tok, vectors_dir)
    n_train = datasets["train"].count()
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
    key = "length" if cfg.objective != "clue" else "a.length"
    events_per_sample = float(np.mean([r[key] for r in lengths[0]]))
    progress(f"[pretrain] {n_train:,} training rows ({steps_per_epoch} steps/epoch), "
             f"{datasets['val'].count():,} validation rows ({time.perf_counter() - t1:.1f}s)")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": asdict(cfg), "encoder": enc_cfg.to_json(), "steps_per_epoch": steps_per_epoch,
            "events_per_sample": events_per_sample, "resume_from": str(resume_from) if resume_from else None,
            "cooc": cooc,
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
    """Checkpoint folder -> self-contained model folder (config, safetensors, vocabs, tokenizer)."""
    from safetensors.torch import load_file

    from userfm.models.encoders import EncoderConfig, UserEncoder, save_encoder

    enc_cfg = EncoderConfig.from_json(json.dumps(json.loads((checkpoint / "config.json").read_text())["encoder"]))
    model = UserEncoder(enc_cfg)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    if dest.exists():
        shutil.rmtree(dest)
    return save_encoder(dest, model, vocabs, tok)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest step under ``out/ray`` (None if there is none)."""
    best, best_step = None, -1
    for state in (out / "ray").glob("**/state.json"):
        step = json.loads(state.read_text())["step"]
        if step > best_step:
            best, best_step = state.parent, step
    return best
