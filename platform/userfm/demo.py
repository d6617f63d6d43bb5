"""``userfm demo``: the end-to-end pipeline on an embedded local Ray, one progress line per stage.

Stages: synthesize (or convert real) logs -> ingest with Ray Data -> summary -> pretrain CLUE on Ray
Train (``--compare``: also MLM and SimCLR) -> embed every user with Ray Data actors -> evaluate the
default tasks -> write the HTML report -> start the Ray Serve app, call each route once, print the
answers -> shut Serve down. Everything lands in one run folder; ``demo_summary.json`` lists it.

Default tasks: ``experiments/tasks/<format>.yaml`` (``synthetic.yaml`` without ``--data``). After
ingest the demo keeps the tasks this data supports (the others are listed with the reason, e.g. the
MovieLens gender task on ml-latest, which has no user attributes) and splits them by the embedding
table they need: tasks on ``last_event`` (next genre, next item) predict each user's last event, so
``userfm evaluate`` refuses a table that has seen it. For those the demo also embeds every user
WITHOUT the last event (``embeddings_heldout/<objective>/``, ``holdout_last=1``) and evaluates them in a
second pass. Both passes write their heads and charts into ``evaluate/``; their own
``config.json`` / ``results.json`` / ``results.md`` move to ``evaluate/passes/<pass>/``, and
``evaluate/results.json`` / ``results.md`` hold every task of both.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from userfm.config import to_dict
from userfm.errors import UserfmError
from userfm.objectives import OBJECTIVES, objective_parts
from userfm.stages import StageFailed, Stages

REAL_FORMATS = ("movielens", "online-retail", "amazon-reviews", "recbole")
STAGES_FILE = "stages.json"  # in the run folder: the config and every finished stage's result (what --resume reuses)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"  # run folder; replaced on every run
    data: str | None = None  # real logs instead of synthetic (folder or file)
    format: str | None = None  # format of `data`: movielens | online-retail | amazon-reviews | recbole | events
    service_field: str | None = None  # recbole: the .item field that names each event's service (convert --service-field)
    tasks: str | None = None  # task file (experiments/tasks/*.yaml); None = the format's own (synthetic.yaml without data)
    n_users: int = 10_000  # synthetic users (10k: CLUE sees ~8k training users, ~6 epochs in 400 steps, and does not overfit)
    events_per_user: float = 30.0  # synthetic mean events per user
    seed: int = 0  # synthetic data seed
    max_events: int = 256  # most recent events kept per user sequence
    pretrain_steps: int | None = None  # optimizer steps per pretraining run, at most (0 = skip pretraining); None = auto
    #                      (demo_steps): SYNTH_STEPS on synthetic data, REAL_STEPS (the epoch budget's cap) on real data
    pretrain_epochs: float | None = None  # > 0: an epoch budget (capped at pretrain_steps), validated every epoch,
    #                      stopped after pretrain_patience epochs without a lower val loss, the best weights exported;
    #                      0: pretrain_steps steps, the last weights. None = auto (pretrain_recipe): REAL_EPOCHS on real
    #                      data, which small sets memorise in a fixed step count; 0 on synthetic data
    pretrain_patience: int = 3  # epochs without a lower validation loss before pretraining stops (epoch budget only)
    batch_size: int = 64  # users per worker per step (the contrastive batch is this x num_workers)
    size: str = "small"  # encoder size (encoders.SIZES): small = width 128, 4 layers -> 128-float user embeddings
    proj_dim: int = 128  # clue/simclr: projection MLP under the contrastive loss (embeddings are taken before it); 0 = none
    clue_crop: float = 0.5  # clue: each step, each service view keeps a random time window of U[clue_crop, 1] of its span
    bucket_batches: int = 8  # length bucketing in pretraining (PretrainConfig.bucket_batches); measured to learn here
    compare: bool = False  # also pretrain MLM and SimCLR next to CLUE
    objectives: tuple[str, ...] | None = None  # also pretrain these next to CLUE (e.g. future: userfm.objectives.future, or a sum: clue+future), each embedded,
    #                      evaluated and compared with the yardsticks like CLUE; CLUE stays the served model. None = auto
    #                      (demo_objectives): REAL_OBJECTIVES on real data, whose per-task val-chosen row keeps the one each
    #                      task's validation users prefer; none on synthetic data. (clue,) = CLUE alone
    item_id_buckets: int = 0  # > 0: encoders add a learned embedding per hashed item identity (PretrainConfig.item_id_buckets)
    cooc_dim: int = 32  # item co-occurrence vectors fitted on the training users and fed to the encoders (PretrainConfig.cooc_dim); 0 = off
    time_fields: tuple[str, ...] | None = None  # calendar fields each event embeds (PretrainConfig.time_fields); None =
    #   auto: all five on synthetic data; on real data none for CLUE/SimCLR, whose two views of one user are matched by
    #   the dates they share when users rate in sessions (MovieLens next_genre 0.257 -> 0.339), all five for MLM, which
    #   predicts masked events' dates as ShopperBERT does
    minilm_cache: str = ""  # MiniLM vector cache folder shared by pretraining, embedding and the mean-MiniLM yardstick;
    #                      "" = <run>/dataset/minilm_cache (new every run). A folder kept between runs (real.py's) encodes
    #                      each distinct text once: 38k Amazon titles take ~20 min on 2 cores
    item_encoder: str = "minilm"  # clue/simclr items: minilm (frozen MiniLM vectors, cached) | text (BPE, from scratch) | category
    num_workers: int = 2  # Ray Train workers
    eval_seeds: int = 1  # head trainings per (task, model) in the evaluation (real.py and quality.py use more); the
    #                      bootstrap intervals are over test users, and logistic heads are deterministic
    eval_folds: int | None = None  # 0: heads fit on the train split, scored on the test split. k >= 3: k-fold
    #                      cross-fitting, every labelled user scored once (EvalConfig.folds; small real data: MovieLens'
    #                      61 test users -> 671); with tasks on the held-out last event, pretraining then holds it out of
    #                      every history too. None = auto (eval_folds_for): real data with a task of fewer than
    #                      CROSS_FIT_BELOW test users gets AUTO_FOLDS; synthetic data keeps its test split
    eval_workers: int = 0  # processes fitting each task's heads and baselines side by side (EvalConfig.workers);
    #                      0 = one per CPU (the demo's evaluate: 130 -> 66 s on 2 cores), 1 = one by one in the driver
    t_trans: bool = False  # also train the task-specific T-Trans baseline per task (slow: minutes per task)
    baselines: tuple[str, ...] = ("tfidf", "oracle", "popularity", "minilm-mean", "bag-of-items", "item-knn")  # evaluate
    #                      baselines (EvalConfig.baselines); t_trans adds "t-trans"
    report: bool = True  # write the HTML run report (report/report.html)
    serve: bool = True  # start the Serve app on 127.0.0.1, call each route once, shut it down
    serve_port: int = 0  # HTTP port for the serve stage; 0 = a free one

    def __post_init__(self):
        if self.data is not None and self.format not in REAL_FORMATS + ("events",):
            raise ValueError(f"--data needs --format, one of {', '.join(REAL_FORMATS + ('events',))}; got {self.format!r}")
        if self.eval_workers < 0:
            raise ValueError(f"eval_workers must be >= 0 (0 = one per CPU), got {self.eval_workers}")
        if self.eval_folds is not None and (self.eval_folds < 0 or self.eval_folds in (1, 2)):
            raise ValueError(f"eval_folds must be 0 (the dataset's split) or >= 3, got {self.eval_folds}")
        if self.service_field is not None and self.format != "recbole":
            raise ValueError(f"service_field applies to --format recbole only, not {self.format!r}")
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"--data {self.data!r}: no such file or folder")
        bad = [o for o in self.objectives or () if any(p not in OBJECTIVES for p in objective_parts(o))]
        if bad:
            raise ValueError(f"objectives: unknown {bad}; choose from {OBJECTIVES}, or a sum of them (clue+future)")
        if self.tasks is not None and not Path(self.tasks).is_file():
            raise ValueError(f"--tasks {self.tasks!r}: no such file (task files: {_TASKS_DIR})")


REAL_OBJECTIVES = ("simclr", "mlm", "next", "future")  # real data, next to CLUE: no one objective wins every real set
#   (Amazon's next Arts category: MLM +0.015 [+0.006, +0.023] over every yardstick where CLUE loses, -0.014; MovieLens' next
#   genre: MLM last, 0.282 vs 0.343; docs/benchmarks.md), so the demo pretrains them all and each task's val-chosen row keeps
#   the (table, head) its validation users prefer (Amazon: MLM in 5 of 5 folds, 0.455 vs 0.442, +0.012 [+0.004, +0.020])


def demo_objectives(cfg: DemoConfig, time: str | None = None, categories: bool = True) -> tuple[tuple[str, ...], str]:
    """The objectives the demo pretrains (CLUE first) and why. Once ingest has run, ``time`` (the manifest's:
    real / ordinal / none) and ``categories`` (does any event have one) drop, from the real-data default, the
    objectives the data gives nothing to learn: ``next`` without event order, MLM without categories (its
    targets; on id-only logs its loss is 0 from the first step)."""
    if cfg.objectives is not None:
        extra, why = tuple(o for o in cfg.objectives if o != "clue"), "set in the config"
    elif cfg.data is not None:
        dropped = {"next": "no event order" if time == "none" else "", "mlm": "" if categories else "no categories"}
        extra = tuple(o for o in REAL_OBJECTIVES if not dropped.get(o))
        why = ("real data: no one objective wins on every real set; each task's val-chosen row keeps the one its "
               "validation users prefer (--set 'objectives=[clue]': CLUE alone)"
               + "".join(f"; not {o}: the data has {r}" for o, r in dropped.items() if r))
    else:
        extra, why = (), "synthetic data: CLUE, the model the generator's services are built for"
    if cfg.compare:
        why += "; --compare: MLM and SimCLR too"
    return tuple(dict.fromkeys((("clue", "mlm", "simclr") if cfg.compare else ("clue",)) + extra)), why


def _has_categories(dataset: str | Path) -> bool:
    """Whether any event of the dataset has a category path."""
    import pyarrow.compute as pc

    from userfm.data.dataset import read_sequences

    paths = pc.list_flatten(read_sequences(dataset, columns=["category"]).column("category").combine_chunks())
    return len(pc.list_flatten(paths)) > 0


def time_fields_for(cfg: DemoConfig, objective: str) -> tuple[str, ...]:
    """The calendar fields ``objective`` embeds in this demo (see ``DemoConfig.time_fields``)."""
    from userfm.train.pretrain_config import PretrainConfig

    if cfg.time_fields is not None:
        return tuple(cfg.time_fields)
    return () if cfg.data is not None and objective != "mlm" else PretrainConfig.time_fields


_TASKS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "tasks"


def _default_tasks(cfg: DemoConfig) -> Path:
    """The task file for this data: ``cfg.tasks``, else one per format (each says what its converter provides)."""
    if cfg.tasks is not None:
        return Path(cfg.tasks)
    return _TASKS_DIR / ("synthetic.yaml" if cfg.data is None else f"{cfg.format}.yaml")


SYNTH_STEPS = 150  # synthetic data: the demo's steps, chosen on the validation loss of the last weights (a full
#                    schedule each, 2026-12-07): 3.792 at 200 steps, 3.841 at 150 (+1.3 %), 3.964 at 100 (+4.5 %); the
#                    fewest steps within 2 % of 200's. No headline metric moved beyond its intervals (CLUE + U-MLP age
#                    0.470 at 150, 0.500 at 200, 0.478 [0.449, 0.506] at 400; docs/demo.md, "Wall time")
REAL_STEPS = 400  # real data: the cap on the epoch budget (real.py's and loo.py's recipe)


def demo_steps(cfg: DemoConfig) -> int:
    """The demo's pretraining steps (at most, on real data): ``cfg.pretrain_steps``, else SYNTH_STEPS on
    synthetic data and REAL_STEPS on real data."""
    if cfg.pretrain_steps is not None:
        return cfg.pretrain_steps
    return REAL_STEPS if cfg.data is not None else SYNTH_STEPS


FUTURE_ITEM_BUCKETS = 32_768  # future: hashed item-id embeddings, on the input and the target side (id-only logs too)
REAL_EPOCHS = 30.0  # the epoch budget on real data (early stopping usually ends it sooner)


def pretrain_recipe(cfg: DemoConfig) -> tuple[dict, str]:
    """PretrainConfig fields of the demo's budget and why: an epoch budget with early stopping and the best
    weights exported (``pretrain_epochs`` > 0, or auto on real data), else ``pretrain_steps`` steps."""
    steps = demo_steps(cfg)
    epochs = cfg.pretrain_epochs if cfg.pretrain_epochs is not None else (REAL_EPOCHS if cfg.data is not None else 0.0)
    if not epochs:
        why = "set in the config" if cfg.pretrain_epochs is not None else "synthetic data: a fresh sample every user"
        return ({"max_steps": steps, "eval_every": max(1, steps // 4), "checkpoint_every": max(1, steps // 2),
                 "log_every": max(1, steps // 10), "export": "last"}, f"{steps} steps, the last weights ({why})")
    why = ("set in the config" if cfg.pretrain_epochs is not None else
           "real data: a fixed step count memorises a small set (MovieLens latest-small: 400 steps = 100 epochs, "
           "validation loss 4.4 at step 100 and 5.2 at 400)")
    return ({"max_steps": steps, "epochs": epochs, "early_stop": cfg.pretrain_patience, "eval_every": 0,
             "checkpoint_every": steps, "log_every": max(1, steps // 20), "export": "best"},
            f"at most {epochs:g} epochs and {steps} steps, validated every epoch, stopped after {cfg.pretrain_patience} "
            f"epochs without a lower validation loss, the best weights exported ({why})")


def pretrain_config(cfg: DemoConfig, objective: str, dataset: str | Path, out: str | Path, holdout_last: int = 0):
    """The ``PretrainConfig`` the demo pretrains ``objective`` with on ``dataset`` (its recipe, sizes and
    per-objective choices), for scripts that vary one field of it (e.g. ``services``)."""
    from userfm.train.pretrain_config import PretrainConfig

    recipe, _ = pretrain_recipe(cfg)
    parts = objective_parts(objective)  # a multi-task sum (clue+future): each part's choices
    return PretrainConfig(
        data=str(dataset), out=str(out), objective=objective,
        item_encoder="category" if objective == "mlm" else cfg.item_encoder,
        pooling="cls" if objective == "mlm" else "last" if "next" in parts else "mean", batch_size=cfg.batch_size,
        bucket_batches=cfg.bucket_batches, size=cfg.size, proj_dim=cfg.proj_dim, clue_crop=cfg.clue_crop,
        item_id_buckets=cfg.item_id_buckets or (FUTURE_ITEM_BUCKETS if {"future", "next", "masked-item"} & set(parts) else 0),
        cooc_dim=cfg.cooc_dim, time_fields=time_fields_for(cfg, objective),
        num_workers=cfg.num_workers, seed=cfg.seed, holdout_last=holdout_last, minilm_cache=cfg.minilm_cache, **recipe,
    )


CROSS_FIT_BELOW = 2_000  # test users of a task below which real data is cross-fitted (intervals of +-0.1 at ~100)
AUTO_FOLDS = 5


def eval_folds_for(cfg: DemoConfig, test_users: dict[str, int]) -> tuple[int, str]:
    """The demo's cross-fitting folds and why: ``cfg.eval_folds`` when set; else, on real data, AUTO_FOLDS when
    a task has fewer than CROSS_FIT_BELOW test users (``test_users``: task -> its test users on the split),
    so every labelled user is scored once; else 0 (the dataset's split)."""
    if cfg.eval_folds is not None:
        return cfg.eval_folds, "set in the config"
    if cfg.data is None:
        return 0, "synthetic data: the test split"
    small = {t: n for t, n in test_users.items() if n < CROSS_FIT_BELOW}
    if not small:
        return 0, f"every task has >= {CROSS_FIT_BELOW:,} test users"
    t, n = min(small.items(), key=lambda kv: kv[1])
    return AUTO_FOLDS, (f"real data and task {t} has {n:,} test users (< {CROSS_FIT_BELOW:,}): every labelled user is "
                        f"scored once, by heads that never saw it")


PASSES = {0: "full_history", 1: "last_event_held_out"}  # holdout_last of the embedding table -> pass name


def pass_name(holdout: int, service: str = "") -> str:
    """The evaluate pass (and its folder) of the embedding tables made with ``holdout_last = holdout`` (and
    ``history_service = service``: one service's events only, a transfer task's input)."""
    return PASSES.get(holdout, f"last_{holdout}_events_held_out") + (f"_{service}_history" if service else "")


def embeddings_key(holdout: int, service: str = "") -> str:
    """Where a pass's embedding tables live: ``embeddings/``, ``embeddings_heldout/`` (the last event held
    out), ``embeddings_heldout<n>/`` (the last n held out, e.g. the Amazon set's Office target, the 2nd last),
    with ``_<service>`` appended for one service's events only (``embeddings_heldout2_arts``)."""
    base = "embeddings" if holdout == 0 else "embeddings_heldout" if holdout == 1 else f"embeddings_heldout{holdout}"
    return base + (f"_{service}" if service else "")


@dataclass(frozen=True)
class _TaskPlan:
    """The task file's tasks this dataset supports, grouped by the embedding table they need."""

    passes: dict[tuple[int, str], tuple[str, ...]]  # (holdout_last, history_service) -> task names, in file order
    skipped: tuple[dict, ...]  # {"task", "reason"} for each task the data cannot support
    order: tuple[str, ...]  # every task name of the file, in file order
    users: dict[str, dict[str, int]]  # task kept -> labelled users by split (train / val / test)


def _plan_tasks(tasks: Path, dataset: Path) -> _TaskPlan:
    """Build each task's labels the way ``userfm evaluate`` will (``evaluate.task_data``) and keep the
    ones that work: a task whose table was not ingested (no user attributes in ml-latest) or whose
    labels cannot make a train/val/test evaluation (one class only, e.g. next_category on an Amazon dump
    of one category; no item ids) is skipped with the evaluator's own reason instead of stopping the demo.
    A dataset without order (its manifest's ``time`` is "none", carried from the convert manifest by ingest)
    skips every last_event task: a user's "last" event is then an arbitrary one."""
    from userfm.data.dataset import load_manifest, read_attributes
    from userfm.eval.task_data import last_event_table, task_data, user_table
    from userfm.eval.tasks import LAST_EVENT, EvalError, load_tasks

    manifest = load_manifest(dataset)
    ingested = [a["name"] for a in manifest.get("attributes", [])]
    ordered = manifest.get("time", "real") != "none"
    users = user_table(dataset)
    tables: dict = {}
    passes: dict[tuple[int, str], list[str]] = {}
    skipped, users_by_task = [], {}
    all_tasks = load_tasks(tasks)
    for t in all_tasks:
        if t.table == LAST_EVENT and not ordered:
            skipped.append({"task": t.name, "reason": "the source has no event order (time: none): a user's last event "
                                                      "is an arbitrary one, not the next"})
            continue
        if t.table != LAST_EVENT and t.table not in ingested:
            skipped.append({"task": t.name, "reason": f"no attributes table {t.table!r} in this data "
                                                      f"(ingested: {', '.join(ingested) or 'none'})"})
            continue
        if t.label_table not in tables:
            tables[t.label_table] = (last_event_table(dataset, t.holdout) if t.table == LAST_EVENT
                                     else read_attributes(dataset, t.table))
        try:
            td = task_data(dataset, t, users, tables)
        except EvalError as exc:
            skipped.append({"task": t.name, "reason": str(exc)})
            continue
        passes.setdefault(td.view, []).append(t.name)
        users_by_task[t.name] = {s: len(ids) for s, ids in td.ids.items()}
    return _TaskPlan({h: tuple(n) for h, n in sorted(passes.items())}, tuple(skipped), tuple(t.name for t in all_tasks),
                     users_by_task)


def merge_passes(parts: list[tuple[int, dict]], plan: _TaskPlan) -> dict:
    """One results dict (the shape of ``evaluate/results.json``) from the evaluate passes' results.

    Rows and tasks follow the task file's order; ``config`` keeps the settings every pass shares
    (the per-pass configs, embedding tables and timings are under ``passes``); ``skipped_tasks`` lists
    the tasks the plan left out. Head and chart paths are relative to the folder all passes wrote to.

    Args:
        parts: ((holdout_last, history_service) of the pass's embedding tables, ``run_evaluate``'s results),
            one per pass.
    """
    rank = {name: i for i, name in enumerate(plan.order)}
    configs = [r["config"] for _, r in parts]
    first = parts[0][1]
    return {
        "config": {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])},
        "dataset": first["dataset"],
        "ground_truth": next((r["ground_truth"] for _, r in parts if r.get("ground_truth")), None),
        "seeds": first["seeds"],
        "tasks": sorted((t for _, r in parts for t in r["tasks"]), key=lambda t: rank[t["name"]]),
        "skipped_tasks": list(plan.skipped) + [sk for _, r in parts for sk in r.get("skipped_tasks", [])],
        "rows": sorted((row for _, r in parts for row in r["rows"]), key=lambda row: rank[row["task"]]),
        "head_timings": sorted((h for _, r in parts for h in r.get("head_timings", [])), key=lambda h: rank[h["task"]]),
        "charts": [c for _, r in parts for c in r.get("charts", [])],
        "passes": [{"name": pass_name(*v), "holdout_last": v[0], **({"history_service": v[1]} if v[1] else {}),
                    "tasks": [t["name"] for t in r["tasks"]], "embeddings": r["embeddings"], "config": r["config"],
                    "files": f"passes/{pass_name(*v)}", "timings_s": r["timings_s"]} for v, r in parts],
        "timings_s": {"total": round(sum(r["timings_s"]["total"] for _, r in parts), 3)},
    }


