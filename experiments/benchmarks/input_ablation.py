"""Does the encoder know more than its input? Each pretrained table E against the mean of the item vectors it reads.

The issue's "the embedding never knows less than its input": on real data the frozen CLUE table can lose to
``minilm-mean``, the plain mean of the frozen MiniLM vectors of a user's events, which is exactly what the
encoder's item side reads. This script takes a finished ``real.py`` run folder and evaluates, on the same users,
splits and heads as the run did (its own evaluate passes' configs: tasks, folds, tables):

    E/<head>               the pretrained table alone
    minilm-mean/<head>     the mean item vector alone (the input)
    E+minilm-mean/<head>   both side by side (evaluate's ``concat-minilm``): a residual path from the input,
                           made at read time, so no retraining is needed to ask the question

and prints every row with its paired difference (same resampled users) to the best of them among the
no-pretraining rows (here minilm-mean). If E+minilm-mean beats minilm-mean, the encoder adds something to its
input; if E alone loses to it while E+minilm-mean ties it, the encoder discarded what the input had.

    python experiments/benchmarks/input_ablation.py /work/runs/real6/movielens/run --name movielens
    python experiments/benchmarks/input_ablation.py runs/real/amazon/run --name amazon --tasks next_category_arts

Writes ``docs/results/input-ablation-<name>.md`` (and prints it). Classification tasks only by default:
a retrieval head over tens of thousands of items takes minutes per fit on a CPU (``--tasks`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pass_configs(run: Path) -> list[dict]:
    """The run's evaluate passes' configs (``evaluate/passes/*/config.json``, else ``evaluate/config.json``)."""
    ev = run / "evaluate"
    found = sorted(ev.glob("passes/*/config.json")) or ([ev / "config.json"] if (ev / "config.json").is_file() else [])
    if not found:
        raise SystemExit(f"[input_ablation] {run}: no evaluate config (run real.py on it first)")
    return [json.loads(p.read_text()) for p in found]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("run", help="a real.py run folder (OUT/<set>/run)")
    ap.add_argument("--name", required=True, help="the set's name, for docs/results/input-ablation-<name>.md")
    ap.add_argument("--tasks", nargs="*", default=None, help="tasks to evaluate (default: every non-retrieval task)")
    ap.add_argument("--seeds", type=int, default=1, help="head trainings per (task, model)")
    ap.add_argument("--out", default="", help="evaluate output folder (default: RUN/input_ablation)")
    args = ap.parse_args()

    from real import tables
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig, load_tasks

    run = Path(args.run).resolve()
    out_root = Path(args.out) if args.out else run / "input_ablation"
    keys = {f.name for f in fields(EvalConfig)}
    merged = {"tasks": [], "rows": [], "skipped_tasks": []}
    t0 = time.perf_counter()
    for base in pass_configs(run):
        if not Path(base["tasks"]).is_file():  # e.g. a run made from a worktree since removed: this checkout's file
            here = REPO / "experiments" / "tasks" / Path(base["tasks"]).name
            print(f"[input_ablation] {base['tasks']} is gone: reading {here}", flush=True)
            base["tasks"] = str(here)
        tasks = {t.name: t for t in load_tasks(base["tasks"], tuple(base["only_tasks"]))}
        names = [n for n in tasks if (n in args.tasks if args.tasks is not None else tasks[n].type != "retrieval")]
        if not names:
            continue
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in base.items() if k in keys}
        cfg.update(only_tasks=tuple(names), seeds=args.seeds, baselines=("minilm-mean", "concat-minilm"),
                   embeddings={k: v for k, v in base["embeddings"].items() if v != "random"},
                   out=str(out_root / "_".join(names)), save_heads=False)
        print(f"[input_ablation] {', '.join(names)}: tables {', '.join(cfg['embeddings'])}", flush=True)
        res = run_evaluate(EvalConfig(**cfg))
        merged["tasks"] += res["tasks"]
        merged["rows"] += res["rows"]
    wall = time.perf_counter() - t0
    if not merged["tasks"]:
        raise SystemExit(f"[input_ablation] {run}: no task to evaluate (--tasks {args.tasks})")
    md = "\n".join([
        f"# Input ablation: {args.name}", "",
        f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs); wall {wall:.0f} s.", "",
        "Each pretrained table E, the mean MiniLM vector of the user's events (`minilm-mean`, what E's item side "
        "reads) and both side by side (`E+minilm-mean`), with the same heads, users and splits as the run's own "
        "evaluation. The paired difference is to the best no-pretraining row (minilm-mean here).", "",
        tables(merged)])
    docs = REPO / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"input-ablation-{args.name}.md").write_text(md)
    print(md)
    print(f"[input_ablation] wrote {docs / f'input-ablation-{args.name}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
