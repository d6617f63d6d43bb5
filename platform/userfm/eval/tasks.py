"""Task and evaluation configs: what a downstream task is (``TaskConfig``, loaded from a task file by
``load_tasks``), the evaluation's own knobs (``EvalConfig``), and the names both use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from userfm.config import from_dict
from userfm.eval.sasrec import SELECT as SASREC_SELECT
from userfm.errors import UserfmError


TASK_TYPES = ("binary", "multiclass", "regression", "retrieval")
DEFAULT_METRIC = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse", "retrieval": "hr@10"}
# Reported next to the primary metric (point values, seed means).
SECONDARY_METRICS = {"binary": ("accuracy", "log_loss"), "multiclass": ("macro_f1", "log_loss"), "regression": (),
                     "retrieval": ("ndcg@10",)}
ALLOWED_METRICS = {"binary": ("auc", "accuracy", "macro_f1", "log_loss"),
                   "multiclass": ("accuracy", "macro_f1", "log_loss"), "regression": ("rmse",),
                   "retrieval": ("hr@10", "ndcg@10")}
HEADS = ("mlp", "logreg")
BASELINES = ("tfidf", "oracle", "t-trans", "popularity", "minilm-mean", "concat-tfidf", "concat-minilm", "bag-of-items",
             "item-knn", "sasrec", "sparse-mlp")
MINILM_MEAN = "minilm-mean"  # the baseline name, and its embedding / model-name prefix
CONCAT_MINILM = "concat-minilm"  # the baseline name, and the source of its tables (E+minilm-mean)
# Rows every real embedding row is compared with (paired), when they ran: the yardsticks that need no pretraining
# (popularity and item-knn: retrieval tasks; tfidf and bag-of-items: the others) and T-Trans.
PAIRED_WITH = ("tfidf/logreg", "bag-of-items/logreg", "t-trans", "popularity", "popularity-unseen", "item-knn", "sasrec")
LAST_EVENT = "last_event"  # the built-in table of each user's held-out last event (see the module docstring)
LAST_EVENT_COLUMNS = ("item_id", "service", "category", "category_top", "category_leaf")
CATEGORY_LEVEL = "category@"  # last_event target "category@<k>": level k (0-based) of the held-out event's category path
CATALOGS = ("all", "service")  # retrieval: rank every item, or only the items of the held-out item's service
RANDOM = "random"  # an embeddings entry with this value is the random floor
HEAD_FORMAT = "userfm.head"


class EvalError(UserfmError, ValueError):
    """A task, embedding table or dataset cannot be evaluated; the message names what and where."""


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """One downstream task: predict ``target`` of ``table`` from a user's embedding.

    YAML: a list of mappings with these keys, or ``{tasks: [...]}``.
    """

    name: str  # unique task name, used in result rows and head folders
    table: str  # attributes table ingested with the dataset ("attributes", "future_labels", ...) or "last_event"
    target: str  # column of ``table`` to predict; users with a null value are left out
    type: str  # "binary" | "multiclass" | "regression" | "retrieval" (table last_event, target item_id)
    users: str = "all"  # "all" | "multi_service" (active in 2+ services) | "service:<name>" (active there) |
    #                     "last_service:<name>" (table last_event: the held-out event is in that service)
    metric: str = ""  # primary metric; "" = auc (binary), accuracy (multiclass), rmse (regression), hr@10 (retrieval)
    transform: str = "none"  # regression target transform: "none" | "log1p"
    holdout: int = -1  # table last_event: the label is the holdout-th last event, the model sees the events before
    #                    it (default 1: the last event; 2: the one before, e.g. the Amazon set's Office target)
    catalog: str = "all"  # retrieval: "all" ranks every item id; "service": only the held-out item's service's items
    history: str = "all"  # what the model reads: "all" events (before the held-out ones), or "service:<name>": only
    #                       that service's (a transfer task: predict a user's Office event from their Arts history alone)

    def __post_init__(self):
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")
        if not self.metric:
            object.__setattr__(self, "metric", DEFAULT_METRIC[self.type])
        if self.metric not in ALLOWED_METRICS[self.type]:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} does not fit a {self.type} task; "
                             f"use one of {ALLOWED_METRICS[self.type]}")
        if not (self.users in ("all", "multi_service") or self.users.startswith(("service:", "last_service:"))):
            raise ValueError(f"task {self.name!r}: users must be 'all', 'multi_service', 'service:<name>' or "
                             f"'last_service:<name>', got {self.users!r}")
        if self.users.startswith("last_service:") and self.table != LAST_EVENT:
            raise ValueError(f"task {self.name!r}: users {self.users!r} filters on the held-out event: it needs table {LAST_EVENT}")
        if self.holdout == -1:
            object.__setattr__(self, "holdout", int(self.table == LAST_EVENT))
        if self.table == LAST_EVENT and self.holdout < 1:
            raise ValueError(f"task {self.name!r}: holdout must be >= 1 on table {LAST_EVENT} (the event predicted), got {self.holdout}")
        if self.table != LAST_EVENT and self.holdout != 0:
            raise ValueError(f"task {self.name!r}: holdout applies to table {LAST_EVENT} only (got {self.holdout} on {self.table!r})")
        if not (self.history == "all" or (self.history.startswith("service:") and self.history.split(":", 1)[1])):
            raise ValueError(f"task {self.name!r}: history must be 'all' or 'service:<name>', got {self.history!r}")
        if self.catalog not in CATALOGS:
            raise ValueError(f"task {self.name!r}: catalog must be one of {CATALOGS}, got {self.catalog!r}")
        if self.catalog != "all" and self.type != "retrieval":
            raise ValueError(f"task {self.name!r}: catalog applies to retrieval tasks only")
        if self.type == "retrieval" and (self.table != LAST_EVENT or self.target != "item_id"):
            raise ValueError(f"task {self.name!r}: a retrieval task ranks the held-out item: it needs "
                             f"table: {LAST_EVENT} and target: item_id (got {self.table}.{self.target})")
        if self.table == LAST_EVENT and self.target not in LAST_EVENT_COLUMNS and _category_level(self.target) is None:
            raise ValueError(f"task {self.name!r}: table {LAST_EVENT} has columns {LAST_EVENT_COLUMNS} and "
                             f"{CATEGORY_LEVEL}<k> (level k of the category path), not {self.target!r}")
        if self.transform not in ("none", "log1p"):
            raise ValueError(f"task {self.name!r}: transform must be 'none' or 'log1p', got {self.transform!r}")
        if self.transform != "none" and self.type != "regression":
            raise ValueError(f"task {self.name!r}: transform applies to regression tasks only")

    @property
    def label_table(self) -> str:
        """Key of the table the labels come from: the attributes table's name, or ``last_event@<holdout>``."""
        return f"{LAST_EVENT}@{self.holdout}" if self.table == LAST_EVENT else self.table

    @property
    def history_service(self) -> str:
        """The service whose events alone the model reads ("" = every service)."""
        return self.history.split(":", 1)[1] if self.history.startswith("service:") else ""

    @property
    def view(self) -> tuple[int, str]:
        """(holdout, history_service): the history every model of this task reads; tasks sharing it share one
        embedding table (``userfm embed --set holdout_last=<holdout> --set history_service=<service>``)."""
        return self.holdout, self.history_service


