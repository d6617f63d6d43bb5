"""``userfm demo``: the end-to-end pipeline on an embedded local Ray, one progress line per stage.

Stages so far: synthesize (or convert real) logs -> ingest with Ray Data -> summary -> pretrain CLUE
on Ray Train (``--compare``: also MLM and SimCLR) -> embed every user -> evaluate the default tasks.
Later stages (report, serve) join here as they land.
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
    n_users: int = 3000  # synthetic users
    events_per_user: float = 30.0  # synthetic mean events per user
    seed: int = 0  # synthetic data seed
    max_events: int = 256  # most recent events kept per user sequence
    pretrain_steps: int = 200  # optimizer steps per pretraining run (0 = skip pretraining)
    compare: bool = False  # also pretrain MLM and SimCLR next to CLUE
    num_workers: int = 2  # Ray Train workers
    eval_seeds: int = 2  # head trainings per (task, model) in the evaluation

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
    stages = _Stages(4 + 2 * len(objectives) + (1 if objectives and tasks else 0))

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
            item_encoder="category" if objective == "mlm" else "text", pooling="cls" if objective == "mlm" else "mean",
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
        vcfg = EvalConfig(data=str(dataset), out=str(out / "evaluate"), tasks=str(tasks), seeds=cfg.eval_seeds,
                          embeddings={**{o: pretrained[o]["embeddings"] for o in objectives}, "random": "random"})
        ev = stages.run("evaluate downstream tasks", lambda: run_evaluate(vcfg))
        evaluation = {"results": str(out / "evaluate" / "results.md"), "headline": _headline(ev)}
    elif objectives:
        print("[demo] no label tables in this data: evaluation skipped")

    result = {
        "config": to_dict(cfg),
        "paths": {"run": str(out), "raw": str(raw), "dataset": str(dataset)},
        "ingest": {k: manifest[k] for k in ("rows_in", "rows_kept", "rows_quarantined", "users", "services")},
        "pretrain": pretrained,
        "evaluate": evaluation,
        "timings_s": stages.timings,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    print(
        f"[demo] finished in {sum(stages.timings.values()):.1f}s: {manifest['rows_in']:,} events -> "
        f"{manifest['users']['total']:,} user sequences in {dataset}; summary: {out / 'demo_summary.json'}"
    )
    return result
