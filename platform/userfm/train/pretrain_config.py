"""``userfm pretrain``'s config (``PretrainConfig``, every field with its unit) and the names it accepts."""

from __future__ import annotations

from dataclasses import dataclass


from userfm.errors import UserfmError
from userfm.models.features import CALENDAR_FIELDS
from userfm.objectives import check_objective, objective_parts
PRECISIONS = ("fp32", "bf16")


class PretrainError(UserfmError):
    """Bad pretraining config or data."""


@dataclass(frozen=True)
class PretrainConfig:
    data: str = ""  # sequence dataset folder (from `userfm ingest`)
    out: str = "runs/pretrain"  # run folder: metrics, checkpoints, exported model
    objective: str | tuple[str, ...] = "clue"  # mlm (ShopperBERT) | simclr | clue | future (PinnerFormer dense all-action, userfm.objectives.future) |
    #                          next (SASRec-style next item, causal encoder, pooling "last": userfm.objectives.next_event) |
    #                          masked-item (BERT4Rec masked item prediction: userfm.objectives.masked_item) |
    #                          a weighted multi-task sum of them: [clue, future] or clue+future (userfm.objectives.multitask;
    #                          stored as "clue+future")
    objective_weights: tuple[float, ...] = ()  # a multi-task sum: each objective's loss weight, in order; () = 1 each
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
    item_key: str = "item_id"  # what one item is, for item_id_buckets, the co-occurrence vectors and the future/next/
    #                     masked-item targets: item_id (the event's item id, else its text) | text (the text: before
    #                     2026-12-06; MovieLens texts carry the rating, so one film was up to 10 items, each the others' negative)
    time_fields: tuple[str, ...] = CALENDAR_FIELDS  # calendar fields each event embeds
    #                     (FeatureConfig.time_fields; "recency" also valid). Absolute date fields let a time-split CLUE pair
    #                     be matched by the date the two halves share: drop them for single-service data rated in sessions
    compile: bool = False  # torch.compile the encoder (dynamic shapes); pays on GPU for long runs, measure first
    stop_at_step: int = 0  # end this invocation after this step, checkpointed (continue with --resume); 0 = run to max_steps
    holdout_last: int = 0  # pretrain on each user's history without its last n events (every split): the encoder never
    #                        sees the events a leave-one-out evaluation holds out (next item / genre), also for users
    #                        a cross-fitted evaluation (`evaluate --set folds=k`) scores; 0 = whole histories
    windows: bool = True  # event objectives (mlm, future, next, masked-item and their sums) train on every max_events
    #                        window of each history (userfm.data.sequences.history_windows), not only its last one (MovieLens
    #                        latest-small: the last 64 events are 34 % of them); no effect with clue or simclr (they contrast
    #                        users). Default since 2026-12-08, chosen on validation (docs/benchmarks.md, "Every window")
    cooc_windows: bool = False  # with windows and an event objective, the co-occurrence vectors count every event of each
    #                        training history (what the encoder then trains on), not its last max_events. Off: on MovieLens
    #                        leave-one-out it lowered the val-chosen validation HR@10 0.064 -> 0.055 (docs/benchmarks.md)
    train_users: int = 0  # use only the first N training users by user-id hash (0 = all): the data-length axis of scaling sweeps
    fail_at_step: int = 0  # testing: the last rank raises after this step, once (0 = never)

    def __post_init__(self):
        names = self.objective if isinstance(self.objective, (tuple, list)) else str(self.objective).replace(",", "+").split("+")
        object.__setattr__(self, "objective", "+".join(str(n).strip() for n in names))  # one spelling: "clue+future"
        object.__setattr__(self, "objective_weights", tuple(float(w) for w in self.objective_weights))
        check_objective(self.objective, self.objective_weights)
        parts = objective_parts(self.objective)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "max_steps", "num_workers", "max_events", "log_every", "checkpoint_every", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cooc_dim < 0 or self.cooc_min_users < 1:
            raise ValueError(f"cooc_dim must be >= 0 and cooc_min_users >= 1, got {self.cooc_dim}, {self.cooc_min_users}")
        if self.item_key not in ("item_id", "text"):
            raise ValueError(f"item_key must be 'item_id' or 'text', got {self.item_key!r}")
        if self.holdout_last < 0:
            raise ValueError(f"holdout_last must be >= 0, got {self.holdout_last}")
        if self.epochs < 0 or self.early_stop < 0:
            raise ValueError(f"epochs and early_stop must be >= 0, got {self.epochs}, {self.early_stop}")
        if self.export not in ("best", "last"):
            raise ValueError(f"export must be 'best' or 'last', got {self.export!r}")
        from userfm.models.features import FeatureConfig

        FeatureConfig(time_fields=tuple(self.time_fields))  # the features' own check: known and distinct names
        if self.mini_batch_size and self.objective not in ("simclr", "clue"):
            raise ValueError(f"mini_batch_size (GradCache) applies to simclr/clue alone, not {self.objective}")
        if ("next" in parts) != (self.pooling == "last"):
            raise ValueError(f"objective next reads the state after the last event: it needs pooling 'last' (and only it "
                             f"does); got objective {self.objective!r} with pooling {self.pooling!r}")
        if self.future_window < 1:
            raise ValueError(f"future_window must be >= 1, got {self.future_window}")
        if self.mini_batch_size < 0 or self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size must be in [0, batch_size], got {self.mini_batch_size}")