def _category_level(target: str) -> int | None:
    """k of a ``category@<k>`` target (k >= 0), else None."""
    if target.startswith(CATEGORY_LEVEL) and target[len(CATEGORY_LEVEL):].isdigit():
        return int(target[len(CATEGORY_LEVEL):])
    return None


@dataclass(frozen=True)
class EvalConfig:
    """Config of :func:`run_evaluate` (``userfm evaluate``)."""

    data: str = ""  # sequence dataset folder written by `userfm ingest` (labels are its attribute tables)
    embeddings: dict[str, str] = field(default_factory=dict)  # name -> embedding table (Parquet file/folder) or "random"
    tasks: str = "experiments/tasks/synthetic.yaml"  # YAML list of TaskConfig
    only_tasks: tuple[str, ...] = ()  # run just these task names; () = all
    out: str = ""  # run folder for results.json, results.md, charts, heads
    heads: tuple[str, ...] = HEADS  # heads trained on every embedding table: "mlp", "logreg"
    baselines: tuple[str, ...] = ("tfidf", "oracle", "popularity", "bag-of-items", "item-knn")  # and opt-in
    #                                 "t-trans", "minilm-mean" (mean MiniLM vector as an embedding table),
    #                                 "concat-tfidf" (each real table + TF-IDF, logistic), "sparse-mlp" (the U-MLP
    #                                 on the TF-IDF and bag-of-items features too); see the module docstring
    #                                 (random is an embeddings entry; each runs on the tasks it applies to)
    reference: str = ""  # an embeddings name: every other table's rows also get a paired difference to its row of the
    #                      same head (e.g. an encoder pretrained on both services vs on the target service alone)
    seed: int = 0  # first seed; heads and random tables use seed .. seed + seeds - 1
    seeds: int = 3  # head trainings per (task, model), mean reported; deterministic fits (logreg on a real table, tfidf) run once
    bootstrap_samples: int = 1000  # resamples of test users per interval (cost ~ samples x test users)
    confidence: float = 0.95  # interval coverage
    quantile: float = 0.25  # cold = history length <= this quantile of test users, heavy = >= 1 - quantile
    random_dim: int = 0  # size of random embeddings; 0 = that of the first real table (64 if none)
    ground_truth: str = "auto"  # ground_truth.json for the oracle row; "auto" = next to the dataset's inputs; "" = none
    mlp_hidden: int = 256  # U-MLP hidden units (one hidden layer, ReLU)
    mlp_dropout: float = 0.2  # U-MLP dropout probability on the hidden layer
    mlp_lr: float = 1e-3  # AdamW learning rate
    mlp_weight_decay: float = 1e-4  # AdamW weight decay
    mlp_batch_size: int = 256  # users per step (at most; see mlp_min_steps)
    mlp_min_steps: int = 8  # mini-batches per epoch at least: on fewer than mlp_batch_size x this training users the
    #                         batch shrinks to ceil(n / mlp_min_steps) (>= 1). Without it 200 labelled users are one
    #                         step per epoch and patience counts single steps: the head stops near its initialisation
    mlp_max_epochs: int = 200  # epochs at most
    mlp_patience: int = 10  # epochs without a better val loss before stopping (best weights restored)
    logreg_c: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried; best val loss wins
    logreg_max_iter: int = 1000  # lbfgs iterations
    tfidf_max_features: int = 50_000  # TF-IDF vocabulary size (unigrams + bigrams)
    tfidf_min_df: int = 2  # a term must occur in this many training users
    concat_tfidf_weights: tuple[float, ...] = (0.3, 1.0, 3.0)  # concat-tfidf: factors w tried with every C (best
    #                         val loss wins); the TF-IDF block is multiplied by w * sqrt(D), so at w = 1 its rows
    #                         (unit norm) match the standardised D-dim embedding's (norm ~ sqrt(D)). One L2 penalty
    #                         over blocks of unequal scale starves one of them; w lets val pick the balance
    minilm_cache: str = ""  # minilm-mean: MiniLM vector cache folder; "" = <data>/minilm_cache (pretraining's);
    #                         texts missing from it are encoded with the packaged model and appended
    t_trans_size: str = "tiny"  # T-Trans encoder size (encoders.SIZES); pick the pretrained encoder's for a fair match
    t_trans_item_encoder: str = "text"  # "text" (BPE, any dataset) | "category"
    t_trans_max_events: int = 64  # most recent events per user fed to T-Trans
    t_trans_max_text_tokens: int = 16  # BPE tokens per event incl. <bos> ("text")
    t_trans_text_vocab: int = 2048  # BPE vocabulary fitted on the task's training users ("text")
    t_trans_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # AdamW learning rates tried with the first seed; the
    #                         lowest early-stopped val loss wins, the other seeds train at that rate only
    t_trans_batch_size: int = 64  # users per step
    t_trans_max_epochs: int = 30  # epochs at most
    t_trans_patience: int = 3  # epochs without a better val loss before stopping (best weights restored)
    retrieval_history_weight: float = 0.5  # retrieval heads: target share on a train user's earlier items (rest: held-out item)
    retrieval_item_factors: int = 0  # retrieval heads: > 0 factorizes the output layer through fixed item co-occurrence
    #                         vectors of this size (PPMI + SVD of the training users' histories, userfm.models.cooc), its bias
    #                         starting at the popularity ranking; 0 = one free output per item. Off: on MovieLens
    #                         latest-small (32) it moved HR@10 within the intervals (docs/evaluation.md, the MovieLens paragraph)
    own_heads: bool = True  # retrieval: a table made by a future/next encoder also scores the catalog with that
    #                         objective's own head, nothing trained on top (row <table>/own-head; userfm.infer.item_scorer)
    item_knn_last: tuple[int, ...] = (1, 3, 10, 0)  # item-knn: most recent items read (0 = all), best val HR@10 wins
    sasrec_max_len: int = 50  # sasrec: most recent items read
    sasrec_dim: int = 64  # sasrec: embedding and hidden size
    sasrec_layers: int = 2  # sasrec: self-attention blocks
    sasrec_max_epochs: int = 200  # sasrec: epochs at most (early-stopped on sasrec_select, patience sasrec_patience)
    sasrec_patience: int = 5
    sasrec_select: str = "mrr"  # sasrec: the val criterion, "mrr" (the val users' held-out items' mean reciprocal rank,
    #                              full ranking) | "loss" (their cross-entropy); why mrr: SASRecConfig.select
    sasrec_windows: bool = True  # sasrec: train on every max_len + 1 window of each sequence, not only its last (SASRecConfig.windows)
    retrieval_mask_seen: bool = False  # retrieval: rank only items the user has not interacted with (default: full catalog)
    folds: int = 0  # 0: heads fit on the dataset's train users, scored on its test users. k >= 3: k-fold
    #                 cross-fitting over every labelled user (fold f = test, fold f+1 = val, the rest = train, folds by
    #                 user-id hash), so every user is scored once by heads that never saw it: k x the fits, ~1/0.1
    #                 x the test users (small datasets: MovieLens' 671 users give 61 test users, 671 cross-fitted)
    labels: int = 0  # label budget: heads and baselines (T-Trans, TF-IDF included) train on `labels` training
    #                  users, the first by a salted user-id hash within each class, class proportions kept
    #                  (classification; nested across budgets up to rounding), and the same share of
    #                  val users; test users unchanged. The pretrained encoder still saw every training user,
    #                  unlabelled: the semi-supervised setting a foundation model is for. 0 = all labels
    torch_threads: int = 1  # torch intra-op threads while heads and T-Trans train (restored after); 0 = leave
    #                         as is. Their matmuls are small: more threads mostly add synchronisation
    #                         (U-MLP 13x, T-Trans 5-12x slower with 2 threads on a busy 2-core box)
    workers: int = 1  # processes fitting a task's heads and its bag-of-items / TF-IDF baselines side by side (joblib's
    #                   loky); 0 = one per CPU. 1 fits them one by one here. The fits are seeded: same results either way
    save_heads: bool = True  # write heads/<task>/<model>/seed<k>/ (safetensors + JSON)
    charts: bool = True  # write PNG charts (skipped with a note when matplotlib is missing)

    def __post_init__(self):
        bad = [h for h in self.heads if h not in HEADS]
        if bad:
            raise ValueError(f"heads: unknown {bad}; known: {HEADS}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"baselines: unknown {bad}; known: {BASELINES} (the random floor is an embeddings entry: name: random)")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.sasrec_select not in SASREC_SELECT:
            raise ValueError(f"sasrec_select must be one of {SASREC_SELECT}, got {self.sasrec_select!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per CPU, 1 = fit in this process), got {self.workers}")
        if self.mlp_batch_size < 1 or self.mlp_min_steps < 1:
            raise ValueError(f"mlp_batch_size and mlp_min_steps must be >= 1, got {self.mlp_batch_size}, {self.mlp_min_steps}")
        if self.labels < 0:
            raise ValueError(f"labels must be >= 0 (0 = every labelled training user), got {self.labels}")
        if self.folds < 0 or self.folds in (1, 2):
            raise ValueError(f"folds must be 0 (the dataset's split) or >= 3 (train / val / test folds), got {self.folds}")
        if not 0 < self.quantile < 0.5:
            raise ValueError(f"quantile must be in (0, 0.5), got {self.quantile}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.retrieval_history_weight < 1:
            raise ValueError(f"retrieval_history_weight must be in [0, 1), got {self.retrieval_history_weight}")
        if self.retrieval_item_factors < 0:
            raise ValueError(f"retrieval_item_factors must be >= 0, got {self.retrieval_item_factors}")
        if not self.t_trans_lrs or any(not lr > 0 for lr in self.t_trans_lrs):
            raise ValueError(f"t_trans_lrs must be a non-empty list of positive learning rates, got {self.t_trans_lrs}")
        if not self.concat_tfidf_weights or any(not w > 0 for w in self.concat_tfidf_weights):
            raise ValueError(f"concat_tfidf_weights must be a non-empty list of positive factors, got {self.concat_tfidf_weights}")
        if not self.logreg_c or any(not c > 0 for c in self.logreg_c):
            raise ValueError(f"logreg_c must be a non-empty list of positive values, got {self.logreg_c}")
        if not self.item_knn_last or any(m < 0 for m in self.item_knn_last):
            raise ValueError(f"item_knn_last must be a non-empty list of item counts >= 0 (0 = all), got {self.item_knn_last}")
        if self.t_trans_item_encoder not in ("text", "category"):
            raise ValueError(f"t_trans_item_encoder must be 'text' or 'category', got {self.t_trans_item_encoder!r}")
        if self.reference and (self.reference not in self.embeddings or self.embeddings[self.reference] == RANDOM):
            raise ValueError(f"reference {self.reference!r} must name one of the embedding tables {sorted(self.embeddings)}")
        for name in self.embeddings:
            if "/" in name or "+" in name or not name:
                raise ValueError(f"embeddings: name {name!r} must be non-empty and contain no '/' or '+'")
            if name in ("tfidf", MINILM_MEAN, "t-trans", "popularity", "popularity-unseen", "oracle", "bag-of-items", "item-knn",
                        "sasrec"):
                raise ValueError(f"embeddings: name {name!r} is a baseline's; pick another name for the table")


def load_tasks(path: str | Path, only: tuple[str, ...] = ()) -> tuple[TaskConfig, ...]:
    """Tasks from a YAML list (or ``{tasks: [...]}``); ``only`` keeps those names (each must exist)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"tasks file not found: {p}")
    data = yaml.safe_load(p.read_text())
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if not isinstance(data, list) or not data:
        raise EvalError(f"{p}: expected a non-empty list of tasks (or a mapping with a 'tasks' list)")
    tasks = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise EvalError(f"{p}: task {i} is not a mapping: {item!r}")
        tasks.append(from_dict(TaskConfig, item, where=f"{p}: task {i} ({item.get('name', '?')})"))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"{p}: duplicate task names {dupes}")
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise EvalError(f"only_tasks: no task(s) {missing} in {p}; tasks: {names}")
        tasks = [t for t in tasks if t.name in only]
    return tuple(tasks)


def _num(v: float) -> float | None:
    """A metric as JSON stores it: rounded to 6 places, None when missing or not finite."""
    return None if v is None or not math.isfinite(v) else round(float(v), 6)
