"""Downstream evaluation: small heads on frozen user embeddings vs baselines, with intervals.

Protocol (ShopperBERT's U-MLP vs T-Trans, https://arxiv.org/abs/2106.00573): the user encoder is frozen;
its embedding table is the only input of a small head trained per task. For every task in a YAML list
(``experiments/tasks/*.yaml``) and every embedding table in the config:

    heads      "mlp"     U-MLP: one hidden layer, early-stopped on the val split's loss (torch)
               "logreg"  logistic regression (ridge for regression tasks), C chosen on val (scikit-learn)
               "own-head" retrieval tasks, tables made by a future/next encoder (``own_heads``): the
                         objective's own head scores the catalog, nothing trained (``userfm.infer.item_scorer``)
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
                         full softmax, early-stopped on the val users' held-out items (``sasrec_select``;
                         ``userfm.eval.sasrec``; opt-in: one fit, seed ``seed``, serves every seed)
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
               "sparse-mlp" non-retrieval tasks: the U-MLP head ("mlp" in ``heads``) also on the sparse features
                         of "tfidf" and "bag-of-items" (whichever run), read as they are (rows ``tfidf/mlp``,
                         ``bag-of-items/mlp``, one fit per seed): the embeddings' own nonlinear head on the
                         yardsticks' inputs, so a table's MLP win is not the head's alone (opt-in: a hidden
                         layer over up to ``tfidf_max_features`` inputs)
               "concat-minilm" for every real embedding table E: E hstacked with the minilm-mean table (users
                         in both), fed to the same heads as a table (rows ``E+minilm-mean/<head>``): does the
                         encoder add anything to the mean of the item vectors it reads? (the ablation of a
                         residual path from the input; opt-in, needs what minilm-mean needs)
    row "val-chosen" with two or more pretrained tables (several objectives): per fold and seed, the test
                         scores of the (table, head), own heads included, whose task metric is best on the val
                         users (``userfm.eval.val_chosen``): what a recipe that pretrains every objective and keeps the one
                         its own val users prefer would report, with test never read to choose

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

import dataclasses
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from userfm.eval import metrics as M
from userfm.config import ConfigError, to_dict
from userfm.data.dataset import load_manifest
from userfm.eval.baselines import SEQ_COLUMNS, _bag_of_items_scores, bag_features, _concat_scores, _item_knn_ranks, _popularity_ranks, _sasrec_ranks, _tfidf_scores, _ttrans_runs, minilm_mean_table, tfidf_features, user_texts
from userfm.eval.embeddings import EmbeddingTable, concat_tables, embedding_model, load_embeddings, pretrain_holdout, random_embeddings
from userfm.eval.heads import _torch_threads, fit_and_score, retrieval_ranks, save_head
from userfm.eval.render import format_markdown, head_timings, write_charts
from userfm.eval.task_data import TaskData, _attribute_table, merge_folds, stack_folds, task_data, user_table
from userfm.eval.tasks import _num, CONCAT_MINILM, EvalConfig, EvalError, LAST_EVENT, MINILM_MEAN, PAIRED_WITH, RANDOM, SECONDARY_METRICS, TaskConfig, _category_level, load_tasks
from userfm.eval.val_chosen import VAL_CHOSEN, val_chosen


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def _interval(metric: str, y: np.ndarray, scores: list[np.ndarray], mask: np.ndarray | None, cfg: EvalConfig) -> dict:
    """Seed-mean of ``metric`` and its bootstrap interval over (a subset of) test users."""
    if mask is not None:
        y, scores = y[mask], [s[mask] for s in scores]

    value, lo, hi = M.bootstrap_metric(metric, y, scores, n_samples=cfg.bootstrap_samples, seed=cfg.seed, level=cfg.confidence)
    return {"value": _num(value), "ci": [_num(lo), _num(hi)], "n": int(len(y))}


def _difference(metric: str, y: np.ndarray, scores: list[np.ndarray], floor: list[np.ndarray], cfg: EvalConfig,
                mask: np.ndarray | None = None) -> dict:
    """Paired bootstrap interval of (this model - the other) on the same test users (those of ``mask``,
    e.g. the cold ones, when given): seed means of both sides, one set of resampled users for both."""
    if mask is not None:
        y, scores, floor = y[mask], [s[mask] for s in scores], [s[mask] for s in floor]

    value, lo, hi = M.bootstrap_metric(metric, y, scores, floor, n_samples=cfg.bootstrap_samples, seed=cfg.seed,
                                       level=cfg.confidence)
    return {"value": _num(value), "ci": [_num(lo), _num(hi)], "n": int(len(y))}


YARDSTICKS = ("tfidf/logreg", "bag-of-items/logreg", "tfidf/mlp", "bag-of-items/mlp", "popularity", "popularity-unseen",
              "item-knn", "sasrec")  # no pretraining
SPARSE_MLP = "<sparse-mlp>"  # the job keys of the "sparse-mlp" fits (no embedding table can be named so)
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


def _processes(workers: int) -> int:
    """``EvalConfig.workers`` as a process count (0 = one per CPU)."""
    return workers or os.cpu_count() or 1


def run_jobs(jobs: Iterable[tuple], workers: int, progress: Callable[[str, str], None]) -> Iterator[tuple]:
    """Run ``(key, label, fn, args)`` jobs and yield ``(key, fn(*args))`` in the jobs' order.

    ``workers`` 1: one at a time in this process, each job's inputs built when it comes up (``jobs`` may be a
    generator), ``progress(label, "")`` before it runs. More (0 = one per CPU): in that many processes
    (joblib's loky backend, which limits each worker's BLAS / OpenMP threads to its share of the CPUs, and
    keeps the processes for the next call), ``progress(label, " done (k/n)")`` as each result comes back.
    The jobs are independent and seeded: the same fits either way, up to the solvers' tolerance (lbfgs's
    solution moves within it with the BLAS thread count: on the demo, one row of 67 by one test user in 1,011).
    """
    n = _processes(workers)
    if n > 1:
        jobs = list(jobs)
    if n == 1 or len(jobs) < 2:
        for key, label, fn, args in jobs:
            progress(label, "")
            yield key, fn(*args)
        return
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=min(n, len(jobs)), backend="loky", return_as="generator")(
        delayed(fn)(*args) for _, _, fn, args in jobs)
    for k, ((key, label, _, _), result) in enumerate(zip(jobs, results), 1):
        progress(label, f" done ({k}/{len(jobs)})")
        yield key, result


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

    tfidf_by: dict[tuple, object] = {}

    def tfidf_of(td: TaskData):
        """The TF-IDF features of ``td``'s view and users, fitted once: tasks over the same split share them
        (the demo's eight synthetic tasks refitted the same vectorizer eight times)."""
        key = (td.view, *(tuple(np.asarray(td.ids[s]).tolist()) for s in sorted(td.ids)))
        if key not in tfidf_by:
            tfidf_by[key] = tfidf_features(td, texts(td.view), cfg)
        return tfidf_by[key]

    scorers: dict[tuple[str, int], tuple] = {}  # (table, catalog) -> (ItemScorer or None, build seconds)

    def own_scorer(emb_name: str, source: str, catalog: list[str]) -> tuple:
        key = (emb_name, hash(tuple(catalog)))
        if key not in scorers:
            from userfm.infer.item_scorer import ITEM_COLUMNS, ItemScorer, has_item_scorer

            found = embedding_model(source) if source != RANDOM else None
            scorers[key] = (None, 0.0)
            if found is not None and has_item_scorer(found[0]):
                from userfm.data.dataset import read_sequences
                from userfm.infer.embed import minilm_vectors

                t0 = time.perf_counter()
                rows = read_sequences(cfg.data, columns=list(ITEM_COLUMNS))  # what catalog_events reads
                vectors = minilm_vectors(found[0], cfg.data, found[1] or cfg.minilm_cache, progress=progress)
                scorers[key] = (ItemScorer(found[0], rows, catalog, vectors), time.perf_counter() - t0)
                progress(f"[evaluate] {emb_name}: scoring {len(catalog):,} items with its {scorers[key][0].objective} "
                         f"head too ({emb_name}/own-head)")
        return scorers[key]

    def score_models(td: TaskData, fold: int | None = None) -> dict[str, dict]:
        """Fit every (table x head) and baseline on ``td``'s train users (selection on val) and score its
        test users: model -> {scores (one per seed), train_s, infer_s, saved, embedding, head, extra}."""
        task = td.task
        retrieval = task.type == "retrieval"
        seen = td.excluded("test", cfg.retrieval_mask_seen) if retrieval else None
        # several pretrained tables: a val-chosen row, for which every pretrained fit is also scored on val
        choose = len(real) > 1
        pretrained = lambda source: source not in (RANDOM, MINILM_MEAN, CONCAT_MINILM)  # noqa: E731 (a table's source)
        seen_val = td.excluded("val", cfg.retrieval_mask_seen) if retrieval and choose else None
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

        def table_fits():
            """One job per (table x head x seed) fit, in the order the rows are recorded."""
            for emb_name, source in tables_here:
                for head in cfg.heads:
                    # lbfgs logistic regression on a fixed table is deterministic: one fit serves every seed
                    # (the random table changes with the seed, so its logreg is refitted).
                    # (A retrieval "logreg" is a linear layer trained with torch: seeded, refitted per seed.)
                    fit_seeds = seeds[:1] if head == "logreg" and source != RANDOM and not retrieval else seeds
                    for seed in fit_seeds:
                        table = table_of(emb_name, source, seed)
                        x = {s: table.lookup(td.ids[s]) for s in td.ids}
                        yield ((emb_name, source, head, seed, len(seeds) // len(fit_seeds)), f"{emb_name}/{head}",
                               fit_and_score, (head, x, td.y, task, td.classes, cfg, seed, retrieval,
                                               td.history["train"] if retrieval else None, item_vectors, seen,
                                               choose and pretrained(source), seen_val))

        def baseline_fits():
            bag = bag_features(td, items(td.view)) if "bag-of-items" in cfg.baselines and not retrieval else None
            if bag is not None:  # deterministic: one fit
                yield "bag-of-items", "bag-of-items/logreg", _bag_of_items_scores, (td, bag, cfg, seeds[0])
            if feats is not None and "tfidf" in cfg.baselines:  # deterministic: one fit serves every seed
                yield "tfidf", "tfidf/logreg", _tfidf_scores, (td, feats, cfg, seeds[0])
            if "sparse-mlp" in cfg.baselines and "mlp" in cfg.heads and not retrieval:  # seeded: one fit per seed
                sparse_x = {}
                if bag is not None:
                    sparse_x["bag-of-items/mlp"] = bag.x
                if feats is not None and "tfidf" in cfg.baselines:
                    sparse_x["tfidf/mlp"] = feats.x
                for model, x in sparse_x.items():
                    for seed in seeds:
                        yield (SPARSE_MLP, model, seed), model, fit_and_score, ("mlp", x, td.y, task, td.classes, cfg, seed)

        # (TF-IDF rows skip retrieval: a logistic regression over the whole catalog is too slow)
        concat = "concat-tfidf" in cfg.baselines
        feats = tfidf_of(td) if not retrieval and ("tfidf" in cfg.baselines or concat) else None
        fits: dict[str, dict] = {}
        baseline_out, sparse_fits = {}, {}
        for key, result in run_jobs(itertools.chain(baseline_fits(), table_fits()), cfg.workers,
                                    lambda label, done: progress(f"[evaluate] {here}: {label}" + done
                                                                 + (f", fold {fold + 1} of {cfg.folds}" if fold is not None else ""))):
            if isinstance(key, str):
                baseline_out[key] = result
                continue
            if key[0] == SPARSE_MLP:
                sparse_fits.setdefault(key[1], []).append(result)
                continue
            emb_name, source, head, seed, repeat = key
            fitted, test_scores, fit_s, score_s = result
            fitted.meta.update(embedding=emb_name, embedding_source=source)
            saved = []
            if cfg.save_heads:
                rel = Path("heads") / task.name / f"{emb_name}-{head}" / f"seed{seed}"
                if fold is not None:
                    rel = rel / f"fold{fold}"
                save_head(out / rel, fitted)
                saved.append(str(rel))
            runs = fits.setdefault(f"{emb_name}/{head}", {"embedding": emb_name, "source": source, "head": head,
                                                          "scores": [], "val": [], "tr_s": [], "inf_s": [], "saved": [],
                                                          "repeat": repeat})
            runs["scores"].append(test_scores)
            runs["val"].append(fitted.meta.get("val_metric", float("nan")))
            runs["tr_s"].append(fit_s)
            runs["inf_s"].append(score_s)
            runs["saved"] += saved
        for model, r in fits.items():  # one row per (table, head), its seeds' fits in seed order
            record(model, r["embedding"], r["head"], r["scores"] * r["repeat"], r["tr_s"], r["inf_s"], r["saved"])
        # the pretrained rows a recipe could keep: every (real table, head) fit, and the own heads below
        cands = {m: {"val": r["val"] * r["repeat"], "scores": r["scores"] * r["repeat"], "tr_s": sum(r["tr_s"]),
                     "inf_s": r["inf_s"][0]} for m, r in fits.items() if pretrained(r["source"])}
        if retrieval and cfg.own_heads:  # a future/next encoder's own head: nothing trained on top
            for emb_name, source in cfg.embeddings.items():
                scorer, build_s = own_scorer(emb_name, source, td.classes)
                if scorer is not None:
                    x_te = real[emb_name].lookup(td.ids["test"])
                    t0 = time.perf_counter()
                    s = retrieval_ranks(lambda r: scorer.scores(x_te[r]), len(x_te), td.y["test"], seen)
                    inf_s = time.perf_counter() - t0
                    record(f"{emb_name}/own-head", emb_name, "own-head", [s] * len(seeds), [build_s], [inf_s])
                    if choose:
                        x_va = real[emb_name].lookup(td.ids["val"])
                        val = M.compute(task.metric, td.y["val"],
                                        retrieval_ranks(lambda r: scorer.scores(x_va[r]), len(x_va), td.y["val"], seen_val))
                        cands[f"{emb_name}/own-head"] = {"val": [val] * len(seeds), "scores": [s] * len(seeds),
                                                         "tr_s": build_s, "inf_s": inf_s}
        if choose and cands:  # the one (with its head) best on val, per seed (and fold), as its own row
            chosen, scores = val_chosen(cands, M.HIGHER_IS_BETTER[task.metric])
            record(VAL_CHOSEN, VAL_CHOSEN, VAL_CHOSEN, scores, [sum(c["tr_s"] for c in cands.values())],
                   [cands[m]["inf_s"] for m in chosen],
                   val_chosen={"chosen": chosen, "val": {m: [_num(v) for v in c["val"]] for m, c in cands.items()}})
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
        if "bag-of-items" in baseline_out:
            s, a, b, info = baseline_out["bag-of-items"]
            record("bag-of-items/logreg", None, "logreg", [s] * len(seeds), [a], [b], bag_of_items=info)
        if "tfidf" in baseline_out:
            s, a, b, info = baseline_out["tfidf"]
            record("tfidf/logreg", None, "logreg", [s] * len(seeds), [a], [b], tfidf=info)
        for model, results in sparse_fits.items():  # the seeds' fits in seed order
            record(model, None, "mlp", [r[1] for r in results], [r[2] for r in results], [r[3] for r in results],
                   sparse_mlp={"features": int(results[0][0].meta["input_dim"]),
                               "epochs": [int(r[0].meta["epochs"]) for r in results]})
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

    def finish_task(task: TaskConfig, td: TaskData, fitted_models: dict, cold: np.ndarray, heavy: np.ndarray,
                    here: str, t_task: float, info: dict) -> None:
        """A task's rows (intervals, paired differences) from its fitted models, appended to ``rows``."""
        task_scores = {m: f["scores"] for m, f in fitted_models.items()}
        task_rows = {}
        for m, f in fitted_models.items():
            task_rows[m] = _row(td, m, f["embedding"], f["head"], f["scores"], cold, heavy, f["train_s"], f["infer_s"], cfg, f["saved"])
            task_rows[m].update(f["extra"])
        # paired difference to the random floor: same head; tfidf vs random/logreg, t-trans vs random/mlp
        floors = [m for m in task_scores if cfg.embeddings.get(m.split("/")[0]) == RANDOM]
        for model, row in task_rows.items():
            floor_head = {"t-trans": "mlp", "popularity": "mlp", "item-knn": "mlp", "sasrec": "mlp", "own-head": "mlp"}.get(row["head"], row["head"])
            floor = next((f for f in floors if f.split("/")[1] == floor_head), None)
            if floor is not None and floor != model:
                row["vs_random"] = {"model": floor, **_difference(task.metric, td.y["test"], task_scores[model],
                                                                  task_scores[floor], cfg)}
        # paired difference of every real embedding row (minilm-mean and + tfidf included) to the strong
        # baselines, on all test users and on the cold ones: the issue's "beat TF-IDF and T-Trans, cold users
        # most" (and "beat popularity" for retrieval)
        best = best_yardstick(list(task_rows.values()))
        info["best_yardstick"] = best
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
        progress(f"[evaluate] {here}: " + ", ".join(
            f"{r['model']} {r['test']['value']}" for r in rows if r["task"] == task.name) +
            f" ({task.metric}, {time.perf_counter() - t_task:.1f}s)")

    rows, task_info = [], []
    # With worker processes, one thread here computes a task's rows (bootstrap intervals: ~1-3 s a task on the
    # demo) while the workers fit the next task's heads; it takes the tasks in order, so the rows keep theirs.
    pool = ThreadPoolExecutor(max_workers=1) if _processes(cfg.workers) > 1 else None
    finishing = []
    try:
        for i_task, task in enumerate(tasks, 1):
            here = f"task {i_task}/{len(tasks)} {task.name}"  # the progress lines' count (the demo's live line reads it)
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
                progress(f"[evaluate] {here}: {task.type} {task.table}.{task.target}, {cfg.folds}-fold cross-fit over "
                         f"{len(td.ids['test'])} users (train ~{int(np.mean(users_info['train']))} / val ~{int(np.mean(users_info['val']))} per fold)")
            else:
                progress(f"[evaluate] {here}: {task.type} {task.table}.{task.target}, users train "
                         f"{len(td.ids['train'])} / val {len(td.ids['val'])} / test {len(td.ids['test'])}")
                fitted_models = score_models(td)
            if pool is None:
                finish_task(task, td, fitted_models, cold, heavy, here, t_task, task_info[-1])
            else:  # the intervals of this task while the workers fit the next one
                finishing.append(pool.submit(finish_task, task, td, fitted_models, cold, heavy, here, t_task, task_info[-1]))
        for f in finishing:  # in order; re-raises a task's error
            f.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

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