def _headline(results: dict) -> dict:
    """task -> {model: primary metric} for the final summary (read from results.json's rows); retrieval
    tasks also get "<task> <metric>" entries for their secondary metrics (next_item: HR@10, then NDCG@10)."""
    out: dict = {}
    for row in results.get("rows", []):
        value = row["test"]["value"]
        if value is not None:
            out.setdefault(row["task"], {})[row["model"]] = round(value, 3)
    for row in results.get("rows", []):
        if row["metric"] in ("hr@10", "ndcg@10"):
            for m, v in row.get("other_metrics", {}).items():
                if v is not None:
                    out.setdefault(f"{row['task']} {m}", {})[row["model"]] = round(v, 3)
    return out


def resume_config(out: str | Path) -> DemoConfig:
    """The config of the demo run in ``out`` (its ``stages.json``), for ``--resume``."""
    from userfm.config import from_dict

    record = Path(out) / STAGES_FILE
    if not record.is_file():
        raise UserfmError(f"--resume: {out} has no {STAGES_FILE} (not a demo run folder, or no stage of it finished); "
                          "run the demo without --resume")
    return from_dict(DemoConfig, {**json.loads(record.read_text())["config"], "out": str(out)})


def run_demo(cfg: DemoConfig, *, address: str | None = None, num_cpus: int | None = None, resume: bool = False) -> dict:
    """Run every landed stage into ``cfg.out``; returns (and writes) ``demo_summary.json``.

    The console gets one line per stage, the data summary, the served answers and the results; each
    stage's own output goes to ``<out>/logs/demo.log`` and Ray's to ``<out>/logs/ray.log``
    (``ray_session`` links Ray's session log folder). ``runtime.set_verbose(True)`` (``--verbose``):
    everything on the console, as before, and no ``logs/``.

    ``resume``: continue the run already in ``cfg.out`` (same config, :func:`resume_config`): the stages its
    ``stages.json`` lists as finished are reused, the rest run. A stage that fails raises :class:`StageFailed`,
    whose message names what is intact and the command that resumes.
    """
    from userfm.runtime import is_verbose

    out = Path(cfg.out)
    reuse = None
    if resume:
        saved = json.loads((out / STAGES_FILE).read_text()) if (out / STAGES_FILE).is_file() else None
        if saved is None or {**saved["config"], "out": cfg.out} != to_dict(cfg):  # (the folder may be spelled otherwise)
            raise UserfmError(f"--resume: {out} holds no run of this config ({STAGES_FILE} missing or different)")
        reuse = saved["stages"]
        print(f"[demo] resuming {out}: {len(reuse)} finished stages reused, the rest run again", flush=True)
    elif out.exists():
        if not any((out / f).exists() for f in ("demo_summary.json", STAGES_FILE)) and any(out.iterdir()):
            raise UserfmError(f"{out} exists and is not a demo run folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_verbose():
        return _pipeline(cfg, out, None, address, num_cpus, reuse)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    print(f"[demo] logs: {logs / 'demo.log'} (each stage's output), {logs / 'ray.log'} (Ray's); --verbose prints them here",
          flush=True)
    with (logs / "demo.log").open("a" if resume else "w", encoding="utf-8") as details:
        try:
            return _pipeline(cfg, out, details, address, num_cpus, reuse)
        except KeyboardInterrupt:
            print(f"\n[demo] interrupted; the finished stages are kept: userfm demo --resume --out {out}",
                  file=sys.stderr, flush=True)
            raise
        except StageFailed as exc:
            done = json.loads((out / STAGES_FILE).read_text())["stages"] if (out / STAGES_FILE).is_file() else {}
            kept = [os.path.relpath(p, out) + "/" for st in done.values() for p in st.get("outputs", ())]
            raise StageFailed(
                f"{exc}\n  intact: {len(done)} finished stages" + (f" ({', '.join(kept)})" if kept else "")
                + f", listed in {out / STAGES_FILE}\n  resume: userfm demo --resume --out {out}\n"
                f"  traceback: {logs / 'demo.log'}") from exc.__cause__


def _start_ray(address: str | None, num_cpus: int | None, logs: Path | None) -> None:
    """``init_ray`` with Ray's output to ``logs/ray.log`` and a ``logs/ray_session`` link to Ray's own log
    folder (the workers' files, Ray Data's and Serve's logs); ``logs=None``: Ray's output on the console."""
    from userfm.runtime import init_ray, session_logs

    init_ray(address, num_cpus=num_cpus, log_file=logs / "ray.log" if logs else None)
    session = session_logs()
    if logs is not None and session is not None:
        (logs / "ray_session").unlink(missing_ok=True)  # a resumed run's link points at the earlier session
        (logs / "ray_session").symlink_to(session, target_is_directory=True)


def _pipeline(cfg: DemoConfig, out: Path, details: TextIO | None, address: str | None, num_cpus: int | None,
              reuse: dict | None = None) -> dict:
    """The stages of ``run_demo`` into the run folder ``out``; ``details``: where each stage's own output goes
    (None: the console); ``reuse``: the finished stages of an earlier run of this config (``--resume``)."""
    from userfm.data.dataset import format_summary, summarize
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.eval.tasks import load_tasks
    from userfm.train.pretrain import run_pretrain

    raw, dataset = out / "raw", out / "dataset"
    objectives, objectives_why = demo_objectives(cfg) if demo_steps(cfg) else ((), "")
    tasks = _default_tasks(cfg)

    def n_stages(passes) -> int:  # data, Ray, ingest, summary; per objective pretrain + embed(s); evaluate; report; serve
        return (4 + len(objectives) * (2 + sum(v != (0, "") for v in passes)) + int(bool(objectives and passes)) + int(cfg.report)
                + int(cfg.serve and bool(objectives)))

    # (until ingest has shown which tasks the data supports, count those of the task file)
    stages = Stages(n_stages({t.view for t in load_tasks(tasks)}), details, out / STAGES_FILE, to_dict(cfg), reuse)

    attributes: tuple[str, ...] = ()
    if cfg.data is None:
        from userfm.data.synth import generate
        from userfm.data.synth_model import SynthConfig

        scfg = SynthConfig(n_users=cfg.n_users, events_per_user=cfg.events_per_user, seed=cfg.seed)
        stages.run("synthesize multi-service logs", lambda: generate(scfg, raw, progress=print), (raw,))
        inputs = (str(raw / "events"),)
        attributes = tuple(str(raw / f) for f in ("attributes.parquet", "future_labels.parquet"))
    elif cfg.format == "events":
        stages.run("use canonical events", lambda: None)
        inputs = (cfg.data,)
    else:
        from userfm.data.convert import convert

        options = {"service_field": cfg.service_field} if cfg.format == "recbole" else {}
        converted = stages.run(f"convert {cfg.format} logs", lambda: convert(cfg.format, cfg.data, raw, **options), (raw,))
        if converted.get("time", "real") != "real":
            print(f"[demo] {converted['time_note']}")
        inputs = (str(raw / "events.parquet"),)
        attributes = tuple(str(p) for p in [raw / "attributes.parquet"] if p.exists())

    icfg = IngestConfig(inputs=inputs, out=str(dataset), attributes=attributes, max_events=cfg.max_events)
    stages.run("start Ray", lambda: _start_ray(address, num_cpus, out / "logs" if details else None), reusable=False)
    manifest = stages.run("ingest with Ray Data", lambda: run_ingest(icfg), (dataset,))
    summary = stages.run("summarize", lambda: summarize(dataset))
    print(format_summary(summary))

    plan = None
    if objectives and cfg.objectives is None and cfg.data is not None:  # the default set, now that the data is known
        objectives, objectives_why = demo_objectives(cfg, manifest["time"], _has_categories(dataset))
    if objectives:
        plan = _plan_tasks(tasks, dataset)
        for sk in plan.skipped:
            print(f"[demo] task {sk['task']} skipped: {sk['reason']}")
        print(f"[demo] tasks from {tasks}: " + ("; ".join(
            f"{', '.join(names)} on the {pass_name(*v).replace('_', '-')} embeddings" for v, names in plan.passes.items())
            or "none this data supports"))
        stages.total = n_stages(plan.passes)

    folds = 0
    if plan is not None:
        folds, why = eval_folds_for(cfg, {t: u["test"] for t, u in plan.users.items()})
        print(f"[demo] evaluation: {f'{folds}-fold cross-fitting' if folds else 'the test split'} ({why})")
    # cross-fitting scores the pretraining users too: their held-out last events must not be in pretraining
    pretrain_holdout = max(h for h, _ in plan.passes) if folds and plan and plan.passes else 0
    _, why = pretrain_recipe(cfg)
    if objectives:
        print(f"[demo] objectives: {', '.join(objectives)} ({objectives_why})")
        print(f"[demo] pretraining budget: {why}")
    pretrained = {}
    for objective in objectives:
        pcfg = pretrain_config(cfg, objective, dataset, out / "pretrain" / objective, pretrain_holdout)
        s = stages.run(f"pretrain {objective} on Ray Train", lambda: run_pretrain(pcfg), (Path(pcfg.out),))
        pretrained[objective] = {
            "model": s["model"], "holdout_last": pretrain_holdout, "budget": why, "max_steps": s["max_steps"],
            "early_stopped": s["early_stopped"], "exported": s["exported"],
            **{k: s["final"].get(k) for k in ("step", "loss", "val_loss", "samples_per_s", "pf_days") if k in s["final"]},
        }
        ecfg = EmbedConfig(model=s["model"], data=str(dataset), out=str(out / "embeddings" / objective),
                           minilm_cache=cfg.minilm_cache)
        e = stages.run(f"embed users with {objective}", lambda: run_embed(ecfg), (Path(ecfg.out),))
        pretrained[objective]["embeddings"] = ecfg.out
        pretrained[objective]["users_embedded"] = e["users_embedded"]
        for held, svc in (v for v in plan.passes if v != (0, "")):  # each history without its last event(s) (and
            key = embeddings_key(held, svc)                          # one service's events only, for transfer tasks)
            hcfg = EmbedConfig(model=s["model"], data=str(dataset), out=str(out / key / objective), holdout_last=held,
                               history_service=svc, minilm_cache=cfg.minilm_cache)
            what = ", ".join(["last event held out" if held == 1 else f"last {held} events held out"] * bool(held)
                             + [f"{svc} events only"] * bool(svc))
            h = stages.run(f"embed users with {objective}, {what}", lambda: run_embed(hcfg), (Path(hcfg.out),))
            pretrained[objective][key] = hcfg.out
            pretrained[objective][f"users_embedded_{key.removeprefix('embeddings_')}"] = h["users_embedded"]

    evaluation = ev = None
    if objectives and plan.passes:
        ev = stages.run("evaluate downstream tasks", lambda: _evaluate_stage(cfg, dataset, out / "evaluate", tasks, plan,
                                                                              {o: pretrained[o] for o in objectives}, folds),
                        (out / "evaluate",))
        evaluation = {"results": str(out / "evaluate" / "results.md"), "headline": _headline(ev), "folds": folds,
                      "tasks": [t["name"] for t in ev["tasks"]], "skipped_tasks": ev["skipped_tasks"]}
    elif objectives:
        print("[demo] no task this data supports: evaluation skipped")

    report = None
    if cfg.report:
        from userfm.report.common import ReportConfig
        from userfm.report.page import run_report

        # demo_summary.json so far, so the report's run section has the stage timings
        (out / "demo_summary.json").write_text(json.dumps({"config": to_dict(cfg), "timings_s": stages.timings}, indent=2))
        rcfg = ReportConfig(run=str(out))
        report = stages.run("write the HTML report", lambda: run_report(rcfg, progress=print),
                            (Path(rcfg.out) if rcfg.out else out / "report",))["html"]

    served = None
    if cfg.serve and objectives:
        served, answers = stages.run("serve embeddings and heads over HTTP (Ray Serve)",
                                     lambda: _serve_stage(cfg, out, dataset, pretrained, ev), reusable=False)
        for method, path, status, body in answers:  # the demo's show: on the console, quiet or not
            print(f"[demo]   {method:<4} {path:<40} -> {status} {_brief(body) if path != '/docs' else '(OpenAPI UI)'}")

    result = {
        "config": to_dict(cfg),
        "paths": {"run": str(out), "raw": str(raw), "dataset": str(dataset)},
        "ingest": {k: manifest[k] for k in ("rows_in", "rows_kept", "rows_quarantined", "users", "services")},
        "pretrain": pretrained,
        "evaluate": evaluation,
        "report": report,
        "serve": served,
        "timings_s": stages.timings,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    print(
        f"[demo] finished in {sum(stages.timings.values()):.1f}s: {manifest['rows_in']:,} events -> "
        f"{manifest['users']['total']:,} user sequences in {dataset}; summary: {out / 'demo_summary.json'}"
    )
    if evaluation:
        for task, models in evaluation["headline"].items():
            print(f"[demo]   {task:<18} " + "  ".join(f"{m} {v}" for m, v in models.items()))
        for sk in evaluation["skipped_tasks"]:
            print(f"[demo]   {sk['task']:<18} skipped: {sk['reason']}")
    if report:
        print(f"[demo] report: {report}")
    return result


def _evaluate_stage(cfg: DemoConfig, dataset: Path, out: Path, tasks: Path, plan: _TaskPlan, pretrained: dict,
                    folds: int) -> dict:
    """``userfm evaluate`` once per pass of the plan (full-history tables; held-out tables for the
    last_event tasks), all into ``out``; returns (and writes) the merged results."""
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.render import format_markdown
    from userfm.eval.tasks import EvalConfig

    baselines = cfg.baselines + (("t-trans",) if cfg.t_trans and "t-trans" not in cfg.baselines else ())
    parts = []
    for view, names in plan.passes.items():
        table = embeddings_key(*view)
        vcfg = EvalConfig(data=str(dataset), out=str(out), tasks=str(tasks), only_tasks=names, seeds=cfg.eval_seeds,
                          minilm_cache=cfg.minilm_cache,
                          embeddings={**{o: p[table] for o, p in pretrained.items()}, "random": "random"},
                          baselines=baselines, folds=folds, workers=cfg.eval_workers)
        print(f"[demo] evaluate pass {pass_name(*view)} (holdout_last={view[0]}"
              f"{f', history_service={view[1]}' if view[1] else ''}): {', '.join(names)}", flush=True)
        parts.append((view, run_evaluate(vcfg)))
        # heads/ and chart_<task>.png do not collide (task names are unique); these three files do
        keep = out / "passes" / pass_name(*view)
        keep.mkdir(parents=True)
        for name in ("config.json", "results.json", "results.md"):
            (out / name).replace(keep / name)
    merged = merge_passes(parts, plan)
    (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "results.md").write_text(format_markdown(merged))
    return merged


def _serve_head(results: dict | None, heads_dir: Path) -> str | None:
    """The task whose CLUE U-MLP head (seed 0) the serve stage deploys: ``segment`` on synthetic data,
    else the first classification task on a user-attribute table, else the first classification task
    (a next-event head answers "what comes next" from the full history), else any; None without heads."""
    from userfm.eval.tasks import LAST_EVENT

    if results is None:
        return None
    tasks = [t for t in results["tasks"] if (heads_dir / t["name"] / "clue-mlp" / "seed0").is_dir()]
    for keep in (lambda t: t["name"] == "segment",
                 lambda t: t["config"]["type"] != "retrieval" and t["config"]["table"] != LAST_EVENT,
                 lambda t: t["config"]["type"] != "retrieval",
                 lambda t: True):
        found = [t["name"] for t in tasks if keep(t)]
        if found:
            return found[0]
    return None


def _first_head(seed_dir: Path) -> Path:
    """A seed's head folder; cross-fitted evaluations keep one per fold (``fold<k>/``): serve the first."""
    return seed_dir / "fold0" if (seed_dir / "fold0").is_dir() else seed_dir


def _brief(body) -> str:
    """One line of a JSON answer for the terminal (long vectors shortened)."""
    def short(v):
        if isinstance(v, list) and len(v) > 4 and all(isinstance(x, (int, float)) for x in v):
            return [round(x, 4) for x in v[:3]] + [f"... {len(v)} values"]
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        if isinstance(v, list):
            return [short(x) for x in v[:3]] + ([f"... {len(v)} items"] if len(v) > 3 else [])
        return v
    text = json.dumps(short(body), default=str)
    return text if len(text) <= 240 else text[:237] + "..."


def _serve_stage(cfg: DemoConfig, out: Path, dataset: Path, pretrained: dict, results: dict | None) -> tuple[dict, list]:
    """Start the Serve app for the CLUE encoder (its embeddings, one of its evaluation heads), call every
    route once with a real test user, shut Serve down. Returns (the summary's ``serve`` entry, the
    answers as (method, path, status, body) for the console)."""
    from userfm.data.dataset import read_sequences
    from userfm.serve.app import smoke_calls, start, stop
    from userfm.serve.config import ServeConfig
    from userfm.serve.deployments import events_from_sequence

    # one head deployment (each is a replica process)
    heads_dir = out / "evaluate" / "heads"
    head = _serve_head(results, heads_dir)
    scfg = ServeConfig(
        model=pretrained["clue"]["model"], embeddings=pretrained["clue"]["embeddings"],
        heads={head: str(_first_head(heads_dir / head / "clue-mlp" / "seed0"))} if head else {},
        port=cfg.serve_port,  # (a MiniLM encoder's vector cache is found through its pretraining run, as for users)
    )
    test = read_sequences(dataset, split="test")
    row = max(test.slice(0, 50).to_pylist(), key=lambda r: len(r["ts"]))  # a test user with a real history
    events = events_from_sequence(row)[-20:]
    base = start(scfg)
    try:
        calls = smoke_calls(base, row["user_id"], events, head_name=head)
    finally:
        stop()
    bad = [(m, p, st, _brief(body)) for m, p, st, body in calls if st != 200]
    if bad:
        raise UserfmError(f"serve stage: routes answered with errors: {bad}")
    return {"url": base, "user_id": row["user_id"], "head": head,
            "calls": [{"method": m, "path": p, "status": st} for m, p, st, _ in calls]}, calls
