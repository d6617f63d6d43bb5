"""Downstream evaluation: small heads on frozen user embeddings vs baselines, with intervals.

Protocol (ShopperBERT's U-MLP vs T-Trans, https://arxiv.org/abs/2106.00573): the user encoder is frozen;
its embedding table is the only input of a small head trained per task. For every task in a YAML list
(``experiments/tasks/*.yaml``) and every embedding table in the config:

    heads      "mlp"     U-MLP: one hidden layer, early-stopped on the val split's loss (torch)
               "logreg"  logistic regression (ridge for regression tasks), C chosen on val (scikit-learn)
    baselines  "random"  an embedding table of seeded Gaussian vectors of the same size: the floor
               "tfidf"   TF-IDF of each user's event texts + logistic regression (no pretraining at all)
               "popularity" retrieval tasks only: every user gets the training users' most frequent items
                         (row ``popularity``), and the same without the items already in the user's history
                         (row ``popularity-unseen``: a repeat purchase as the held-out item then ranks last)
               "bag-of-items" non-retrieval tasks: logistic regression (ridge) on the binary user x item
                         matrix, C chosen on val (``userfm.eval.bag_of_items``; BlurMe, RecSys 2012)
               "item-knn" retrieval tasks: item-item cosine over the training users' histories, scored
                         from the user's last m items, m chosen on val from ``item_knn_last``
                         (``userfm.eval.item_knn``)
               "sasrec"  retrieval tasks: SASRec trained from scratch on the training users' item sequences,
                         full softmax, early-stopped on the val users' held-out items (``userfm.eval.sasrec``;
                         opt-in: one fit, seed ``seed``, serves every seed)
               "oracle"  synthetic data only: the Bayes-optimal accuracy from ``ground_truth.json``
               "t-trans" ShopperBERT's T-Trans: a user transformer (``encoders.UserEncoder``) + linear
                         classifier trained end to end from scratch on the task's training users' sequences,
                         early-stopped on its own val loss, learning rate chosen on val from ``t_trans_lrs``
                         (opt-in: the slow one)
               "minilm-mean" each user's mean of the frozen all-MiniLM-L6-v2 vectors of their event texts,
                         fed to the same heads as an embedding table (rows ``minilm-mean/<head>``): text
                         semantics with no user model at all (opt-in: needs the MiniLM vector cache,
                         ``<data>/minilm_cache`` from pretraining; texts missing from it are encoded and added)
               "concat-tfidf" for every real embedding table E (and minilm-mean): the standardised E
                         hstacked with the TF-IDF matrix, logistic regression (ridge), C and the TF-IDF block's
                         weight chosen on val (row ``E+tfidf/logreg``; ``concat_tfidf_weights``): the "general
                         user feature + service-specific feature" of the papers (opt-in)
               "concat-minilm" for every real embedding table E: E hstacked with the minilm-mean table (users
                         in both), fed to the same heads as a table (rows ``E+minilm-mean/<head>``): does the
                         encoder add anything to the mean of the item vectors it reads? (the ablation of a
                         residual path from the input; opt-in, needs what minilm-mean needs)

Users come with the dataset's user-disjoint train/val/test split (ingest hashes the user id): heads fit
on train, select on val, and every number reported is on test: the mean over ``seeds`` of the task's
metric, a 95 % percentile-bootstrap interval over test users (one resample scores every seed, so the
interval is the one of the seed-mean), the same on cold users (bottom quartile of history length among
the task's test users) and heavy users (top quartile), and the paired difference to the random floor.
Every row of a real embedding table (minilm-mean and concatenations included) also carries ``paired``:
its paired bootstrap difference (this row - baseline, same resampled users) to each row of ``PAIRED_WITH``
that ran (the no-pretraining yardsticks and T-Trans) and to the task's best yardstick (``best_yardstick``:
the best test value among them and minilm-mean, which favours the yardstick), on all test users and on the
cold users; every other row carries ``vs_best``, the same difference to that best yardstick on all test
users. Every model sees the same users in the same splits; seeds and resamples are shared.

Held-out-event tasks (table ``last_event``, built from the sequences, not ingested): the label is a
property of each user's LAST event (its ``item_id``, ``service``, ``category`` path, ``category_top``
= level 0, ``category_leaf`` = the deepest level), and the model sees the history WITHOUT that event:
embedding tables must come from ``userfm embed --set holdout_last=1`` (checked: the table's
``holdout_last`` column or its embed manifest), and TF-IDF / T-Trans read the history minus its last
event too. Users with fewer than 2 events have no label. History length (cold/heavy) is that of the
shortened history.

Next-item retrieval (``type: retrieval``, ``table: last_event``, ``target: item_id``): leave-one-out,
full ranking over the catalog (every item id in the dataset's stored sequences), no sampled
negatives; HR@10 and NDCG@10 from the held-out item's rank (ties count against it). Items the user
already interacted with are NOT removed from the ranking by default (``retrieval_mask_seen``), as in
the full-ranking SASRec/HSTU tables. Heads map the frozen user vector to logits over the catalog:
"logreg" = one linear layer, "mlp" = the U-MLP with one output per item, both trained with softmax
cross-entropy towards each training user's held-out item (weight 1 - ``retrieval_history_weight``)
and its earlier items (the rest, spread evenly), early-stopped on the val users' held-out-item loss.
With ``retrieval_item_factors`` > 0 their output layer is factorized through fixed item vectors
fitted without labels on the training users' histories (PPMI + SVD, ``userfm.models.cooc``), its bias
starting at the popularity ranking: what a head learns of one item then carries to the items that
co-occur with it, instead of one free output row per item of the catalog.
T-Trans ranks with a linear item layer on top of its from-scratch encoder (held-out item only).

Outputs in ``out``: ``config.json``, ``results.json`` (every model x task row), ``results.md``, PNG
charts when matplotlib is installed, and ``heads/<task>/<model>/seed<k>/`` (``head.json`` +
``weights.safetensors``, no pickle) that :func:`load_head` reads back for serving.

Nothing here imports ``ray``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from userfm.eval import metrics as M
from userfm.config import ConfigError, from_dict, to_dict
from userfm.data.dataset import load_manifest, read_attributes, read_sequences
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
             "item-knn", "sasrec")
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
    #                                 "concat-tfidf" (each real table + TF-IDF, logistic); see the module docstring
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
    item_knn_last: tuple[int, ...] = (1, 3, 10, 0)  # item-knn: most recent items read (0 = all), best val HR@10 wins
    sasrec_max_len: int = 50  # sasrec: most recent items read
    sasrec_dim: int = 64  # sasrec: embedding and hidden size
    sasrec_layers: int = 2  # sasrec: self-attention blocks
    sasrec_max_epochs: int = 200  # sasrec: epochs at most (early-stopped on val loss, patience sasrec_patience)
    sasrec_patience: int = 5
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


# --------------------------------------------------------------------------------------------------
# Users, labels, splits
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Labelled users of one task, by split. ``y`` holds class indices (classification) or floats."""

    task: TaskConfig
    ids: dict[str, np.ndarray]  # split -> (n,) user ids (object array of str)
    y: dict[str, np.ndarray]  # split -> (n,) int64 class index or float64 value
    classes: list | None  # class values in index order (None for regression)
    n_events: dict[str, np.ndarray]  # split -> (n,) history length (without the held-out event for last_event tasks)
    left_out: dict[str, int]  # users dropped and why
    history: dict[str, list[np.ndarray]] | None = None  # retrieval: split -> per user, catalog indices of the
    #                                                     items before the held-out one (oldest first)
    outside: dict[str, list[np.ndarray]] | None = None  # retrieval, catalog "service": split -> per user, the
    #                                                     catalog indices outside the held-out item's service

    @property
    def holdout(self) -> int:
        """Events held out of each user's history for this task (the task's holdout on last_event, else 0)."""
        return self.task.holdout

    @property
    def view(self) -> tuple[int, str]:
        """(holdout, history service) of the history every model of this task reads (``TaskConfig.view``)."""
        return self.task.view

    def excluded(self, split: str, mask_seen: bool) -> list[np.ndarray] | None:
        """Per user of ``split``, the catalog indices removed from the ranking: items outside the catalog
        (``catalog: service``) and, with ``mask_seen``, the user's history (the target never is); None: none."""
        parts = [p for p in ((self.history or {}).get(split) if mask_seen else None,
                             (self.outside or {}).get(split)) if p is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        return [np.concatenate([a, b]) for a, b in zip(*parts)]


def user_table(data: str | Path) -> pa.Table:
    """user_id, split, n_events (whole history) and n_services (services the user is active in)."""
    manifest = load_manifest(data)
    users = read_sequences(data, columns=["user_id", "split", "n_events"])
    ids = [read_sequences(data, scope=s, columns=["user_id"]).column("user_id") for s in manifest["services"]]
    if ids:
        counts = pc.value_counts(pa.chunked_array([c for col in ids for c in col.chunks], pa.string()))
        per = pa.table({"user_id": counts.field("values"), "n_services": counts.field("counts")})
        users = users.join(per, "user_id", join_type="left outer")
    else:
        users = users.append_column("n_services", pa.nulls(users.num_rows, pa.int64()))
    return users.set_column(users.schema.get_field_index("n_services"), "n_services",
                            pc.fill_null(users.column("n_services"), 0).cast(pa.int64()))


def fold_of(user_ids: np.ndarray, k: int) -> np.ndarray:
    """(n,) user ids -> (n,) fold index in [0, k): the user-id hash (the one ingest splits by) cut in k."""
    from userfm.data.sequences import split_fraction

    return np.minimum((np.asarray([split_fraction(u) for u in user_ids], np.float64) * k).astype(np.int64), k - 1)


def label_rank(user_ids: np.ndarray) -> np.ndarray:
    """(n,) user ids -> (n,) position in [0, 1) of a salted user-id hash, independent of the split and fold
    hash: a label budget keeps the first users by it (within each class, :func:`budget_pick`), so a smaller
    budget is a subset of a larger one up to the class quotas' rounding."""
    from userfm.data.sequences import split_fraction

    return np.asarray([split_fraction("labels:" + u) for u in user_ids], np.float64)


def budget_pick(idx: np.ndarray, rank: np.ndarray, n: int, strata: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` of ``idx`` a label budget keeps: the first by ``rank``; with ``strata`` (class per row), the
    first of each class by rank, the classes' quotas in their proportions (largest remainder, so they sum
    to ``n``): a 200-user budget drawn plainly can hold 54 % parents where the split holds 43 %."""
    if strata is None:
        return idx[np.argsort(rank, kind="stable")[:n]]
    values, counts = np.unique(strata, return_counts=True)
    share = n * counts / counts.sum()
    quota = np.floor(share).astype(np.int64)
    quota[np.argsort(-(share - quota), kind="stable")[: n - int(quota.sum())]] += 1
    picked = [idx[strata == v][np.argsort(rank[strata == v], kind="stable")[:q]] for v, q in zip(values, quota)]
    return np.sort(np.concatenate(picked))


def task_data(data: str | Path, task: TaskConfig, users: pa.Table, tables: dict[str, pa.Table] | None = None,
              fold: tuple[int, int] | None = None, labels: int = 0) -> TaskData:
    """Join the task's label column with the users table, filter users, encode labels by split.

    Splits come from the dataset (user-disjoint by construction); a label table whose split disagrees
    with the sequences' is an error rather than a silent leak. ``fold`` (f, k): cross-fitting instead:
    fold f of :func:`fold_of` is the test split, fold f + 1 (mod k) val, the others train; the classes
    are those of every labelled user, so all k folds share one class order. ``labels`` > 0: a label
    budget: heads and baselines see only ``labels`` training users, the first by :func:`label_rank` within
    each class in the classes' proportions (:func:`budget_pick`), and the same share of the val users (at
    least one); test users are untouched, and the classes stay those of all training users, so every
    budget scores the same test users against the same class order.
    """
    table = (tables or {}).get(task.label_table)
    if table is None:
        table = _attribute_table(data, task.label_table)
    level = _category_level(task.target) if task.table == LAST_EVENT else None
    if level is not None:  # level k of the held-out event's category path (null when the path is shorter)
        paths = table.column("category_path").to_pylist()
        table = table.append_column(task.target, pa.array([p[level] if p and len(p) > level else None for p in paths],
                                                          pa.string()))
    if task.target not in table.column_names:
        cols = [c for c in table.column_names if c not in ("user_id", "split")]
        raise EvalError(f"task {task.name!r}: column {task.target!r} is not in table {task.table!r} (columns: {cols})")
    lab_cols = ["user_id", "split", task.target] + (["service"] if task.users.startswith("last_service:") else [])
    lab = table.select(lab_cols).rename_columns(["user_id", "label_split", "label", "label_service"][:len(lab_cols)])
    joined = lab.join(users, "user_id", join_type="inner").sort_by("user_id")
    left_out = {"no_sequence": lab.num_rows - joined.num_rows}
    bad = pc.sum(pc.not_equal(joined.column("split"), joined.column("label_split"))).as_py() or 0
    if bad:
        raise EvalError(f"task {task.name!r}: {bad} user(s) have a different split in table {task.table!r} than in the "
                        f"sequences; re-ingest the dataset so labels and sequences share one split")
    null = joined.column("label").is_null()
    left_out["null_label"] = int(pc.sum(null).as_py() or 0)
    joined = joined.filter(pc.invert(null))
    if task.users == "multi_service":
        keep = pc.greater_equal(joined.column("n_services"), 2)
    elif task.users.startswith("service:"):
        svc = task.users.split(":", 1)[1]
        manifest = load_manifest(data)
        if svc not in manifest["services"]:
            raise EvalError(f"task {task.name!r}: users {task.users!r}: no service {svc!r}; services: {sorted(manifest['services'])}")
        active = read_sequences(data, scope=svc, columns=["user_id"]).column("user_id")
        keep = pc.is_in(joined.column("user_id"), value_set=active.combine_chunks())
    elif task.users.startswith("last_service:"):
        svc = task.users.split(":", 1)[1]
        manifest = load_manifest(data)
        if svc not in manifest["services"]:
            raise EvalError(f"task {task.name!r}: users {task.users!r}: no service {svc!r}; services: {sorted(manifest['services'])}")
        keep = pc.fill_null(pc.equal(joined.column("label_service"), svc), False)
    else:
        keep = None
    if keep is not None:
        left_out["users_filter"] = joined.num_rows - int(pc.sum(keep).as_py() or 0)
        joined = joined.filter(keep)
    svc = task.history_service
    if svc:  # the model reads one service's events: users with none of them before the label have no input
        services = load_manifest(data)["services"]
        if svc not in services:
            raise EvalError(f"task {task.name!r}: history {task.history!r}: no service {svc!r}; "
                            f"services: {sorted(services)}")
        from userfm.infer.embed import read_history

        counts = read_history(data, ["user_id", "n_events"], task.holdout, svc)
        joined = joined.drop_columns(["n_events"]).join(
            counts.rename_columns(["user_id", "n_events"]).select(["user_id", "n_events"]), "user_id").sort_by("user_id")
        has = pc.greater(joined.column("n_events"), 0)
        left_out["no_history_in_service"] = joined.num_rows - int(pc.sum(has).as_py() or 0)
        joined = joined.filter(has)
        hold = 0  # n_events above is already the history's length
    else:
        hold = task.holdout

    split = np.asarray(joined.column("split").to_pylist(), dtype=object)
    if fold is not None:
        f, k = fold
        fid = fold_of(np.asarray(joined.column("user_id").to_pylist(), dtype=object), k)
        split = np.where(fid == f, "test", np.where(fid == (f + 1) % k, "val", "train")).astype(object)
    raw = joined.column("label").to_pylist()
    classes, hist = None, None
    if task.type == "retrieval":
        catalog, user_items = item_histories(data, holdout=task.holdout, service=svc)
        classes = catalog
        index = {v: i for i, v in enumerate(catalog)}
        y_all = np.asarray([index[v] for v in raw], dtype=np.int64)  # the held-out item is in the catalog by construction
        hist = [user_items[u] for u in joined.column("user_id").to_pylist()]
        keep_rows = np.ones(len(y_all), bool)
        if task.catalog == "service":
            item_svc = item_services(data, catalog)
            by_svc = {v: np.flatnonzero(item_svc != v) for v in np.unique(item_svc)}  # one array per service, shared
            outside = [by_svc[item_svc[i]] for i in y_all]
    elif task.type == "regression":
        try:
            y_all = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise EvalError(f"task {task.name!r}: column {task.target!r} of {task.table!r} is not numeric: {exc}") from None
        if task.transform == "log1p":
            y_all = np.log1p(y_all)
        keep_rows = np.ones(len(y_all), bool)
    else:
        train_vals = {v for v, s in zip(raw, split) if s == "train" or fold is not None}
        classes = sorted(train_vals, key=lambda v: (str(type(v)), v))
        if task.type == "binary" and len(classes) != 2:
            raise EvalError(f"task {task.name!r}: binary target {task.target!r} has {len(classes)} class(es) among "
                            f"training users: {classes[:5]}")
        if len(classes) < 2:
            raise EvalError(f"task {task.name!r}: target {task.target!r} has fewer than 2 classes among training users")
        index = {v: i for i, v in enumerate(classes)}
        y_all = np.asarray([index.get(v, -1) for v in raw], dtype=np.int64)
        keep_rows = y_all >= 0  # val/test users whose class never occurs in train cannot be scored
        left_out["class_unseen_in_train"] = int((~keep_rows).sum())
    uid = np.asarray(joined.column("user_id").to_pylist(), dtype=object)
    n_ev = joined.column("n_events").to_numpy() - hold
    masks = {s: (split == s) & keep_rows for s in ("train", "val", "test")}
    if labels:
        n_tr = int(masks["train"].sum())
        quota = {"train": labels, "val": max(1, round(labels * int(masks["val"].sum()) / max(n_tr, 1)))}
        rank = label_rank(uid)
        strata = y_all if classes is not None and task.type != "retrieval" else None
        dropped = 0
        for s, n in quota.items():
            idx = np.flatnonzero(masks[s])
            if n < len(idx):
                masks[s][:] = False
                masks[s][budget_pick(idx, rank[idx], n, None if strata is None else strata[idx])] = True
                dropped += len(idx) - n
        left_out["label_budget"] = dropped
    out_ids, out_y, out_n, out_h, out_o = {}, {}, {}, {}, {}
    for s in ("train", "val", "test"):
        m = masks[s]
        out_ids[s], out_y[s], out_n[s] = uid[m], y_all[m], n_ev[m]
        if hist is not None:
            out_h[s] = [h for h, k in zip(hist, m) if k]
        if task.type == "retrieval" and task.catalog == "service":
            out_o[s] = [o for o, k in zip(outside, m) if k]
        if not m.any():
            where = f" in cross-fitting fold {fold[0]} of {fold[1]}" if fold else ""
            raise EvalError(f"task {task.name!r}: no labelled {s} users{where} (after the users filter {task.users!r})")
    if (labels or fold is not None) and classes is not None and task.type != "retrieval" and len(np.unique(out_y["train"])) < 2:
        # the dataset's own split was checked above (classes from its training users); a budget or a fold may not be
        if labels:
            raise EvalError(f"task {task.name!r}: the {len(out_y['train'])} training users of the label budget (labels="
                            f"{labels}) have one class only; raise labels")
        raise EvalError(f"task {task.name!r}: the training users of cross-fitting fold {fold[0]} of {fold[1]} have one "
                        f"class only; use fewer folds or the dataset's split (folds=0)")
    return TaskData(task, out_ids, out_y, classes, out_n, {k: v for k, v in left_out.items() if v}, out_h or None,
                    out_o or None)


def stack_folds(fold_tds: list[TaskData]) -> TaskData:
    """The k cross-fitting folds of one task -> one TaskData whose test split is every fold's test users
    (fold order), the order :func:`merge_folds` stacks their scores in. It has no train / val split."""
    first = fold_tds[0]
    cat = lambda key: np.concatenate([getattr(f, key)["test"] for f in fold_tds])  # noqa: E731
    hist = {"test": [h for f in fold_tds for h in f.history["test"]]} if first.history is not None else None
    outside = {"test": [o for f in fold_tds for o in f.outside["test"]]} if first.outside is not None else None
    return TaskData(first.task, {"test": cat("ids")}, {"test": cat("y")}, first.classes, {"test": cat("n_events")},
                    first.left_out, hist, outside)


def merge_folds(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Per-fold ``score_models`` results -> one per model: each seed's test scores stacked over the folds
    (fold order), fit / predict seconds of every fold's fits, heads saved, and what val chose per fold
    (the first fold's choice at the top level, every fold's under ``per_fold``)."""
    merged = {}
    for model, first in parts[0].items():
        per = [p[model] for p in parts]
        merged[model] = {
            "embedding": first["embedding"], "head": first["head"],
            "scores": [np.concatenate([p["scores"][i] for p in per]) for i in range(len(first["scores"]))],
            "train_s": [t for p in per for t in p["train_s"]], "infer_s": [t for p in per for t in p["infer_s"]],
            "saved": [x for p in per for x in p["saved"]],
            "extra": {k: {**v, "per_fold": [p["extra"][k] for p in per]} for k, v in first["extra"].items()},
        }
    return merged


def _last_elements(col: pa.ChunkedArray | pa.Array, valid: np.ndarray, n: int = 1) -> pa.Array:
    """Each row's n-th last list element (null where ``valid`` is False or the list is shorter than n)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy()
    ok = valid & (np.diff(off) >= n)
    return arr.values.take(pa.array(np.where(ok, off[1:] - n, 0), pa.int64(), mask=~ok))


def last_event_table(data: str | Path, n: int = 1) -> pa.Table:
    """The built-in ``last_event`` table: per user, properties of the n-th LAST event of the combined history
    (n = a task's ``holdout``: 1 the last event, 2 the one before it).

    Columns user_id, split, item_id, service, category (path joined with " > "), category_top (level 0),
    category_leaf (deepest level), category_path (the list, for ``category@<k>`` targets). Users with
    fewer than n + 1 events get nulls (no history would be left before the event).
    """
    t = read_sequences(data, columns=["user_id", "split", "n_events", "service", "item_id", "category"])
    valid = t.column("n_events").to_numpy() >= n + 1
    paths = _last_elements(t.column("category"), valid, n).to_pylist()
    return pa.table({
        "user_id": t.column("user_id"), "split": t.column("split"),
        "item_id": _last_elements(t.column("item_id"), valid, n),
        "service": _last_elements(t.column("service"), valid, n),
        "category": pa.array([" > ".join(p) if p else None for p in paths], pa.string()),
        "category_top": pa.array([p[0] if p else None for p in paths], pa.string()),
        "category_leaf": pa.array([p[-1] if p else None for p in paths], pa.string()),
        "category_path": pa.array([p or None for p in paths], pa.list_(pa.string())),
    })


def item_services(data: str | Path, catalog: list[str]) -> np.ndarray:
    """(len(catalog),) object array: the service of each catalog item (the first service it occurs in, in
    stored order; items are one service's in every format the converters write)."""
    t = read_sequences(data, columns=["item_id", "service"])
    items = t.column("item_id").combine_chunks().flatten()
    svc = t.column("service").combine_chunks().flatten()
    idx = pc.index_in(items, value_set=pa.array(catalog, items.type)).fill_null(-1).to_numpy().astype(np.int64)
    out = np.full(len(catalog), None, dtype=object)
    svc_np = np.asarray(svc.to_pylist(), dtype=object)
    first = np.full(len(catalog), -1, np.int64)
    order = np.flatnonzero(idx >= 0)
    seen_idx, pos = np.unique(idx[order], return_index=True)
    first[seen_idx] = order[pos]
    out[first >= 0] = svc_np[first[first >= 0]]
    return out


def item_histories(data: str | Path, keep_null: bool = False, holdout: int = 0,
                   service: str = "") -> tuple[list[str], dict[str, np.ndarray]]:
    """The retrieval catalog and every user's items as catalog indices.

    Returns (catalog: sorted distinct non-null item ids of every user's stored sequence, user id ->
    (n,) int64 indices of the user's events with an item, oldest first, the last event included; with
    ``keep_null`` one per event, -1 where the event has no item). ``holdout`` / ``service``: the histories
    are :func:`userfm.infer.embed.history_rows` (the catalog is still every item).
    """
    t = read_sequences(data, columns=["user_id", "item_id"] + (["service"] if service else []))
    catalog = pc.unique(t.column("item_id").combine_chunks().flatten().drop_null()).sort()
    if holdout or service:
        from userfm.data.sequences import history_rows

        t = history_rows(t, holdout, service)
    items = t.column("item_id").combine_chunks()
    flat = items.flatten()
    idx = pc.index_in(flat, value_set=catalog).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    off = items.offsets.to_numpy()
    off = off - off[0]
    users = t.column("user_id").to_pylist()
    if keep_null:
        return catalog.to_pylist(), {u: idx[off[i]:off[i + 1]] for i, u in enumerate(users)}
    return catalog.to_pylist(), {u: (lambda a: a[a >= 0])(idx[off[i]:off[i + 1]]) for i, u in enumerate(users)}


def _attribute_table(data: str | Path, name: str) -> pa.Table:
    """An attributes table by name, or the built-in ``last_event@<n>`` (``TaskConfig.label_table``)."""
    if name.startswith(LAST_EVENT + "@"):
        return last_event_table(data, int(name.split("@", 1)[1]))
    if name == LAST_EVENT:
        return last_event_table(data)
    manifest = load_manifest(data)
    names = [a["name"] for a in manifest.get("attributes", [])]
    if name not in names:
        raise EvalError(f"{data}: no attributes table {name!r}; ingested tables: {names} (ingest with --attributes)")
    return read_attributes(data, name)


# --------------------------------------------------------------------------------------------------
# Embedding tables
# --------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingTable:
    """A frozen embedding table in memory: user ids and a (n, D) float32 matrix."""

    name: str
    source: str  # path, or "random"
    ids: pa.Array  # (n,) string
    x: np.ndarray  # (n, D) float32
    holdout_last: int | None = 0  # events held out of each history when embedding (None: unknown)
    history_service: str = ""  # the service whose events alone were embedded ("" = all; EmbedConfig.history_service)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """(m,) user ids -> (m, D); every id must be in the table."""
        idx = pc.index_in(pa.array(user_ids, pa.string()), value_set=self.ids).to_numpy(zero_copy_only=False)
        missing = np.isnan(idx) if idx.dtype.kind == "f" else np.zeros(len(idx), bool)
        if missing.any():
            ex = [str(u) for u in np.asarray(user_ids)[missing][:3]]
            raise EvalError(f"embeddings {self.name!r} ({self.source}): {int(missing.sum())} labelled user(s) have no "
                            f"embedding, e.g. {ex}; embed every user of the dataset")
        return self.x[idx.astype(np.int64)]


def load_embeddings(path: str | Path, name: str = "") -> EmbeddingTable:
    """Read an embedding table (Parquet file, folder, or `userfm embed` run folder): user_id, embedding[D]."""
    from userfm.infer.embed import EmbedError, read_embeddings

    try:
        ids, x = read_embeddings(path)
    except EmbedError as exc:
        raise EvalError(f"embeddings {name!r}: {exc}") from None
    return EmbeddingTable(name, str(path), pa.array(ids, pa.string()), x, embeddings_holdout(path, name),
                          embeddings_history_service(path, name))


def embeddings_holdout(path: str | Path, name: str = "") -> int | None:
    """``holdout_last`` an embedding table was made with: its ``holdout_last`` column (``userfm embed``
    writes one), else the embed ``manifest.json`` next to it (tables from before the column: 0), else None."""
    found, val = _table_constant(path, "holdout_last", name)
    if found:
        return int(val) if val is not None else None
    info = _embed_manifest(path)
    return int(info.get("holdout_last", 0)) if info is not None else None


def embeddings_history_service(path: str | Path, name: str = "") -> str:
    """The service whose events alone an embedding table was made from (``userfm embed --set
    history_service=...``): its ``history_service`` column (written only when set), else the embed
    ``manifest.json`` next to it, else "" (every event)."""
    found, val = _table_constant(path, "history_service", name)
    if found:
        return val or ""
    return (_embed_manifest(path) or {}).get("history_service") or ""


def _table_constant(path: str | Path, column: str, name: str) -> tuple[bool, object]:
    """(whether the table has ``column``, its one value); rows disagreeing on it are an error."""
    import pyarrow.dataset as pads

    p = Path(path)
    src = p / "embeddings" if (p / "embeddings").is_dir() else p
    ds = pads.dataset(str(src), format="parquet")
    if column not in ds.schema.names:
        return False, None
    vals = pc.unique(ds.to_table(columns=[column]).column(0)).to_pylist()
    if len(vals) > 1:
        raise EvalError(f"embeddings {name!r} ({path}): rows made with different {column} values {sorted(vals, key=str)}")
    return True, (vals[0] if vals else None)


def concat_tables(a: EmbeddingTable, b: EmbeddingTable, name: str) -> EmbeddingTable:
    """[a | b] for the users of ``a`` that ``b`` has too (in ``a``'s order): (n, Da + Db). The two tables must
    read the same history (holdout and history service), as every table of one task does."""
    if a.history_service != b.history_service or None not in (a.holdout_last, b.holdout_last) and a.holdout_last != b.holdout_last:
        raise EvalError(f"{name}: tables {a.name!r} and {b.name!r} read different histories: "
                        f"{(a.holdout_last, a.history_service)} vs {(b.holdout_last, b.history_service)}")
    keep = pc.is_in(a.ids, value_set=b.ids).to_numpy(zero_copy_only=False)
    ids = a.ids.filter(pa.array(keep))
    x = np.hstack([a.x[keep], b.lookup(np.asarray(ids.to_pylist(), dtype=object))]).astype(np.float32)
    return EmbeddingTable(name, f"{a.source} + {b.source}", ids, x, a.holdout_last, a.history_service)


def _embed_manifest(path: str | Path) -> dict | None:
    """The ``userfm embed`` manifest of a table given as its run folder, its ``embeddings/`` folder or a
    file in it; None when there is none."""
    p = Path(path)
    for m in (p / "manifest.json", p.parent / "manifest.json", p.parent.parent / "manifest.json"):
        if m.is_file():
            info = json.loads(m.read_text())
            if info.get("kind") == "userfm.embeddings":
                return info
    return None


def pretrain_holdout(path: str | Path) -> int | None:
    """``holdout_last`` the encoder behind an embedding table was pretrained with: the embed manifest's
    ``config.model`` -> the pretraining run's ``config.json`` (``<run>/model`` is its export). None when
    the table has no manifest or its model is not a `userfm pretrain` export."""
    model = ((_embed_manifest(path) or {}).get("config") or {}).get("model")
    run_cfg = Path(model).parent / "config.json" if model else None
    if run_cfg is None or not run_cfg.is_file():
        return None
    return int(json.loads(run_cfg.read_text()).get("pretrain", {}).get("holdout_last", 0))


def random_embeddings(user_ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(n,) ids -> (n, dim) float32 N(0, 1): each user's vector depends only on (user id, seed), not on
    which other users are in the batch, so train and test users see the same vectors in every run."""
    out = np.empty((len(user_ids), dim), np.float32)
    for i, u in enumerate(user_ids):
        h = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{u}".encode(), digest_size=8).digest(), "little")
        out[i] = np.random.default_rng(h).standard_normal(dim, dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Heads (pickle-free: head.json + weights.safetensors)
# --------------------------------------------------------------------------------------------------


def _standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0).astype(np.float32)
    std = x.std(axis=0).astype(np.float32)
    return mean, np.where(std > 1e-6, std, 1.0).astype(np.float32)  # constant dims stay constant


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LinearHead:
    """Logistic regression (classification) or ridge (regression) on standardised embeddings."""

    def __init__(self, meta: dict, weights: dict[str, np.ndarray]):
        self.meta = meta  # kind "logreg" | "ridge", classes, input_dim, task, ...
        self.w = weights  # x_mean (D,), x_std (D,), coef (k', D), intercept (k',)

    @property
    def classes(self) -> list | None:
        return self.meta.get("classes")

    def decision(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float32) - self.w["x_mean"]) / self.w["x_std"]
        return z.astype(np.float64) @ self.w["coef"].T.astype(np.float64) + self.w["intercept"]  # (n, k')

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, D) embeddings -> (n, k) class probabilities (column order = ``classes``)."""
        if self.meta["kind"] not in ("logreg", "softmax"):
            raise EvalError("predict_proba: a regression head has no class probabilities; use predict")
        z = self.decision(x)
        if z.shape[1] == 1:  # binary: scikit-learn keeps one row of coefficients, for class 1
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        return _softmax(z)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) class values (classification) or predicted values (regression)."""
        if self.meta["kind"] == "ridge":
            return self.decision(x)[:, 0]
        return np.asarray(self.classes, dtype=object)[self.predict_proba(x).argmax(axis=1)]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """What the metrics read: probabilities (n, k), or values (n,) for regression."""
        return self.decision(x)[:, 0] if self.meta["kind"] == "ridge" else self.predict_proba(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k) pre-softmax scores (a retrieval head: one per catalog item, order ``classes``)."""
        return self.decision(x)


def _mlp_module(d_in: int, hidden: int, n_out: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class MLPHead:
    """U-MLP: standardise -> Linear -> ReLU -> Dropout -> Linear; softmax over classes or one value."""

    def __init__(self, meta: dict, weights: dict[str, np.ndarray]):
        import torch

        self.meta = meta  # kind "mlp", input_dim, hidden, n_out, dropout, classes, target_mean/std, ...
        self.w = weights
        self.module = _mlp_module(meta["input_dim"], meta["hidden"], meta["n_out"], meta["dropout"])
        self.module.load_state_dict({k[len("mlp."):]: torch.from_numpy(np.ascontiguousarray(v))
                                     for k, v in weights.items() if k.startswith("mlp.")})
        self.module.eval()

    @property
    def classes(self) -> list | None:
        return self.meta.get("classes")

    def _out(self, x: np.ndarray) -> np.ndarray:
        import torch

        z = (np.asarray(x, np.float32) - self.w["x_mean"]) / self.w["x_std"]
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))).double().numpy()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, D) embeddings -> (n, k) class probabilities (column order = ``classes``)."""
        if self.classes is None:
            raise EvalError("predict_proba: a regression head has no class probabilities; use predict")
        return _softmax(self._out(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.classes is None:
            return self._out(x)[:, 0] * self.meta["target_std"] + self.meta["target_mean"]
        return np.asarray(self.classes, dtype=object)[self.predict_proba(x).argmax(axis=1)]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x) if self.classes is None else self.predict_proba(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k) pre-softmax scores (a retrieval head: one per catalog item, order ``classes``)."""
        return self._out(x)


def save_head(path: str | Path, head: LinearHead | MLPHead) -> Path:
    """Write ``head.json`` (metadata, classes, task) and ``weights.safetensors`` (float32 arrays)."""
    from safetensors.numpy import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "head.json").write_text(json.dumps({"format": HEAD_FORMAT, "version": 1, **head.meta}, indent=2))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.w.items()}, str(p / "weights.safetensors"))
    return p


def load_head(path: str | Path) -> LinearHead | MLPHead:
    """Load a head saved by ``run_evaluate`` (``heads/<task>/<model>/seed<k>/``), no pickle.

    The result has ``predict_proba(embeddings (n, D)) -> (n, k)`` for classification heads (columns in
    the order of ``.classes``), and ``predict(embeddings) -> (n,)`` for every head.
    """
    from safetensors.numpy import load_file

    p = Path(path)
    if not (p / "head.json").is_file() or not (p / "weights.safetensors").is_file():
        raise EvalError(f"{p}: not a saved head (needs head.json and weights.safetensors)")
    meta = json.loads((p / "head.json").read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise EvalError(f"{p}/head.json: format is {meta.get('format')!r}, expected {HEAD_FORMAT!r}")
    weights = load_file(str(p / "weights.safetensors"))
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    if meta["kind"] == "mlp":
        return MLPHead(meta, weights)
    if meta["kind"] in ("logreg", "ridge", "softmax"):
        return LinearHead(meta, weights)
    raise EvalError(f"{p}/head.json: unknown head kind {meta['kind']!r}")


def _fit_sklearn_linear(x_tr, y_tr, x_va, y_va, regression: bool, cs: tuple[float, ...], max_iter: int, seed: int):
    """Fit one linear model per C, keep the one with the best val loss (log loss; RMSE for ridge).
    Works on dense or sparse x. Returns (model, C, its val loss)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    best, best_loss, best_c = None, math.inf, None
    for c in cs:
        if regression:
            model = Ridge(alpha=1.0 / c, random_state=seed).fit(x_tr, y_tr)
            loss = M.rmse(y_va, model.predict(x_va))
        else:
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x_tr, y_tr)
            proba = np.zeros((x_va.shape[0], int(max(y_tr.max(), y_va.max())) + 1))
            proba[:, model.classes_] = model.predict_proba(x_va)
            loss = M.log_loss(y_va, proba)
        if best is None or loss < best_loss:  # (the first fit stands if every val loss is NaN)
            best, best_loss, best_c = model, loss, c
    return best, best_c, best_loss


def fit_logreg(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
               classes: list | None, cfg: EvalConfig, seed: int) -> LinearHead:
    """Logistic regression (ridge for regression) on standardised embeddings; C picked on val loss."""
    mean, std = _standardize_stats(x_tr)
    z_tr, z_va = (x_tr - mean) / std, (x_va - mean) / std
    regression = task.type == "regression"
    model, c, _ = _fit_sklearn_linear(z_tr, y_tr, z_va, y_va, regression, cfg.logreg_c, cfg.logreg_max_iter, seed)
    if regression:
        coef, intercept = np.asarray(model.coef_, np.float64).reshape(1, -1), np.atleast_1d(model.intercept_)
    else:
        k = len(classes)
        coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
        if len(model.classes_) != k:  # a class missing from train: never predicted
            if k == 2:
                raise EvalError(f"task {task.name!r}: only one class among training users")
            full_c, full_b = np.zeros((k, coef.shape[1])), np.full(k, -1e9)
            full_c[model.classes_], full_b[model.classes_] = coef, intercept
            coef, intercept = full_c, full_b
    meta = {"kind": "ridge" if regression else "logreg", "task": dataclasses.asdict(task), "classes": classes,
            "input_dim": int(x_tr.shape[1]), "C": c, "seed": seed}
    return LinearHead(meta, {"x_mean": mean, "x_std": std, "coef": coef, "intercept": intercept})


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0 = unchanged), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_mlp(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
            classes: list | None, cfg: EvalConfig, seed: int) -> MLPHead:
    """U-MLP trained with AdamW on cross-entropy (or MSE on the standardised target), early-stopped on the
    val loss with the best epoch's weights restored."""
    with _torch_threads(cfg.torch_threads):
        return _train_mlp(x_tr, y_tr, x_va, y_va, task, classes, cfg, seed)


def _train_mlp(x_tr, y_tr, x_va, y_va, task: TaskConfig, classes: list | None, cfg: EvalConfig, seed: int) -> MLPHead:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _standardize_stats(x_tr)
    regression = task.type == "regression"
    t_mean, t_std = (float(y_tr.mean()), float(y_tr.std() or 1.0)) if regression else (0.0, 1.0)
    n_out = 1 if regression else len(classes)
    xt = torch.from_numpy(((x_tr - mean) / std).astype(np.float32))
    xv = torch.from_numpy(((x_va - mean) / std).astype(np.float32))
    if regression:
        yt = torch.from_numpy(((y_tr - t_mean) / t_std).astype(np.float32))
        yv = torch.from_numpy(((y_va - t_mean) / t_std).astype(np.float32))
        loss_fn = lambda out, y: F.mse_loss(out[:, 0], y)  # noqa: E731
    else:
        yt, yv = torch.from_numpy(y_tr.astype(np.int64)), torch.from_numpy(y_va.astype(np.int64))
        loss_fn = F.cross_entropy
    model = _mlp_module(xt.shape[1], cfg.mlp_hidden, n_out, cfg.mlp_dropout)
    best_state, best_epoch, best_loss, epochs = _early_stopped_fit(
        model, len(xt), lambda idx: loss_fn(model(xt[idx]), yt[idx]), lambda: loss_fn(model(xv), yv), cfg, gen)
    weights = {"x_mean": mean, "x_std": std, **{f"mlp.{k}": v.numpy() for k, v in best_state.items()}}
    meta = {"kind": "mlp", "task": dataclasses.asdict(task), "classes": classes, "input_dim": int(xt.shape[1]),
            "hidden": cfg.mlp_hidden, "n_out": n_out, "dropout": cfg.mlp_dropout, "target_mean": t_mean,
            "target_std": t_std, "best_epoch": best_epoch, "epochs": epochs, "val_loss": best_loss, "seed": seed}
    return MLPHead(meta, weights)


def mlp_batch(n: int, cfg: EvalConfig) -> int:
    """Mini-batch size of the early-stopped heads on ``n`` training rows: ``mlp_batch_size``, shrunk so an
    epoch has at least ``mlp_min_steps`` steps (n = 200 at 256 / 8 -> 25)."""
    return max(1, min(cfg.mlp_batch_size, math.ceil(n / cfg.mlp_min_steps)))


def _early_stopped_fit(model, n: int, batch_loss, val_loss, cfg: EvalConfig, gen) -> tuple[dict, int, float, int]:
    """:func:`userfm.train.early_stop.early_stopped_fit` with the heads' settings (``mlp_*``; :func:`mlp_batch` rows a
    batch). Returns (best epoch's state dict, best epoch, best val loss, epochs run)."""
    from userfm.train.early_stop import early_stopped_fit

    return early_stopped_fit(model, n, batch_loss, val_loss, lr=cfg.mlp_lr, weight_decay=cfg.mlp_weight_decay,
                             batch_size=mlp_batch(n, cfg), max_epochs=cfg.mlp_max_epochs, patience=cfg.mlp_patience, gen=gen)


_FITTERS = {"mlp": fit_mlp, "logreg": fit_logreg}


# --------------------------------------------------------------------------------------------------
# Next-item retrieval: heads over the item catalog, full-ranking ranks, popularity
# --------------------------------------------------------------------------------------------------


def _soft_targets(y: np.ndarray, history: list[np.ndarray], n_items: int, weight: float) -> np.ndarray:
    """(n,) held-out items + histories -> (n, n_items) float32 target distributions: 1 - ``weight`` on the
    held-out item, ``weight`` spread evenly over the earlier items (all on the held-out item when the
    history has no item)."""
    t = np.zeros((len(y), n_items), np.float32)
    for i, (item, h) in enumerate(zip(y, history)):
        if weight > 0 and len(h):
            np.add.at(t[i], h, weight / len(h))
            t[i, item] += 1.0 - weight
        else:
            t[i, item] = 1.0
    return t


def _target_mass(y: np.ndarray, history: list[np.ndarray], n_items: int, weight: float) -> np.ndarray:
    """:func:`_soft_targets` summed over users, (n_items,) float64, without the (n, n_items) matrix."""
    lens = np.array([len(h) for h in history], np.int64)
    spread = (lens > 0) & (weight > 0)
    mass = np.bincount(np.asarray(y, np.int64), weights=np.where(spread, 1.0 - weight, 1.0), minlength=n_items)
    if spread.any():
        items = np.concatenate([np.asarray(h, np.int64) for h, s in zip(history, spread) if s])
        mass += np.bincount(items, weights=np.repeat(weight / lens[spread], lens[spread]), minlength=n_items)
    return mass


class _FactorizedOutput:
    """Output layer ``h (n, H) -> h @ W.T @ V.T + b (n, n_items)`` with the item vectors ``V`` (n_items, k)
    fixed: H x k + n_items parameters instead of H x n_items, so what the head learns from one item carries
    to the items that co-occur with it. Its weight is ``V @ W`` (n_items, H): saved heads are plain layers."""

    @staticmethod
    def module(d_h: int, item_vectors: np.ndarray, bias: np.ndarray):
        import torch
        from torch import nn

        class Factorized(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(d_h, item_vectors.shape[1], bias=False)
                self.register_buffer("items", torch.from_numpy(np.ascontiguousarray(item_vectors, np.float32)))
                self.bias = nn.Parameter(torch.from_numpy(bias.astype(np.float32)))

            def forward(self, h):
                return self.proj(h) @ self.items.T + self.bias

        return Factorized()

    @staticmethod
    def dense(state: dict, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """A factorized layer's state -> (weight (n_items, H), bias (n_items,)) of the equivalent nn.Linear."""
        return ((state[prefix + "items"] @ state[prefix + "proj.weight"]).numpy(), state[prefix + "bias"].numpy())


def fit_retrieval(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
                  classes: list, cfg: EvalConfig, seed: int, history: list[np.ndarray], hidden: int = 0,
                  item_vectors: np.ndarray | None = None) -> LinearHead | MLPHead:
    """A retrieval head: frozen user vector (n, D) -> logits over the ``classes`` catalog (n, n_items).

    ``hidden`` 0: one linear layer (saved as a ``softmax`` LinearHead); > 0: the U-MLP. Trained with AdamW
    on softmax cross-entropy towards :func:`_soft_targets`, early-stopped on the val users' held-out-item
    cross-entropy with the best epoch's weights restored. ``item_vectors`` (n_items, k), k > 0: the output
    layer is factorized through these fixed item vectors (:class:`_FactorizedOutput`), its bias starting at
    the log item counts of the training targets (the popularity ranking); the saved head is the same plain
    layer either way.
    """
    with _torch_threads(cfg.torch_threads):
        import torch
        import torch.nn.functional as F
        from torch import nn

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        mean, std = _standardize_stats(x_tr)
        n_items = len(classes)
        xt = torch.from_numpy(((x_tr - mean) / std).astype(np.float32))
        xv = torch.from_numpy(((x_va - mean) / std).astype(np.float32))
        yv = torch.from_numpy(y_va.astype(np.int64))
        factorized = item_vectors is not None and item_vectors.shape[1] > 0
        if factorized:
            if item_vectors.shape[0] != n_items:
                raise ValueError(f"item_vectors has {item_vectors.shape[0]} rows for a catalog of {n_items} items")
            counts = _target_mass(y_tr, history, n_items, cfg.retrieval_history_weight)
            out = _FactorizedOutput.module(hidden or xt.shape[1], item_vectors, np.log(counts + 1.0))
            model = nn.Sequential(*list(_mlp_module(xt.shape[1], hidden, n_items, cfg.mlp_dropout))[:-1], out) if hidden else out
        else:
            model = _mlp_module(xt.shape[1], hidden, n_items, cfg.mlp_dropout) if hidden else nn.Linear(xt.shape[1], n_items)

        def batch_loss(idx):
            rows = idx.numpy()
            target = torch.from_numpy(_soft_targets(y_tr[rows], [history[i] for i in rows], n_items,
                                                    cfg.retrieval_history_weight))
            return F.cross_entropy(model(xt[idx]), target)

        best_state, best_epoch, best_loss, epochs = _early_stopped_fit(
            model, len(xt), batch_loss, lambda: F.cross_entropy(model(xv), yv), cfg, gen)
    meta = {"task": dataclasses.asdict(task), "classes": classes, "input_dim": int(xt.shape[1]), "best_epoch": best_epoch,
            "epochs": epochs, "val_loss": best_loss, "seed": seed, "history_weight": cfg.retrieval_history_weight,
            "item_factors": int(item_vectors.shape[1]) if factorized else 0}
    if factorized:  # the equivalent plain output layer
        last = "3." if hidden else ""  # the output layer's index in _mlp_module's Sequential
        weight, bias = _FactorizedOutput.dense(best_state, last)
        best_state = {k: v for k, v in best_state.items() if hidden and not k.startswith(last)}
        best_state.update({f"{last}weight": torch.from_numpy(weight), f"{last}bias": torch.from_numpy(bias)})
    if hidden:
        meta.update(kind="mlp", hidden=hidden, n_out=n_items, dropout=cfg.mlp_dropout, target_mean=0.0, target_std=1.0)
        return MLPHead(meta, {"x_mean": mean, "x_std": std, **{f"mlp.{k}": v.numpy() for k, v in best_state.items()}})
    return LinearHead({**meta, "kind": "softmax"}, {"x_mean": mean, "x_std": std, "coef": best_state["weight"].numpy(),
                                                    "intercept": best_state["bias"].numpy()})


def retrieval_ranks(score_fn: Callable[[np.ndarray], np.ndarray], n: int, target: np.ndarray,
                    seen: list[np.ndarray] | None = None, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each user's held-out item in the full catalog ranking, ``chunk`` users at a time.

    ``score_fn(rows)`` -> (len(rows), n_items) scores of users ``rows``; ``seen`` (per user, catalog indices)
    are removed from the ranking when given (the target itself never is). Returns (n,) int64.
    """
    out = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        scores = np.asarray(score_fn(rows))
        exclude = None
        if seen is not None:
            exclude = np.zeros(scores.shape, bool)
            for j, r in enumerate(rows):
                exclude[j, seen[r]] = True
        out[rows] = M.target_rank(scores, target[rows], exclude)
    return out


def _item_counts(td: TaskData) -> np.ndarray:
    """(n_items,) float64 item counts over the training users' events, held-out ones included."""
    return np.bincount(np.concatenate([*td.history["train"], td.y["train"]]).astype(np.int64),
                       minlength=len(td.classes)).astype(np.float64)


def _popularity_ranks(td: TaskData, seen: list[np.ndarray] | None,
                      remove_seen: bool = False) -> tuple[np.ndarray, float, float]:
    """Popularity baseline: item counts over training users' events (held-out ones included) -> test ranks.

    ``remove_seen``: the scorer itself drops each user's history items (score -inf, so a held-out repeat
    ranks last); ``seen`` is the protocol's masking (the target never masked), applied to every model.
    """
    t0 = time.perf_counter()
    n_items = len(td.classes)
    pop = _item_counts(td)
    t1 = time.perf_counter()
    hist = td.history["test"]

    def score(rows):
        s = np.repeat(pop[None, :], len(rows), axis=0)
        if remove_seen:
            for j, r in enumerate(rows):
                s[j, hist[r]] = -np.inf
        return s

    ranks = retrieval_ranks(score, len(td.y["test"]), td.y["test"], seen)
    return ranks, t1 - t0, time.perf_counter() - t1


def _sasrec_ranks(td: TaskData, seen: list[np.ndarray] | None, cfg: EvalConfig) -> tuple[np.ndarray, float, float, dict]:
    """SASRec from scratch (``userfm.eval.sasrec``) on the training users' whole sequences (held-out item last),
    early-stopped on the val users' held-out items -> (test ranks, fit s, infer s, info)."""
    from userfm.eval.sasrec import SASRecConfig, fit_sasrec, sasrec_scorer

    t0 = time.perf_counter()
    scfg = SASRecConfig(max_len=cfg.sasrec_max_len, dim=cfg.sasrec_dim, layers=cfg.sasrec_layers,
                        max_epochs=cfg.sasrec_max_epochs, patience=cfg.sasrec_patience, seed=cfg.seed)
    model, info = fit_sasrec([np.append(h, y) for h, y in zip(td.history["train"], td.y["train"])],
                             td.history["val"], td.y["val"], len(td.classes), scfg)
    t1 = time.perf_counter()
    ranks = retrieval_ranks(sasrec_scorer(model, td.history["test"], scfg.max_len), len(td.y["test"]), td.y["test"], seen)
    info["val_loss"] = _num(info["val_loss"]) if info["val_loss"] is not None else None
    return ranks, t1 - t0, time.perf_counter() - t1, info


def _item_knn_ranks(td: TaskData, seen: list[np.ndarray] | None, cfg: EvalConfig) -> tuple[np.ndarray, float, float, dict]:
    """Item-kNN baseline (``userfm.eval.item_knn``): cosine over the training users' whole histories; the number
    of last items read is chosen on the val users' HR@10 (their held-out items) -> (test ranks, fit s,
    infer s, {"last", "val_hr@10" per candidate})."""
    from userfm.eval.item_knn import item_cosine, knn_scorer

    t0 = time.perf_counter()
    n_items = len(td.classes)
    pop = _item_counts(td)
    sim = item_cosine([np.append(h, y) for h, y in zip(td.history["train"], td.y["train"])], n_items)
    val_seen = td.excluded("val", cfg.retrieval_mask_seen)
    val = {}
    for m in cfg.item_knn_last:
        ranks = retrieval_ranks(knn_scorer(sim, td.history["val"], m, pop), len(td.y["val"]), td.y["val"], val_seen)
        val[m] = M.hit_rate_at_k(ranks, 10)
    best = max(cfg.item_knn_last, key=lambda m: val[m])  # the first of equals: the order given
    t1 = time.perf_counter()
    ranks = retrieval_ranks(knn_scorer(sim, td.history["test"], best, pop), len(td.y["test"]), td.y["test"], seen)
    return ranks, t1 - t0, time.perf_counter() - t1, {"last": best, "val_hr@10": {str(m): _num(v) for m, v in val.items()},
                                                      "similar_pairs": int(sim.nnz)}


# --------------------------------------------------------------------------------------------------
# TF-IDF baseline
# --------------------------------------------------------------------------------------------------


def _event_texts(data: str | Path, holdout: int = 0, service: str = "") -> pa.Table:
    """user_id and text (list of the user's event texts, oldest first) without each user's last ``holdout``
    (and, ``service`` set, only that service's events)."""
    from userfm.infer.embed import read_history

    return read_history(data, ["user_id", "text"], holdout, service)


def user_texts(data: str | Path, holdout: int = 0, service: str = "") -> dict[str, str]:
    """user id -> the texts of the user's kept events (scope "all"), one per line, without the last ``holdout``
    (``service``: that service's events only)."""
    t = _event_texts(data, holdout, service)
    return {u: "\n".join(x or []) for u, x in zip(t.column("user_id").to_pylist(), t.column("text").to_pylist())}


def minilm_mean_table(data: str | Path, holdout: int = 0, cache_dir: str | Path = "", encoder=None,
                      progress: Callable[[str], None] = print, service: str = "") -> EmbeddingTable:
    """The mean-MiniLM baseline table: each user's mean of the frozen all-MiniLM-L6-v2 vectors of their
    event texts (every event counts, repeated texts as often as they occur), without the last ``holdout``
    events (``service``: only that service's). A user with no event left gets the zero vector.

    Vectors come from the MiniLM cache (:mod:`userfm.models.minilm`; ``cache_dir`` "" = ``<data>/minilm_cache``);
    texts missing from it are encoded (``encoder``, default the packaged model, loaded only then) and
    appended to it, so a second call encodes nothing. Returns an (n_users, 384) float32 table.
    """
    import scipy.sparse as sp

    from userfm.models.features import text_hash
    from userfm.models.minilm import VectorCache, build_cache

    cache_dir = Path(cache_dir or Path(data) / "minilm_cache")
    t = _event_texts(data, holdout, service)
    lists = t.column("text").combine_chunks()
    flat = lists.flatten()  # (n_events,) the kept events' texts
    uniq = pc.unique(flat)  # (U,) distinct texts
    col = pc.index_in(flat, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)  # event -> distinct text
    texts = uniq.to_pylist()
    stats = build_cache(texts, cache_dir, encoder=encoder)
    progress(f"[evaluate] {MINILM_MEAN} (holdout {holdout}{f', {service} events only' if service else ''}): {len(flat):,} events, {stats['n_unique']:,} distinct texts, "
             f"{stats['n_reused']:,} from {cache_dir}, {stats['n_new']:,} encoded now")
    vectors = VectorCache.load(cache_dir).lookup(text_hash(texts), strict=True)  # (U, 384)
    off = lists.offsets.to_numpy()
    off = (off - off[0]).astype(np.int64)
    n_ev = np.diff(off)
    # (n_users, U) averaging matrix: row u puts 1/n_u on the distinct text of each of its n_u events
    avg = sp.csr_matrix((np.repeat(1.0 / np.maximum(n_ev, 1), n_ev), col, off), shape=(len(n_ev), len(texts)))
    x = np.asarray(avg @ vectors.astype(np.float64), dtype=np.float32)
    return EmbeddingTable(MINILM_MEAN, MINILM_MEAN, t.column("user_id").combine_chunks(), x, holdout, service)


@dataclass
class TfidfFeatures:
    """TF-IDF of each labelled user's texts, fitted on the task's training users."""

    x: dict[str, Any]  # split -> (n, vocab) scipy CSR float32, unit-norm rows
    vocab: int  # number of terms kept (columns)
    fit_s: float  # seconds to fit the vectorizer and transform train + val
    transform_test_s: float  # seconds to transform the test users' texts


def tfidf_features(td: TaskData, texts: dict[str, str], cfg: EvalConfig) -> TfidfFeatures:
    """Unigram + bigram TF-IDF (sublinear tf) fitted on train users only, applied to every split."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = {s: [texts.get(u, "") for u in td.ids[s]] for s in td.ids}
    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=min(cfg.tfidf_min_df, len(docs["train"])),
                          max_features=cfg.tfidf_max_features, dtype=np.float32)
    x = {"train": vec.fit_transform(docs["train"]), "val": vec.transform(docs["val"])}
    t1 = time.perf_counter()
    x["test"] = vec.transform(docs["test"])
    return TfidfFeatures(x, len(vec.vocabulary_), t1 - t0, time.perf_counter() - t1)


def _linear_scores(td: TaskData, x: dict[str, Any], cfg: EvalConfig, seed: int, weights: tuple[float, ...] = (1.0,),
                   weigh: Callable[[dict, float], dict] | None = None) -> tuple[np.ndarray, float, float, dict]:
    """Logistic regression (ridge) on features ``x`` (split -> dense or sparse matrix), C chosen on the val
    loss; with ``weigh``, jointly with a factor ``w`` of ``weights`` (``weigh(x, w)`` builds its features).

    Returns (test scores: (n, k) probabilities or (n,) values, fit s, predict s,
    {"C", "val_loss", and "tfidf_weight" (the factor) with ``weigh``}).
    """
    t0 = time.perf_counter()
    regression = td.task.type == "regression"
    best = (None, None, None, math.inf, None)  # model, C, factor, val loss, test features
    for w in weights if weigh else (1.0,):
        xw = weigh(x, w) if weigh else x
        model, c, loss = _fit_sklearn_linear(xw["train"], td.y["train"], xw["val"], td.y["val"], regression,
                                             cfg.logreg_c, cfg.logreg_max_iter, seed)
        if best[0] is None or loss < best[3]:
            best = (model, c, w, loss, xw["test"])
    model, c, w, loss, x_te = best
    t1 = time.perf_counter()
    if regression:
        scores = model.predict(x_te)
    else:
        scores = np.zeros((x_te.shape[0], len(td.classes)))
        scores[:, model.classes_] = model.predict_proba(x_te)
    info = {"C": c, "val_loss": _num(loss)}
    if weigh:
        info["tfidf_weight"] = w
    return scores, t1 - t0, time.perf_counter() - t1, info


def _tfidf_scores(td: TaskData, feats: TfidfFeatures, cfg: EvalConfig, seed: int) -> tuple[np.ndarray, float, float, dict]:
    """TF-IDF + logistic regression (ridge), C on val -> (test scores, train s, infer s, info)."""
    scores, fit_s, pred_s, info = _linear_scores(td, feats.x, cfg, seed)
    return scores, feats.fit_s + fit_s, feats.transform_test_s + pred_s, {"features": feats.vocab, **info}


def _bag_of_items_scores(td: TaskData, items: dict[str, list[str]], cfg: EvalConfig,
                         seed: int) -> tuple[np.ndarray, float, float, dict]:
    """Binary user x item matrix (``userfm.eval.bag_of_items``) + logistic regression (ridge), C on val."""
    from userfm.eval.bag_of_items import bag_of_items

    t0 = time.perf_counter()
    x, n_items = bag_of_items({s: [items.get(u, []) for u in td.ids[s]] for s in td.ids})
    build_s = time.perf_counter() - t0
    scores, fit_s, pred_s, info = _linear_scores(td, x, cfg, seed)
    return scores, build_s + fit_s, pred_s, {"features": n_items, **info}


def concat_features(emb: dict[str, np.ndarray], feats: TfidfFeatures, weight: float = 1.0) -> dict[str, Any]:
    """split -> CSR (n, D + vocab): [standardised embedding | weight * sqrt(D) * TF-IDF].

    The embedding is standardised with the train split's mean and std (constant dims stay constant), so
    its rows have norm ~ sqrt(D); TF-IDF rows have norm 1: at ``weight`` 1 both blocks weigh the same.
    """
    import scipy.sparse as sp

    mean, std = _standardize_stats(emb["train"])
    scale = np.float32(weight * math.sqrt(emb["train"].shape[1]))
    return {s: sp.hstack([sp.csr_matrix((emb[s] - mean) / std), feats.x[s] * scale], format="csr") for s in emb}


def _concat_scores(td: TaskData, emb: dict[str, np.ndarray], feats: TfidfFeatures, cfg: EvalConfig,
                   seed: int) -> tuple[np.ndarray, float, float, dict]:
    """Embedding + TF-IDF, logistic regression (ridge); C and the TF-IDF block's factor chosen on val."""
    scores, fit_s, pred_s, info = _linear_scores(td, emb, cfg, seed, cfg.concat_tfidf_weights,
                                                 lambda e, w: concat_features(e, feats, w))
    dim = int(emb["train"].shape[1])
    return scores, feats.fit_s + fit_s, feats.transform_test_s + pred_s, {
        "embedding_dim": dim, "tfidf_features": feats.vocab, "n_features": dim + feats.vocab, **info}


# --------------------------------------------------------------------------------------------------
# T-Trans baseline (ShopperBERT's task-specific transformer trained from scratch)
# --------------------------------------------------------------------------------------------------

SEQ_COLUMNS = ["user_id", "ts", "service", "text", "category"]


def _take_rows(seqs: pa.Table, ids: np.ndarray) -> pa.Table:
    idx = pc.index_in(pa.array(ids, pa.string()), value_set=seqs.column("user_id").combine_chunks())
    return seqs.take(idx)


def _slice_batch(batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``idx`` of a padded batch, with the event axis cut to the longest of those rows."""
    width = max(int(batch["length"][idx].max()), 1)
    return {k: (v[idx] if v.ndim == 1 else v[idx, :width]) for k, v in batch.items()}


@dataclass
class _TTransInputs:
    """A task's users featurized once for every T-Trans fit (each seed, each learning rate)."""

    batches: dict[str, dict[str, np.ndarray]]  # split -> padded batch (features.make_batch)
    target: dict[str, Any]  # split -> (n,) torch int64 class index, or float32 standardised value
    enc_cfg: Any  # encoders.EncoderConfig
    n_out: int  # classifier outputs: classes (catalog items for retrieval), 1 for regression
    t_mean: float  # regression target mean / std on train (0 / 1 otherwise)
    t_std: float
    featurize_s: float  # seconds spent fitting vocabularies / BPE and building the batches


def _ttrans_inputs(td: TaskData, seqs: pa.Table, cfg: EvalConfig) -> _TTransInputs:
    """Featurize the task's users. Vocabularies (and the BPE tokenizer for the "text" item encoder) are
    fitted on the training users only, so nothing about val/test users leaks in.

    ``seqs`` must already lack the held-out events of a last_event task (see ``run_evaluate``).
    """
    import torch

    from userfm.models.encoders import config_for
    from userfm.models.features import FeatureConfig, fit_vocabs, make_batch
    from userfm.models.tokenizer import TextTokenizer

    t0 = time.perf_counter()
    rows = {s: _take_rows(seqs, td.ids[s]) for s in td.ids}
    fcfg = FeatureConfig(max_events=cfg.t_trans_max_events, max_text_tokens=cfg.t_trans_max_text_tokens)
    vocabs = fit_vocabs(rows["train"], fcfg)
    tok = None
    if cfg.t_trans_item_encoder == "text":
        texts = [t for lst in rows["train"].column("text").to_pylist() for t in (lst or [])]
        tok = TextTokenizer.fit(texts, vocab_size=cfg.t_trans_text_vocab)
    batches = {s: make_batch(rows[s], vocabs, tok) for s in rows}
    regression = td.task.type == "regression"
    y = td.y
    t_mean, t_std = (float(y["train"].mean()), float(y["train"].std() or 1.0)) if regression else (0.0, 1.0)
    if regression:
        target = {s: torch.from_numpy(((y[s] - t_mean) / t_std).astype(np.float32)) for s in y}
    else:
        target = {s: torch.from_numpy(y[s].astype(np.int64)) for s in y}
    enc_cfg = config_for(cfg.t_trans_size, vocabs, tok, item_encoder=cfg.t_trans_item_encoder)
    return _TTransInputs(batches, target, enc_cfg, 1 if regression else len(td.classes), t_mean, t_std,
                         time.perf_counter() - t0)


def _ttrans_fit(inp: _TTransInputs, td: TaskData, cfg: EvalConfig, seed: int, lr: float) -> tuple[np.ndarray, float, float, dict]:
    """Train UserEncoder + Linear end to end on the task's train users at learning rate ``lr``, early-stopped
    on the val loss (best epoch's weights restored), and score the test users.

    A retrieval task is a classification over the catalog (held-out item only); its "scores" are ranks.
    Returns (test scores, train s (without featurizing), infer s, info incl. the best ``val_loss``).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from userfm.models.encoders import UserEncoder, num_params
    from userfm.models.features import to_torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    regression = td.task.type == "regression"
    retrieval = td.task.type == "retrieval"
    loss_fn = (lambda out, t: F.mse_loss(out[:, 0], t)) if regression else F.cross_entropy  # noqa: E731
    model = nn.ModuleDict({"encoder": UserEncoder(inp.enc_cfg), "head": nn.Linear(inp.enc_cfg.embed_dim, inp.n_out)})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def forward(split: str, idx: np.ndarray):
        return model["head"](model["encoder"](to_torch(_slice_batch(inp.batches[split], idx))))

    def predict(split: str) -> torch.Tensor:
        model.eval()
        n = len(td.ids[split])
        with torch.no_grad():
            return torch.cat([forward(split, np.arange(i, min(i + 256, n))) for i in range(0, n, 256)])

    best_loss, best_state, best_epoch, bad, epochs = math.inf, None, 0, 0, 0
    for epoch in range(cfg.t_trans_max_epochs):
        epochs = epoch + 1
        model.train()
        for idx in torch.randperm(len(td.ids["train"]), generator=gen).split(cfg.t_trans_batch_size):
            loss = loss_fn(forward("train", idx.numpy()), inp.target["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = float(loss_fn(predict("val"), inp.target["val"]))
        if val < best_loss - 1e-6:
            best_loss, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.t_trans_patience:
                break
    model.load_state_dict(best_state or model.state_dict())  # None only if every val loss was NaN
    t1 = time.perf_counter()
    out = predict("test").double()
    if retrieval:  # what the metrics read: the held-out item's rank in the catalog
        logits = out.numpy()
        scores = retrieval_ranks(lambda r: logits[r], len(logits), td.y["test"],
                                 td.excluded("test", cfg.retrieval_mask_seen))
    else:
        scores = (out[:, 0] * inp.t_std + inp.t_mean).numpy() if regression else torch.softmax(out, dim=1).numpy()
    info = {"params": num_params(model), "best_epoch": best_epoch, "epochs": epochs, "val_loss": best_loss, "lr": lr,
            "encoder": dataclasses.asdict(inp.enc_cfg)}
    return scores, t1 - t0, time.perf_counter() - t1, info


def _ttrans_runs(td: TaskData, seqs: pa.Table, cfg: EvalConfig, seeds: list[int]) -> tuple[list, list, list, dict]:
    """T-Trans tuned on val: the first seed trains once per learning rate of ``t_trans_lrs``; the rate with
    the lowest early-stopped val loss wins and the other seeds train at it only.

    Returns (test scores per seed, train s per seed (featurizing + one fit at the chosen rate), infer s
    per seed, info: params, encoder, epochs / best_epoch per seed, ``lr`` chosen, ``lr_grid`` (each rate's
    val loss) and ``lr_search_s`` (all first-seed fits)).
    """
    inp = _ttrans_inputs(td, seqs, cfg)
    t0 = time.perf_counter()
    grid = [_ttrans_fit(inp, td, cfg, seeds[0], lr) for lr in cfg.t_trans_lrs]
    search_s = time.perf_counter() - t0
    losses = [g[3]["val_loss"] for g in grid]
    best = min(range(len(grid)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    lr = cfg.t_trans_lrs[best]
    runs = [grid[best]] + [_ttrans_fit(inp, td, cfg, s, lr) for s in seeds[1:]]
    info = {"params": runs[0][3]["params"], "encoder": runs[0][3]["encoder"], "lr": lr,
            "lr_grid": [{"lr": g[3]["lr"], "val_loss": _num(g[3]["val_loss"]), "best_epoch": g[3]["best_epoch"],
                         "epochs": g[3]["epochs"]} for g in grid],
            "lr_search_s": round(search_s, 4),
            "epochs": [r[3]["epochs"] for r in runs], "best_epoch": [r[3]["best_epoch"] for r in runs]}
    return ([r[0] for r in runs], [inp.featurize_s + r[1] for r in runs], [r[2] for r in runs], info)


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def _interval(metric: str, y: np.ndarray, scores: list[np.ndarray], mask: np.ndarray | None, cfg: EvalConfig) -> dict:
    """Seed-mean of ``metric`` and its bootstrap interval over (a subset of) test users."""
    if mask is not None:
        y, scores = y[mask], [s[mask] for s in scores]

    def stat(yy, *ss):
        return float(np.mean([M.compute(metric, yy, s) for s in ss]))

    value, lo, hi = M.bootstrap_interval(stat, [y, *scores], cfg.bootstrap_samples, cfg.seed, cfg.confidence)
    return {"value": _num(value), "ci": [_num(lo), _num(hi)], "n": int(len(y))}


def _difference(metric: str, y: np.ndarray, scores: list[np.ndarray], floor: list[np.ndarray], cfg: EvalConfig,
                mask: np.ndarray | None = None) -> dict:
    """Paired bootstrap interval of (this model - the other) on the same test users (those of ``mask``,
    e.g. the cold ones, when given): seed means of both sides, one set of resampled users for both."""
    if mask is not None:
        y, scores, floor = y[mask], [s[mask] for s in scores], [s[mask] for s in floor]

    def stat(yy, *ss):
        return float(np.mean([M.compute(metric, yy, s) for s in ss]))

    value, lo, hi = M.bootstrap_difference(stat, [y, *scores], [y, *floor], paired=True, n_samples=cfg.bootstrap_samples,
                                           seed=cfg.seed, level=cfg.confidence)
    return {"value": _num(value), "ci": [_num(lo), _num(hi)], "n": int(len(y))}


YARDSTICKS = ("tfidf/logreg", "bag-of-items/logreg", "popularity", "popularity-unseen", "item-knn", "sasrec")  # no pretraining


def best_yardstick(rows: list[dict]) -> str | None:
    """The model name of the best no-pretraining row of one task (``YARDSTICKS`` and ``minilm-mean/*``) by its
    test value: what a pretrained table must beat. Picked on test, so it favours the yardstick, never the
    pretrained model. None when none ran."""
    yard = [r for r in rows if (r["model"] in YARDSTICKS or r["model"].startswith(MINILM_MEAN + "/"))
            and r["test"]["value"] is not None]
    if not yard:
        return None
    sign = 1.0 if yard[0]["higher_is_better"] else -1.0
    return max(yard, key=lambda r: sign * r["test"]["value"])["model"]


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def _row(td: TaskData, model: str, embedding: str | None, head: str, scores: list[np.ndarray], cold: np.ndarray,
         heavy: np.ndarray, train_s: list[float], infer_s: list[float], cfg: EvalConfig, heads: list[str]) -> dict:
    task, y = td.task, td.y["test"]
    per_seed = [_num(M.compute(task.metric, y, s)) for s in scores]
    return {
        "task": task.name,
        "model": model,
        "embedding": embedding,
        "head": head,
        "metric": task.metric,
        "higher_is_better": M.HIGHER_IS_BETTER[task.metric],
        "test": _interval(task.metric, y, scores, None, cfg),
        "cold": _interval(task.metric, y, scores, cold, cfg),
        "heavy": _interval(task.metric, y, scores, heavy, cfg),
        "per_seed": per_seed,
        "std_over_seeds": _num(float(np.std([p for p in per_seed if p is not None]))) if len(per_seed) > 1 else 0.0,
        "other_metrics": {m: _num(float(np.mean([M.compute(m, y, s) for s in scores]))) for m in SECONDARY_METRICS[task.type]},
        "train_s": round(float(np.mean(train_s)), 4),
        "infer_s": round(float(np.mean(infer_s)), 4),
        "infer_users_per_s": round(len(y) / max(float(np.mean(infer_s)), 1e-9), 1),
        "heads": heads,
    }


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _find_ground_truth(cfg: EvalConfig, manifest: dict) -> Path | None:
    if not cfg.ground_truth:
        return None
    if cfg.ground_truth != "auto":
        p = Path(cfg.ground_truth)
        if not p.is_file():
            raise EvalError(f"ground_truth: no file {p}")
        return p
    candidates = [Path(cfg.data) / "ground_truth.json"]
    for inp in manifest.get("config", {}).get("inputs", []):
        if "://" not in inp:
            candidates += [Path(inp) / "ground_truth.json", Path(inp).parent / "ground_truth.json"]
    return next((c for c in candidates if c.is_file()), None)


def _available(cfg: EvalConfig, tasks: tuple[TaskConfig, ...], manifest: dict,
               progress: Callable[[str], None]) -> tuple[tuple[TaskConfig, ...], list[dict]]:
    """Tasks whose table this dataset has, and the others with the reason they are skipped (e.g. the
    MovieLens gender task on ml-latest, which has no user attributes). Every task skipped is an error."""
    names = [a["name"] for a in manifest.get("attributes", [])]
    keep, skipped = [], []
    for t in tasks:
        if t.table == LAST_EVENT or t.table in names:
            keep.append(t)
        else:
            reason = f"no attributes table {t.table!r} in {cfg.data}; ingested tables: {names}"
            skipped.append({"task": t.name, "reason": reason})
            progress(f"[evaluate] skipping task {t.name}: {reason}")
    if not keep:
        raise EvalError("no task can run: " + "; ".join(f"task {s['task']!r}: {s['reason']}" for s in skipped))
    return tuple(keep), skipped


def _check(cfg: EvalConfig, tasks: tuple[TaskConfig, ...], manifest: dict, tables: dict[str, pa.Table],
           real: dict[str, "EmbeddingTable"], progress: Callable[[str], None] = print) -> None:
    """Fail before any training: every task's column exists, held-out-event tasks get leave-one-out tables
    (and, cross-fitted, encoders pretrained without the held-out events: folds score the users the encoder
    was pretrained on)."""
    if cfg.folds and any(t.table == LAST_EVENT for t in tasks):
        for name, table in real.items():
            held = pretrain_holdout(table.source)
            if held is not None and held < max(t.holdout for t in tasks):
                raise EvalError(
                    f"folds={cfg.folds} scores every user, including the encoder's pretraining users, and embeddings {name!r} "
                    f"come from an encoder pretrained on whole histories (holdout_last={held}): it has seen the held-out "
                    f"events of tasks on table {LAST_EVENT}. Pretrain with `--set holdout_last=1`, or evaluate without folds")
            if held is None:
                progress(f"[evaluate] warning: cannot tell whether the encoder behind embeddings {name!r} was pretrained "
                         f"without the held-out events (no `userfm pretrain` config found); cross-fitted {LAST_EVENT} "
                         f"tasks assume it was")
    for t in tasks:
        if t.table == LAST_EVENT:
            for name, table in real.items():
                if table.holdout_last != t.holdout:
                    made = "unknown (no holdout_last column or embed manifest)" if table.holdout_last is None else table.holdout_last
                    raise EvalError(
                        f"task {t.name!r} holds out each user's last {t.holdout} event(s), but embeddings {name!r} "
                        f"({table.source}) were made with holdout_last={made}: they may have seen the label (or miss "
                        f"history). Embed with `userfm embed --set holdout_last={t.holdout}` and evaluate the tasks of "
                        f"each holdout (table {LAST_EVENT}) in a run of their own")
        for name, table in real.items():
            if table.history_service != t.history_service:
                raise EvalError(
                    f"task {t.name!r} reads {t.history_service + ' events only' if t.history_service else 'every event'}"
                    f" (history {t.history!r}), but embeddings {name!r} ({table.source}) were made from "
                    f"{repr(table.history_service) + ' events only' if table.history_service else 'every event'}. Embed "
                    f"with `userfm embed --set history_service={t.history_service}` and evaluate the tasks of each "
                    f"history in a run of their own")
        if t.target not in tables[t.label_table].column_names and not (t.table == LAST_EVENT and _category_level(t.target) is not None):
            cols = [c for c in tables[t.label_table].column_names if c not in ("user_id", "split")]
            raise EvalError(f"task {t.name!r}: column {t.target!r} is not in table {t.table!r} (columns: {cols})")
        if t.users.startswith("service:") and t.users.split(":", 1)[1] not in manifest["services"]:
            raise EvalError(f"task {t.name!r}: users {t.users!r}: no service of that name; services: {sorted(manifest['services'])}")


def run_evaluate(cfg: EvalConfig, progress: Callable[[str], None] = print) -> dict:
    """Evaluate every (embedding table x head) and baseline on every task; write and return the results.

    Returns the dict written to ``<out>/results.json``: ``config``, ``dataset``, ``embeddings``,
    ``tasks`` (per task: users by split, classes, cold/heavy thresholds, users left out and why),
    ``rows`` (one per model x task, see ``_row``; plus ``vs_random``, ``paired`` {baseline: {test, cold}},
    and what val chose: ``tfidf`` / ``concat`` / ``t_trans``), ``charts`` and ``timings_s``.
    """
    t_start = time.perf_counter()
    if not cfg.data:
        raise ConfigError("data is required (a dataset folder from `userfm ingest`)")
    if not cfg.out:
        raise ConfigError("out is required (the run folder for results)")
    manifest = load_manifest(cfg.data)
    tasks, skipped_tasks = _available(cfg, load_tasks(cfg.tasks, cfg.only_tasks), manifest, progress)
    tables = {name: _attribute_table(cfg.data, name) for name in sorted({t.label_table for t in tasks})}
    real = {n: load_embeddings(p, n) for n, p in cfg.embeddings.items() if p != RANDOM}
    _check(cfg, tasks, manifest, tables, real, progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    rand_dim = cfg.random_dim or (next(iter(real.values())).dim if real else 64)
    emb_info = {n: {"source": t.source, "dim": t.dim, "users": len(t.ids), "holdout_last": t.holdout_last} for n, t in real.items()}
    emb_info.update({n: {"source": RANDOM, "dim": rand_dim, "users": None} for n, p in cfg.embeddings.items() if p == RANDOM})
    users = user_table(cfg.data)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    # The random floor, one table per seed over every user, generated once and looked up like a real table.
    rand = {}
    if RANDOM in cfg.embeddings.values():
        all_ids = users.column("user_id").combine_chunks()
        rand = {s: EmbeddingTable(RANDOM, RANDOM, all_ids, random_embeddings(all_ids.to_numpy(zero_copy_only=False), rand_dim, s))
                for s in seeds}
    # Per view (holdout, history service) of the tasks: texts / items / sequences of the history the models
    # read (without the held-out events; one service's events only for a transfer task), built once.
    texts_by, seqs_by = {}, {}

    def texts(v: tuple[int, str]) -> dict[str, str]:
        if v not in texts_by:
            texts_by[v] = user_texts(cfg.data, *v)
        return texts_by[v]

    items_by: dict[tuple[int, str], dict[str, list[str]]] = {}

    def items(v: tuple[int, str]) -> dict[str, list[str]]:
        if v not in items_by:
            from userfm.eval.bag_of_items import user_items

            items_by[v] = user_items(cfg.data, *v)
        return items_by[v]

    minilm_by: dict[tuple[int, str], EmbeddingTable] = {}

    def minilm(v: tuple[int, str]) -> EmbeddingTable:
        if v not in minilm_by:
            minilm_by[v] = minilm_mean_table(cfg.data, v[0], cfg.minilm_cache, progress=progress, service=v[1])
        return minilm_by[v]

    def seqs(v: tuple[int, str]) -> pa.Table:
        if v not in seqs_by:
            from userfm.infer.embed import read_history

            seqs_by[v] = read_history(cfg.data, SEQ_COLUMNS, *v)
        return seqs_by[v]

    gt_path = _find_ground_truth(cfg, manifest) if "oracle" in cfg.baselines else None
    truth = json.loads(gt_path.read_text()) if gt_path else None

    # Imported before any clock starts, so the first head's train_s does not include import time.
    if "mlp" in cfg.heads or "t-trans" in cfg.baselines:
        import torch  # noqa: F401
    if "logreg" in cfg.heads or {"tfidf", "concat-tfidf"} & set(cfg.baselines):
        import scipy.sparse  # noqa: F401
        import sklearn.feature_extraction.text  # noqa: F401
        import sklearn.linear_model  # noqa: F401

    def score_models(td: TaskData, fold: int | None = None) -> dict[str, dict]:
        """Fit every (table x head) and baseline on ``td``'s train users (selection on val) and score its
        test users: model -> {scores (one per seed), train_s, infer_s, saved, embedding, head, extra}."""
        task = td.task
        retrieval = task.type == "retrieval"
        seen = td.excluded("test", cfg.retrieval_mask_seen) if retrieval else None
        item_vectors = None
        if retrieval and cfg.retrieval_item_factors:  # no labels: the training users' histories only
            from userfm.models.cooc import catalog_vectors

            item_vectors = catalog_vectors(td.history["train"], len(td.classes), cfg.retrieval_item_factors, cfg.seed)
        fitted_models: dict[str, dict] = {}

        def record(model, embedding, head, scores, tr_s, inf_s, saved=(), **extra):
            fitted_models[model] = {"embedding": embedding, "head": head, "scores": scores, "train_s": list(tr_s),
                                    "infer_s": list(inf_s), "saved": list(saved), "extra": extra}

        # every embedding table, then the mean-MiniLM one: the same heads, seeds and users
        tables_here = list(cfg.embeddings.items()) + ([(MINILM_MEAN, MINILM_MEAN)] if MINILM_MEAN in cfg.baselines else [])
        if CONCAT_MINILM in cfg.baselines:  # every real table + the mean MiniLM vector (after every plain table)
            tables_here += [(f"{e}+{MINILM_MEAN}", CONCAT_MINILM) for e, src in cfg.embeddings.items() if src != RANDOM]
        concats: dict[str, EmbeddingTable] = {}

        def table_of(emb_name: str, source: str, seed: int) -> EmbeddingTable:
            if source == CONCAT_MINILM:
                if emb_name not in concats:
                    concats[emb_name] = concat_tables(real[emb_name.split("+")[0]], minilm(td.view), emb_name)
                return concats[emb_name]
            return rand[seed] if source == RANDOM else minilm(td.view) if source == MINILM_MEAN else real[emb_name]

        for emb_name, source in tables_here:
            for head in cfg.heads:
                scores, tr_s, inf_s, saved = [], [], [], []
                # lbfgs logistic regression on a fixed table is deterministic: one fit serves every seed
                # (the random table changes with the seed, so its logreg is refitted).
                # (A retrieval "logreg" is a linear layer trained with torch: seeded, refitted per seed.)
                fit_seeds = seeds[:1] if head == "logreg" and source != RANDOM and not retrieval else seeds
                for seed in fit_seeds:
                    table = table_of(emb_name, source, seed)
                    x = {s: table.lookup(td.ids[s]) for s in td.ids}
                    t0 = time.perf_counter()
                    if retrieval:
                        fitted = fit_retrieval(x["train"], td.y["train"], x["val"], td.y["val"], task=task, classes=td.classes,
                                               cfg=cfg, seed=seed, history=td.history["train"],
                                               hidden=cfg.mlp_hidden if head == "mlp" else 0, item_vectors=item_vectors)
                    else:
                        fitted = _FITTERS[head](x["train"], td.y["train"], x["val"], td.y["val"], task=task,
                                                classes=td.classes, cfg=cfg, seed=seed)
                    t1 = time.perf_counter()
                    if retrieval:
                        x_te = x["test"]
                        scores.append(retrieval_ranks(lambda r: fitted.logits(x_te[r]), len(x_te), td.y["test"], seen))
                    else:
                        scores.append(fitted.scores(x["test"]))
                    inf_s.append(time.perf_counter() - t1)
                    tr_s.append(t1 - t0)
                    fitted.meta.update(embedding=emb_name, embedding_source=source)
                    if cfg.save_heads:
                        rel = Path("heads") / task.name / f"{emb_name}-{head}" / f"seed{seed}"
                        if fold is not None:
                            rel = rel / f"fold{fold}"
                        save_head(out / rel, fitted)
                        saved.append(str(rel))
                record(f"{emb_name}/{head}", emb_name, head, scores * (len(seeds) // len(fit_seeds)), tr_s, inf_s, saved)
        if "popularity" in cfg.baselines and retrieval:
            s, a, b = _popularity_ranks(td, seen)  # deterministic: one count serves every seed
            record("popularity", None, "popularity", [s] * len(seeds), [a], [b])
            s, a, b = _popularity_ranks(td, seen, remove_seen=True)
            record("popularity-unseen", None, "popularity", [s] * len(seeds), [a], [b])
        if "item-knn" in cfg.baselines and retrieval:
            s, a, b, info = _item_knn_ranks(td, seen, cfg)  # deterministic
            record("item-knn", None, "item-knn", [s] * len(seeds), [a], [b], item_knn=info)
        if "sasrec" in cfg.baselines and retrieval:
            with _torch_threads(cfg.torch_threads):
                s, a, b, info = _sasrec_ranks(td, seen, cfg)
            record("sasrec", None, "sasrec", [s] * len(seeds), [a], [b], sasrec=info)
        if "bag-of-items" in cfg.baselines and not retrieval:
            s, a, b, info = _bag_of_items_scores(td, items(td.view), cfg, seeds[0])  # deterministic: one fit
            record("bag-of-items/logreg", None, "logreg", [s] * len(seeds), [a], [b], bag_of_items=info)
        # (TF-IDF rows skip retrieval: a logistic regression over the whole catalog is too slow)
        concat = "concat-tfidf" in cfg.baselines
        feats = tfidf_features(td, texts(td.view), cfg) if not retrieval and ("tfidf" in cfg.baselines or concat) else None
        if feats is not None and "tfidf" in cfg.baselines:
            s, a, b, info = _tfidf_scores(td, feats, cfg, seeds[0])  # deterministic: one fit serves every seed
            record("tfidf/logreg", None, "logreg", [s] * len(seeds), [a], [b], tfidf=info)
        if feats is not None and concat:  # every deterministic (non-random) table, + TF-IDF
            for emb_name, source in tables_here:
                if source == RANDOM:
                    continue
                table = table_of(emb_name, source, seeds[0])
                s, a, b, info = _concat_scores(td, {sp: table.lookup(td.ids[sp]) for sp in td.ids}, feats, cfg, seeds[0])
                record(f"{emb_name}+tfidf/logreg", emb_name, "logreg", [s] * len(seeds), [a], [b], concat=info)
        if "t-trans" in cfg.baselines:
            with _torch_threads(cfg.torch_threads):
                scores, tr_s, inf_s, info = _ttrans_runs(td, seqs(td.view), cfg, seeds)
            record("t-trans", None, "t-trans", scores, tr_s, inf_s, t_trans=info)
        return fitted_models

    rows, task_info = [], []
    for task in tasks:
        t_task = time.perf_counter()
        if cfg.folds:
            # cross-fitting: every labelled user is a test user once, scored by heads that never saw it
            fold_tds = [task_data(cfg.data, task, users, tables, fold=(f, cfg.folds), labels=cfg.labels)
                        for f in range(cfg.folds)]
            td = stack_folds(fold_tds)
            fitted_models = merge_folds([score_models(ftd, f) for f, ftd in enumerate(fold_tds)])
            users_info = {"train": [int(len(f.ids["train"])) for f in fold_tds],
                          "val": [int(len(f.ids["val"])) for f in fold_tds], "test": int(len(td.ids["test"])), "folds": cfg.folds}
        else:
            td = task_data(cfg.data, task, users, tables, labels=cfg.labels)
            fitted_models = None
            users_info = {s: int(len(td.ids[s])) for s in td.ids}
        n_te = td.n_events["test"]
        lo_q, hi_q = np.quantile(n_te, [cfg.quantile, 1.0 - cfg.quantile])
        cold, heavy = n_te <= lo_q, n_te >= hi_q
        retrieval = task.type == "retrieval"
        task_info.append({
            "name": task.name, "config": dataclasses.asdict(task), "classes": None if retrieval else td.classes,
            **({"n_items": len(td.classes), "mask_seen": cfg.retrieval_mask_seen, "catalog": task.catalog,
                **({"n_items_ranked": sorted({len(td.classes) - len(o) for o in td.outside["test"]})}
                   if td.outside else {})} if retrieval else {}),
            "holdout_last": td.holdout,
            **({"history": task.history} if task.history_service else {}),
            "users": users_info, "left_out": td.left_out,
            "cold_max_events": float(lo_q), "heavy_min_events": float(hi_q),
            "n_cold": int(cold.sum()), "n_heavy": int(heavy.sum()),
        })
        if cfg.folds:
            progress(f"[evaluate] task {task.name}: {task.type} {task.table}.{task.target}, {cfg.folds}-fold cross-fit over "
                     f"{len(td.ids['test'])} users (train ~{int(np.mean(users_info['train']))} / val ~{int(np.mean(users_info['val']))} per fold)")
        else:
            progress(f"[evaluate] task {task.name}: {task.type} {task.table}.{task.target}, users train "
                     f"{len(td.ids['train'])} / val {len(td.ids['val'])} / test {len(td.ids['test'])}")
            fitted_models = score_models(td)
        task_scores = {m: f["scores"] for m, f in fitted_models.items()}
        task_rows = {}
        for m, f in fitted_models.items():
            task_rows[m] = _row(td, m, f["embedding"], f["head"], f["scores"], cold, heavy, f["train_s"], f["infer_s"], cfg, f["saved"])
            task_rows[m].update(f["extra"])
        # paired difference to the random floor: same head; tfidf vs random/logreg, t-trans vs random/mlp
        floors = [m for m in task_scores if cfg.embeddings.get(m.split("/")[0]) == RANDOM]
        for model, row in task_rows.items():
            floor_head = {"t-trans": "mlp", "popularity": "mlp", "item-knn": "mlp", "sasrec": "mlp"}.get(row["head"], row["head"])
            floor = next((f for f in floors if f.split("/")[1] == floor_head), None)
            if floor is not None and floor != model:
                row["vs_random"] = {"model": floor, **_difference(task.metric, td.y["test"], task_scores[model],
                                                                  task_scores[floor], cfg)}
        # paired difference of every real embedding row (minilm-mean and + tfidf included) to the strong
        # baselines, on all test users and on the cold ones: the issue's "beat TF-IDF and T-Trans, cold users
        # most" (and "beat popularity" for retrieval)
        best = best_yardstick(list(task_rows.values()))
        task_info[-1]["best_yardstick"] = best
        refs = [m for m in PAIRED_WITH if m in task_scores] + ([best] if best and best not in PAIRED_WITH else [])
        for model, row in task_rows.items():
            if (refs or cfg.reference) and row["embedding"] is not None and cfg.embeddings.get(row["embedding"]) != RANDOM:
                own = f"{cfg.reference}/{row['head']}" if cfg.reference else None
                row["paired"] = {ref: {
                    "test": _difference(task.metric, td.y["test"], task_scores[model], task_scores[ref], cfg),
                    "cold": _difference(task.metric, td.y["test"], task_scores[model], task_scores[ref], cfg, cold),
                } for ref in refs + ([own] if own in task_scores else []) if ref != model}
        if best is not None:  # every other row against the best yardstick: what a pretrained table must beat
            for model, row in task_rows.items():
                if model != best:
                    row["vs_best"] = {"model": best, **_difference(task.metric, td.y["test"], task_scores[model],
                                                                    task_scores[best], cfg)}
        rows.extend(task_rows.values())
        attr = (truth or {}).get("attributes", {}).get(task.target) if task.table == "attributes" else None
        if attr is not None:
            rows.append({
                "task": task.name, "model": "oracle", "embedding": None, "head": None, "metric": "accuracy",
                "higher_is_better": True,
                "test": {"value": _num(attr["oracle_accuracy"]), "ci": [None, None], "n": None},
                "note": f"Bayes-optimal accuracy given the true persona, all users ({gt_path})",
                "oracle_accuracy_expected": _num(attr.get("oracle_accuracy_expected", float("nan"))),
                "majority_accuracy": _num(attr.get("majority_accuracy", float("nan"))),
            })
        progress(f"[evaluate] task {task.name}: " + ", ".join(
            f"{r['model']} {r['test']['value']}" for r in rows if r["task"] == task.name) +
            f" ({task.metric}, {time.perf_counter() - t_task:.1f}s)")

    for (h, svc), t in sorted(minilm_by.items()):  # built on demand, one per view
        what = ", ".join([f"holdout_last={h}"] * bool(h) + [f"history_service={svc}"] * bool(svc))
        emb_info[f"{MINILM_MEAN} ({what})" if what else MINILM_MEAN] = {
            "source": str(Path(cfg.minilm_cache or Path(cfg.data) / "minilm_cache")), "dim": t.dim, "users": len(t.ids),
            "holdout_last": h, **({"history_service": svc} if svc else {}),
            "model": "all-MiniLM-L6-v2, mean over the user's event texts"}
    results = {
        "config": to_dict(cfg),
        "dataset": {"path": str(cfg.data), "users": manifest["users"], "services": manifest["services"]},
        "embeddings": emb_info,
        "ground_truth": str(gt_path) if gt_path else None,
        "seeds": seeds,
        "tasks": task_info,
        "skipped_tasks": skipped_tasks,
        "rows": rows,
        "head_timings": head_timings(rows),
    }
    results["charts"] = write_charts(results, out) if cfg.charts else []
    results["timings_s"] = {"total": round(time.perf_counter() - t_start, 3)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    progress(f"[evaluate] wrote {out / 'results.json'} and results.md ({results['timings_s']['total']:.1f}s)")
    return results


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def head_timings(rows: list[dict]) -> list[dict]:
    """ShopperBERT's speed claim on our setup: per task with a T-Trans row, each U-MLP row's training and
    inference seconds (head only: the frozen embeddings are computed once for every task) against
    T-Trans's (featurizing the task's sequences included), seed means, and the ratios T-Trans / U-MLP.
    T-Trans's seconds are one fit at the chosen learning rate; its search over ``t_trans_lrs`` is extra
    (the row's ``t_trans.lr_search_s``)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        tt = next((r for r in rows if r["task"] == task and r["model"] == "t-trans"), None)
        for r in rows:
            if tt is None or r["task"] != task or r["head"] != "mlp":
                continue
            out.append({"task": task, "u_mlp": r["model"], "u_mlp_train_s": r["train_s"], "u_mlp_infer_s": r["infer_s"],
                        "t_trans_train_s": tt["train_s"], "t_trans_infer_s": tt["infer_s"],
                        "train_ratio": round(tt["train_s"] / max(r["train_s"], 1e-9), 1),
                        "infer_ratio": round(tt["infer_s"] / max(r["infer_s"], 1e-9), 1)})
    return out


def _fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci", [None, None])
    return f"{d['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _fmt_diff(d: dict | None) -> str:
    """A signed difference with its interval: ``+0.021 [+0.004, +0.039]``."""
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci", [None, None])
    return f"{d['value']:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "")


def _users_text(u: dict) -> str:
    if "folds" in u:
        return (f"{u['folds']}-fold cross-fit: all {u['test']} users are test users once (train ~{round(float(np.mean(u['train'])))} / "
                f"val ~{round(float(np.mean(u['val'])))} per fold)")
    return f"users train {u['train']} / val {u['val']} / test {u['test']}"


def _tuning_notes(rows: list[dict]) -> list[str]:
    """What validation chose for the tuned baselines of one task (TF-IDF C, concat C / factor, T-Trans lr)."""
    notes = []
    for r in rows:
        if "tfidf" in r:
            notes.append(f"{r['model']}: {r['tfidf']['features']:,} terms, C={r['tfidf']['C']:g}")
        if "bag_of_items" in r:
            notes.append(f"{r['model']}: {r['bag_of_items']['features']:,} items, C={r['bag_of_items']['C']:g}")
        if "sasrec" in r:
            notes.append(f"{r['model']}: best epoch {r['sasrec']['best_epoch']} of {r['sasrec']['epochs']}, "
                         f"{r['sasrec']['params']:,} parameters")
        if "item_knn" in r:
            notes.append(f"{r['model']}: last {r['item_knn']['last'] or 'all'} items (val HR@10 by last: "
                         + ", ".join(f"{'all' if k == '0' else k}: {v:.4f}" for k, v in r['item_knn']['val_hr@10'].items()) + ")")
        if "concat" in r:
            c = r["concat"]
            notes.append(f"{r['model']}: {c['embedding_dim']} + {c['tfidf_features']:,} features, C={c['C']:g}, "
                         f"TF-IDF factor {c['tfidf_weight']:g}")
        if "t_trans" in r and "lr_grid" in r["t_trans"]:
            grid = ", ".join(f"{g['lr']:g}: {g['val_loss']:.4f}" if g["val_loss"] is not None else f"{g['lr']:g}: -"
                             for g in r["t_trans"]["lr_grid"])
            notes.append(f"t-trans: lr {r['t_trans']['lr']:g} (val loss by lr: {grid}), best epochs {r['t_trans']['best_epoch']}")
    return ["Chosen on val: " + "; ".join(notes) + ".", ""] if notes else []


def format_markdown(results: dict) -> str:
    """One table per task: value [95 % CI] on test, cold and heavy users, vs the random floor, paired
    differences to TF-IDF / T-Trans (all and cold test users), timings; then what val chose."""
    level = round(100 * results["config"]["confidence"])
    folds = results["config"].get("folds", 0)
    split = f"the {folds} cross-fitted folds (every labelled user)" if folds else "the test split"
    lines = [f"# userfm evaluate: {results['dataset']['path']}", "",
             f"Seeds {results['seeds']}; values are seed means on {split} with {level} % bootstrap "
             f"intervals over test users ({results['config']['bootstrap_samples']} resamples). Cold / heavy: bottom / "
             f"top {round(100 * results['config']['quantile'])} % of test users by history length. "
             f"vs X: paired bootstrap difference (this row - X, same resampled users), on all test users and on the "
             f"cold ones; > 0 is better for higher-is-better metrics, < 0 for rmse / log_loss.", ""]
    if results["config"].get("labels"):
        lines += [f"Label budget: heads and baselines train on {results['config']['labels']:,} labelled training users "
                  f"(and the same share of val users); the encoders' pretraining saw every training user unlabelled.", ""]
    info = {t["name"]: t for t in results["tasks"]}
    for name, t in info.items():
        rows = [r for r in results["rows"] if r["task"] == name]
        c = t["config"]
        lines += [f"## {name}", "",
                  f"`{c['table']}.{c['target']}` ({c['type']}, users: {c['users']}); " + _users_text(t['users']) +
                  f"; cold <= {t['cold_max_events']:g} events "
                  f"({t['n_cold']} users), heavy >= {t['heavy_min_events']:g} ({t['n_heavy']} users)."
                  + (f" Held-out last event; full ranking over {t['n_items']:,} items"
                     f"{', seen items masked' if t.get('mask_seen') else ', seen items not masked'}." if "n_items" in t else
                     " Held-out last event (history without it)." if t.get("holdout_last") else "")
                  + (f" Every model reads the user's {t['history'].split(':', 1)[1]} events only." if t.get("history") else ""),
                  ""]
        refs = [m for m in (*PAIRED_WITH, t.get("best_yardstick")) if m and any(m in r.get("paired", {}) for r in rows)]
        refs = list(dict.fromkeys(refs))
        if t.get("best_yardstick"):
            lines += [f"Best yardstick (no pretraining; picked on test, which favours it): `{t['best_yardstick']}`.", ""]
        ref_cols = "".join(f" vs {m.split('/')[0]} | vs {m.split('/')[0]}, cold |" for m in refs)
        lines += [f"| model | {c['metric']} (test) | cold | heavy | vs random |{ref_cols} train s | infer s |",
                  "|---|---|---|---|---|" + "---|---|" * len(refs) + "---|---|"]
        for r in rows:
            metric_note = "" if r["metric"] == c["metric"] else f" ({r['metric']})"
            paired = r.get("paired", {})
            ref_cells = "".join(f" {_fmt_diff(paired.get(m, {}).get('test'))} | {_fmt_diff(paired.get(m, {}).get('cold'))} |"
                                for m in refs)
            lines.append(f"| {r['model']}{metric_note} | {_fmt(r['test'])} | {_fmt(r.get('cold'))} | {_fmt(r.get('heavy'))} | "
                         f"{_fmt(r.get('vs_random'))} |{ref_cells} {r.get('train_s', '-')} | {r.get('infer_s', '-')} |")
        lines.append("")
        lines += _tuning_notes(rows)
    if results.get("head_timings"):
        lines += ["## Head timings: U-MLP vs T-Trans (seconds, seed means)", "",
                  "| task | U-MLP | U-MLP train s | T-Trans train s | ratio | U-MLP infer s | T-Trans infer s | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {h['task']} | {h['u_mlp']} | {h['u_mlp_train_s']} | {h['t_trans_train_s']} | {h['train_ratio']}x | "
                  f"{h['u_mlp_infer_s']} | {h['t_trans_infer_s']} | {h['infer_ratio']}x |" for h in results["head_timings"]]
        lines.append("")
    for sk in results.get("skipped_tasks", []):
        lines.append(f"Skipped task {sk['task']}: {sk['reason']}")
    return "\n".join(lines)


def write_charts(results: dict, out: Path) -> list[str]:
    """PNG charts (metric by model with intervals; cold vs heavy), or [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for t in results["tasks"]:
        rows = [r for r in results["rows"] if r["task"] == t["name"] and r["test"]["value"] is not None]
        if not rows:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5))
        names = [r["model"] for r in rows]
        ypos = np.arange(len(rows))

        def bars(ax, key, offset=0.0, label=None):
            vals = np.array([np.nan if r.get(key) is None or r[key]["value"] is None else r[key]["value"] for r in rows])
            err = np.array([[v - (r[key]["ci"][0] if r.get(key) and r[key]["ci"][0] is not None else v),
                             (r[key]["ci"][1] if r.get(key) and r[key]["ci"][1] is not None else v) - v]
                            for v, r in zip(vals, rows)]).T
            ax.barh(ypos + offset, vals, height=0.4 if label else 0.7, xerr=np.nan_to_num(err), label=label, capsize=2)

        bars(ax1, "test")
        ax1.set_yticks(ypos, names)
        ax1.set_xlabel(f"{rows[0]['metric']} (test)")
        ax1.set_title(t["name"])
        bars(ax2, "cold", -0.2, "cold")
        bars(ax2, "heavy", 0.2, "heavy")
        ax2.set_yticks(ypos, names)
        ax2.set_xlabel(f"{rows[0]['metric']}: cold vs heavy users")
        ax2.legend()
        fig.tight_layout()
        path = out / f"chart_{t['name']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written
