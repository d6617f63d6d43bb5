"""``userfm demo``: the end-to-end pipeline on an embedded local Ray, one progress line per stage.

Stages: synthesize (or convert real) logs -> ingest with Ray Data -> summary -> pretrain CLUE on Ray
Train (``--compare``: also MLM and SimCLR) -> embed every user with Ray Data actors -> evaluate the
default tasks -> write the HTML report -> start the Ray Serve app, call each route once, print the
answers -> shut Serve down. Everything lands in one run folder; ``demo_summary.json`` lists it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from userfm.config import to_dict
from userfm.errors import UserfmError

REAL_FORMATS = ("movielens", "online-retail", "amazon-reviews")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"  # run folder; replaced on every run
    data: str | None = None  # real logs instead of synthetic (folder or file)
    format: str | None = None  # format of `data`: movielens | online-retail | amazon-reviews | events
    n_users: int = 10_000  # synthetic users (10k: CLUE sees ~8k training users, ~6 epochs in 400 steps, and does not overfit)
    events_per_user: float = 30.0  # synthetic mean events per user
    seed: int = 0  # synthetic data seed
    max_events: int = 256  # most recent events kept per user sequence
    pretrain_steps: int = 400  # optimizer steps per pretraining run (0 = skip pretraining)
    batch_size: int = 64  # users per worker per step (the contrastive batch is this x num_workers)
    size: str = "small"  # encoder size (encoders.SIZES): small = width 128, 4 layers -> 128-float user embeddings
    proj_dim: int = 128  # clue/simclr: projection MLP under the contrastive loss (embeddings are taken before it); 0 = none
    clue_crop: float = 0.5  # clue: each step, each service view keeps a random time window of U[clue_crop, 1] of its span
    bucket_batches: int = 8  # length bucketing in pretraining (PretrainConfig.bucket_batches); measured to learn here
    compare: bool = False  # also pretrain MLM and SimCLR next to CLUE
    item_encoder: str = "minilm"  # clue/simclr items: minilm (frozen MiniLM vectors, cached) | text (BPE, from scratch) | category
    num_workers: int = 2  # Ray Train workers
    eval_seeds: int = 2  # head trainings per (task, model) in the evaluation
    t_trans: bool = False  # also train the task-specific T-Trans baseline per task (slow: minutes per task)
    baselines: tuple[str, ...] = ("tfidf", "oracle", "popularity", "minilm-mean")  # evaluate baselines (EvalConfig.baselines); t_trans adds "t-trans"
    report: bool = True  # write the HTML run report (report/report.html)
    serve: bool = True  # start the Serve app on 127.0.0.1, call each route once, shut it down
    serve_port: int = 0  # HTTP port for the serve stage; 0 = a free one

    def __post_init__(self):
        if self.data is not None and self.format not in REAL_FORMATS + ("events",):
            raise ValueError(f"--data needs --format, one of {', '.join(REAL_FORMATS + ('events',))}; got {self.format!r}")
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"--data {self.data!r}: no such file or folder")


_TASKS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "tasks"


def _default_tasks(cfg: DemoConfig) -> Path | None:
    """The task file for this data, or None when the data has no labels to evaluate against."""
    if cfg.data is None:
        return _TASKS_DIR / "synthetic.yaml"
    if cfg.format == "movielens":
        return _TASKS_DIR / "movielens.yaml"  # used only if the conversion produced attributes
    return None


def _headline(results: dict) -> dict:
    """task -> {model: primary metric} for the final summary (read from results.json's rows)."""
    out: dict = {}
    for row in results.get("rows", []):
        value = row["test"]["value"]
        if value is not None:
            out.setdefault(row["task"], {})[row["model"]] = round(value, 3)
    return out


class _Stages:
    """Prints ``[k/n] name ... done in Xs`` lines and keeps the timings."""

    def __init__(self, total: int):
        self.total, self.k, self.timings = total, 0, {}

    def run(self, name: str, fn):
        self.k += 1
        print(f"[demo {self.k}/{self.total}] {name} ...", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 2)
        print(f"[demo {self.k}/{self.total}] {name} done in {self.timings[name]:.1f}s", flush=True)
        return out


def run_demo(cfg: DemoConfig, *, address: str | None = None, num_cpus: int | None = None) -> dict:
    """Run every landed stage into ``cfg.out``; returns (and writes) ``demo_summary.json``."""
    from userfm.dataset import format_summary, summarize
    from userfm.ingest import IngestConfig, run_ingest
    from userfm.embed import EmbedConfig, run_embed
    from userfm.evaluate import EvalConfig, run_evaluate
    from userfm.pretrain import PretrainConfig, run_pretrain
    from userfm.runtime import init_ray

    out = Path(cfg.out)
    if out.exists():
        if not (out / "demo_summary.json").exists() and any(out.iterdir()):
            raise UserfmError(f"{out} exists and is not a demo run folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    raw, dataset = out / "raw", out / "dataset"
    objectives = (("clue", "mlm", "simclr") if cfg.compare else ("clue",)) if cfg.pretrain_steps else ()
    tasks = _default_tasks(cfg)
    stages = _Stages(4 + 2 * len(objectives) + (1 if objectives and tasks else 0) + int(cfg.report)
                     + int(cfg.serve and bool(objectives)))

    attributes: tuple[str, ...] = ()
    if cfg.data is None:
        from userfm.synth import SynthConfig, generate

        scfg = SynthConfig(n_users=cfg.n_users, events_per_user=cfg.events_per_user, seed=cfg.seed)
        stages.run("synthesize multi-service logs", lambda: generate(scfg, raw, progress=print))
        inputs = (str(raw / "events"),)
        attributes = tuple(str(raw / f) for f in ("attributes.parquet", "future_labels.parquet"))
    elif cfg.format == "events":
        stages.run("use canonical events", lambda: None)
        inputs = (cfg.data,)
    else:
        from userfm.convert import convert

        stages.run(f"convert {cfg.format} logs", lambda: convert(cfg.format, cfg.data, raw))
        inputs = (str(raw / "events.parquet"),)
        attributes = tuple(str(p) for p in [raw / "attributes.parquet"] if p.exists())

    icfg = IngestConfig(inputs=inputs, out=str(dataset), attributes=attributes, max_events=cfg.max_events)
    stages.run("start Ray", lambda: init_ray(address, num_cpus=num_cpus))
    manifest = stages.run("ingest with Ray Data", lambda: run_ingest(icfg))
    summary = stages.run("summarize", lambda: summarize(dataset))
    print(format_summary(summary))

    pretrained = {}
    for objective in objectives:
        pcfg = PretrainConfig(
            data=str(dataset), out=str(out / "pretrain" / objective), objective=objective,
            item_encoder="category" if objective == "mlm" else cfg.item_encoder,
            pooling="cls" if objective == "mlm" else "mean", batch_size=cfg.batch_size, bucket_batches=cfg.bucket_batches,
            size=cfg.size, proj_dim=cfg.proj_dim, clue_crop=cfg.clue_crop,
            max_steps=cfg.pretrain_steps, num_workers=cfg.num_workers, seed=cfg.seed,
            eval_every=max(1, cfg.pretrain_steps // 4), checkpoint_every=max(1, cfg.pretrain_steps // 2),
            log_every=max(1, cfg.pretrain_steps // 10),
        )
        s = stages.run(f"pretrain {objective} on Ray Train", lambda: run_pretrain(pcfg))
        pretrained[objective] = {
            "model": s["model"],
            **{k: s["final"].get(k) for k in ("step", "loss", "val_loss", "samples_per_s", "pf_days") if k in s["final"]},
        }
        ecfg = EmbedConfig(model=s["model"], data=str(dataset), out=str(out / "embeddings" / objective))
        e = stages.run(f"embed users with {objective}", lambda: run_embed(ecfg))
        pretrained[objective]["embeddings"] = ecfg.out
        pretrained[objective]["users_embedded"] = e["users_embedded"]

    evaluation = None
    if objectives and tasks:
        baselines = cfg.baselines + (("t-trans",) if cfg.t_trans and "t-trans" not in cfg.baselines else ())
        vcfg = EvalConfig(data=str(dataset), out=str(out / "evaluate"), tasks=str(tasks), seeds=cfg.eval_seeds,
                          embeddings={**{o: pretrained[o]["embeddings"] for o in objectives}, "random": "random"},
                          baselines=baselines)
        ev = stages.run("evaluate downstream tasks", lambda: run_evaluate(vcfg))
        evaluation = {"results": str(out / "evaluate" / "results.md"), "headline": _headline(ev)}
    elif objectives:
        print("[demo] no label tables in this data: evaluation skipped")

    report = None
    if cfg.report:
        from userfm.report import ReportConfig, run_report

        # demo_summary.json so far, so the report's run section has the stage timings
        (out / "demo_summary.json").write_text(json.dumps({"config": to_dict(cfg), "timings_s": stages.timings}, indent=2))
        report = stages.run("write the HTML report", lambda: run_report(ReportConfig(run=str(out)), progress=print))["html"]

    served = None
    if cfg.serve and objectives:
        served = stages.run("serve embeddings and heads over HTTP (Ray Serve)",
                            lambda: _serve_stage(cfg, out, dataset, pretrained, evaluation is not None))

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
    if report:
        print(f"[demo] report: {report}")
    return result


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


def _serve_stage(cfg: DemoConfig, out: Path, dataset: Path, pretrained: dict, with_heads: bool) -> dict:
    """Start the Serve app for the CLUE encoder (its embeddings, its evaluation heads), call every
    route once with a real test user, print the answers, shut Serve down."""
    from userfm.dataset import read_sequences
    from userfm.serve import ServeConfig, events_from_sequence, smoke_calls, start, stop

    # one head deployment (each is a replica process): the first attribute task's CLUE U-MLP
    heads_dir = out / "evaluate" / "heads"
    tasks = [d.name for d in sorted(heads_dir.iterdir()) if (d / "clue-mlp" / "seed0").is_dir()] if with_heads else []
    head = "segment" if "segment" in tasks else (tasks[0] if tasks else None)
    scfg = ServeConfig(
        model=pretrained["clue"]["model"], embeddings=pretrained["clue"]["embeddings"],
        heads={head: str(heads_dir / head / "clue-mlp" / "seed0")} if head else {},
        minilm_cache=str(dataset / "minilm_cache") if (dataset / "minilm_cache").exists() else "",
        port=cfg.serve_port,
    )
    test = read_sequences(dataset, split="test")
    row = max(test.slice(0, 50).to_pylist(), key=lambda r: len(r["ts"]))  # a test user with a real history
    events = events_from_sequence(row)[-20:]
    base = start(scfg)
    try:
        calls = smoke_calls(base, row["user_id"], events, head_name=head)
    finally:
        stop()
    for method, path, status, body in calls:
        print(f"[demo]   {method:<4} {path:<40} -> {status} {_brief(body) if path != '/docs' else '(OpenAPI UI)'}")
    bad = [(m, p, st) for m, p, st, _ in calls if st != 200]
    if bad:
        raise UserfmError(f"serve stage: routes answered with errors: {bad}")
    return {"url": base, "user_id": row["user_id"], "head": head,
            "calls": [{"method": m, "path": p, "status": st} for m, p, st, _ in calls]}
