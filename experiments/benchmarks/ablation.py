"""Ablate one pretraining choice next to a finished quality run: same dataset, same splits, side by side.

Takes the run folder that ``quality.py`` (or ``userfm demo``) wrote, reads its CLUE pretraining config (``--base``:
another objective's), changes the given fields, pretrains that variant on the same dataset (Ray Train), embeds every
user, and evaluates the variant and the run's own table of that objective on the same tasks, test users and head
seeds; the variant's rows carry the paired difference to the run's row of the same head (``reference``). Baselines
are left out (they do not change); the run's ``evaluate/results.md`` has them.

    python experiments/benchmarks/quality.py --clue-only --out runs/bench-quality      # once
    python experiments/benchmarks/ablation.py runs/bench-quality/synthetic no-cooc cooc_dim=0
    python experiments/benchmarks/ablation.py runs/bench-quality/synthetic simclr objective=simclr
    python experiments/benchmarks/ablation.py runs/bench-quality/synthetic mlm objective=mlm item_encoder=category pooling=cls
    python experiments/benchmarks/ablation.py RUN fut-steps max_steps=1200 --base future --task-file T.yaml --tasks age_group

Prints the pretraining summary and the evaluation table; everything lands in ``<run>/ablation-<tag>/``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path


def _parse(cfg, pairs: list[str]) -> dict:
    known = {f.name: f for f in fields(cfg)}
    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise SystemExit(f"ablation: {kv!r} is not KEY=VALUE")
        k, v = kv.split("=", 1)
        if k not in known:
            raise SystemExit(f"ablation: {k!r} is not a PretrainConfig field (known: {', '.join(sorted(known))})")
        cur = getattr(cfg, k)
        if isinstance(cur, bool):
            if v.lower() not in ("true", "false"):
                raise SystemExit(f"ablation: {k} takes true or false, got {v!r}")
            out[k] = v.lower() == "true"
        elif isinstance(cur, tuple):
            out[k] = tuple(x for x in v.split(",") if x)
        else:
            out[k] = type(cur)(v)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a quality run's dataset folder parent, e.g. runs/bench-quality/synthetic")
    ap.add_argument("tag", help="name of the variant (its embedding table and output folder)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="PretrainConfig fields to change")
    ap.add_argument("--tasks", nargs="+", default=["age_bracket", "is_parent", "segment"], help="tasks to evaluate")
    ap.add_argument("--task-file", default="", help="task YAML (default: experiments/tasks/synthetic.yaml)")
    ap.add_argument("--seeds", type=int, default=2, help="head seeds per (task, model)")
    ap.add_argument("--base", default="clue", help="the run's pretrained objective whose config is varied and whose table "
                    "the variant is compared with (pretrain/<base>/config.json, e.g. future)")
    ap.add_argument("--folds", type=int, default=-1,
                    help="k-fold cross-fitting of the heads (default: the run's own eval_folds from demo_summary.json, else 0)")
    args = ap.parse_args(argv)

    from userfm.demo import DemoConfig, _default_tasks, embeddings_key
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig, load_tasks
    from userfm.train.pretrain import run_pretrain
    from userfm.train.pretrain_config import PretrainConfig

    run = Path(args.run)
    saved = run / "pretrain" / args.base / "config.json"
    if not saved.exists():
        raise SystemExit(f"ablation: {saved} not found (run quality.py or userfm demo first)")
    base = json.loads(saved.read_text())["pretrain"]
    cfg = PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in base.items()})
    out = run / f"ablation-{args.tag}"
    if out.exists():
        raise SystemExit(f"ablation: {out} exists; choose another tag or remove it")
    cfg = replace(cfg, out=str(out / "pretrain"), **_parse(cfg, args.overrides))
    task_file = args.task_file or str(_default_tasks(DemoConfig()))
    views = {t.name: t.view for t in load_tasks(task_file, tuple(args.tasks))}  # (holdout, history service) each
    if len(set(views.values())) > 1:  # the run evaluates these from separate embedding tables (demo: one pass each)
        raise SystemExit("ablation: these tasks read different histories (" + ", ".join(
            f"{t}: holdout {h}{f', {s} events only' if s else ''}" for t, (h, s) in views.items()) +
            "); they need separate ablation calls")
    holdout, service = next(iter(views.values()))
    folds = args.folds
    if folds < 0:
        summary = run / "demo_summary.json"
        done = json.loads(summary.read_text()) if summary.exists() else {}
        # the folds the run evaluated with (resolved by the demo when its config left them to it)
        folds = (done.get("evaluate") or {}).get("folds", done.get("config", {}).get("eval_folds") or 0)
    # cross-fitted, every user is a test user once, so pretraining must not have read the held-out events; on the
    # dataset's split the test users are never pretrained on (the demo's Amazon run: holdout_last 0, no folds)
    if holdout and folds and cfg.holdout_last < holdout:
        raise SystemExit(f"ablation: {', '.join(views)} hold out events and are cross-fitted ({folds} folds), but "
                         f"the run's {args.base} was pretrained with holdout_last={cfg.holdout_last}; run quality.py with "
                         "folds, as for MovieLens")
    table = embeddings_key(holdout, service)
    t0 = time.perf_counter()
    s = run_pretrain(cfg)
    print(f"[ablation] pretrained {args.tag} in {time.perf_counter() - t0:.0f}s: "
          f"val_loss {s['final'].get('val_loss', float('nan')):.3f}, loss {s['final'].get('loss', float('nan')):.3f}", flush=True)
    # the same histories as the run's table it is compared with: whole, or without the held-out events (and of
    # one service only, for a transfer task)
    e = EmbedConfig(model=s["model"], data=cfg.data, out=str(out / table), holdout_last=holdout,
                    history_service=service, minilm_cache=cfg.minilm_cache)  # the run's cache: no text encoded twice
    run_embed(e)
    v = EvalConfig(data=cfg.data, out=str(out / "evaluate"), tasks=task_file, folds=folds,
                   only_tasks=tuple(args.tasks), seeds=args.seeds, baselines=(),
                   embeddings={args.base: str(run / table / args.base), args.tag: e.out}, reference=args.base)
    run_evaluate(v)
    print((out / "evaluate" / "results.md").read_text())
    print(f"[ablation] {args.tag}: {time.perf_counter() - t0:.0f}s in all -> {out}")


if __name__ == "__main__":
    main()
