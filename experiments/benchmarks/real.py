"""Real-data benchmark: the pretrained embeddings against the yardsticks that need no pretraining, on real logs.

One command runs, on each shared real set, convert -> ingest -> pretrain -> embed -> evaluate (the demo's
stages, no report, no serve; the demo's objectives on real data, CLUE, SimCLR, MLM, next and future where the data
supports them, unless ``--objectives`` names others) and prints one table per task: every model (with the
``val-chosen`` row, the objective and head each task's validation users prefer) and yardstick with its 95 %
bootstrap interval, and the paired difference (same resampled users) to the task's best no-pretraining row
(bag-of-items and TF-IDF, each with the logistic and the U-MLP head the embeddings get; mean-MiniLM; popularity,
item-kNN, SASRec trained from scratch: whichever scores highest on test, which favours the yardstick), plus the
wall time of every stage. Small sets are cross-fitted (every labelled user scored once), as the demo does on real
data; Amazon is not (see SETS).

    python experiments/benchmarks/real.py                         # all three sets (hours on 2 cores)
    python experiments/benchmarks/real.py --sets tenrec           # one set
    python experiments/benchmarks/real.py --sets movielens --steps 100 --seeds 1
    python experiments/benchmarks/real.py --sets tenrec --render --labels 250 1000 --seeds 3  # label budgets, over a finished run

Sets (READMEs in ``../shared/data/<folder>``; nothing is copied into the project):

    movielens  movielens-latest-small  671 users, real timestamps     next_genre, next_item
    amazon     amazon-arts-office      9,577 users, arts + office,    next item (all / within each service),
                                       order only (positions)         next category words per service
                                                                      (experiments/tasks/amazon-arts-office.yaml)
    tenrec     tenrec-qba              11,376 users, item ids only,   age_group (next-item tasks skipped:
                                       no order, age groups           the source has no order)

Writes ``OUT/<set>/real.md`` (and the demo's run folder beside it) and ``docs/results/real-<set>.md``.
The numbers are the run's own ``evaluate/results.json`` rows (nothing is recomputed here).

``--render`` writes the same files from the run folders already in ``OUT`` without running anything: for a
run stopped part-way (the Amazon set's evaluation takes hours on 2 cores), the tables of every evaluate pass
that finished (``evaluate/passes/<pass>/results.json``), with the passes that did not listed as such.

``--labels N ...`` then evaluates again with every head and yardstick trained on N labelled users (the
semi-supervised setting a pretrained encoder is for; the same encoders, test users and folds) and writes
``docs/results/real-<set>-labels.md``; with ``--render``, those passes alone over a finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETS = {  # name -> (folder under --data-root, DemoConfig fields)
    "movielens": ("movielens-latest-small", {"format": "movielens"}),
    # 38,396 items: every retrieval head and SASRec over the whole catalog take minutes per fit, so 5 folds would
    # take hours on 2 cores; its 9,577 users leave ~950 on the test split (HR@10 intervals ~+-0.015)
    "amazon": ("amazon-arts-office", {"format": "recbole", "service_field": "domain", "eval_folds": 0,
                                      "tasks": str(REPO / "experiments" / "tasks" / "amazon-arts-office.yaml")}),
    # item ids only: MiniLM has no text to read ("item 123"); the BPE text encoder and the co-occurrence vectors do
    "tenrec": ("tenrec-qba", {"format": "recbole", "item_encoder": "text"}),
}


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def tables(results: dict) -> str:
    """Markdown: per task, every row (pretrained first, the val-chosen one at their top, then the yardsticks, the
    random floor last) with its interval and its paired difference to the task's best yardstick, then what val
    chose."""
    from userfm.eval.render import _fmt, _fmt_diff, _tuning_notes
    from userfm.eval.val_chosen import VAL_CHOSEN

    out = []
    for task in results["tasks"]:
        rows = [r for r in results["rows"] if r["task"] == task["name"]]
        best = task.get("best_yardstick")
        users = task["users"]
        who = (f"{users['test']:,} users, {users['folds']}-fold cross-fit" if "folds" in users
               else f"{users['test']:,} test users")
        out += [f"### {task['name']} ({rows[0]['metric']}; {who}"
                + (f"; {task['n_items']:,} items, full ranking" if "n_items" in task else "")
                + (f" within the target's service ({'/'.join(f'{n:,}' for n in task['n_items_ranked'])} ranked)"
                   if task.get("n_items_ranked") else "") + ")", "",
                f"| model | {rows[0]['metric']} [95 % CI] | cold users | vs best yardstick ({best or '-'}) | "
                f"{' | '.join(rows[0]['other_metrics'])}{' | ' if rows[0]['other_metrics'] else ''}fit s |",
                "|---|---|---|---|" + "---|" * len(rows[0]["other_metrics"]) + "---|"]

        def order(r):
            emb = r["embedding"]
            return (2 if emb == "random" else 0 if emb not in (None, "minilm-mean") else 1, r["model"] != VAL_CHOSEN, r["model"])

        for r in sorted(rows, key=order):
            other = "".join(f"{v:.3f} | " if v is not None else "- | " for v in r["other_metrics"].values())
            vs = "(best)" if r["model"] == best else _fmt_diff(r.get("vs_best"))
            out.append(f"| {r['model']} | {_fmt(r['test'])} | {_fmt(r.get('cold'))} | {vs} | {other}{r['train_s']:.1f} |")
        out += ["", *_tuning_notes(rows)]
    for sk in results.get("skipped_tasks", []):
        out.append(f"Skipped task {sk['task']}: {sk['reason']}")
    return "\n".join(out) + "\n"


def finished_results(run: Path) -> tuple[dict, list[str] | None]:
    """The run's evaluation: ``evaluate/results.json`` once the demo merged its passes (second item None), else
    the tasks and rows of every pass that finished (``evaluate/passes/<pass>/results.json``) and their names."""
    ev = run / "evaluate"
    if (ev / "results.json").is_file() and "passes" in (merged := json.loads((ev / "results.json").read_text())):
        return merged, None
    parts = sorted((ev / "passes").glob("*/results.json"), key=lambda f: f.stat().st_mtime)
    if not parts:
        raise SystemExit(f"[real] {run}: no evaluate pass has finished yet (no {ev / 'passes'}/*/results.json)")
    loaded = [json.loads(f.read_text()) for f in parts]
    return ({"seeds": loaded[0]["seeds"], "config": loaded[0]["config"], "tasks": [t for r in loaded for t in r["tasks"]],
             "rows": [row for r in loaded for row in r["rows"]],
             "skipped_tasks": [sk for r in loaded for sk in r.get("skipped_tasks", [])]}, [f.parent.name for f in parts])


def _pretrain_lines(pretrain: dict) -> list[str]:
    return [f"{obj.upper()} pretrained {pre.get('step', '-')} steps (train loss {_num(pre.get('loss'))}, val loss "
            f"{_num(pre.get('val_loss'))})"
            + (f"; exported the weights of step {pre['exported']['step']} (val loss {_num(pre['exported']['val_loss'])})"
               f"{', stopped early' if pre.get('early_stopped') else ''}" if pre.get("exported") else "") + "."
            for obj, pre in pretrain.items()]


def _write(name: str, md: str, out: Path) -> str:
    """``OUT/<set>/real.md`` and ``docs/results/real-<name>.md`` (``name``: the set, or ``--name``)."""
    (out / "real.md").write_text(md)
    docs = REPO / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"real-{name}.md").write_text(md)
    print(md, flush=True)
    print(f"[real] wrote {out / 'real.md'} and {docs / f'real-{name}.md'}", flush=True)
    return md


def render_set(name: str, args: argparse.Namespace) -> str:
    """``--render``: the tables of ``OUT/<name>/run`` as it stands (every finished pass), nothing run."""
    out = Path(args.out) / name
    run = out / "run"
    results, passes = finished_results(run)
    pretrain = {}
    for f in sorted((run / "pretrain").glob("*/summary.json")):
        sm = json.loads(f.read_text())
        pretrain[f.parent.name] = {**{k: sm["final"].get(k) for k in ("step", "loss", "val_loss")},
                                   "exported": sm.get("exported"), "early_stopped": sm.get("early_stopped")}
    log = run / "logs" / "demo.log"
    plan = next((ln for ln in log.read_text().splitlines() if ln.startswith("[demo] tasks from ")), "") if log.is_file() else ""
    text = [f"# Real data: {name} ({run})", "",
            f"Rendered with `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}) from the run folder "
            "as it stood: " + ("the demo finished." if passes is None else
                               f"evaluate passes finished: {', '.join(passes)}. The run was stopped before its other "
                               "passes finished: their tasks are not in these tables."), "",
            *([f"The run's plan: `{plan}`", ""] if plan and passes is not None else []),
            *_pretrain_lines(pretrain), "",
            f"Head seeds {len(results['seeds'])}; evaluation "
            + (f"{results['config']['folds']}-fold cross-fitted" if (results.get("config") or {}).get("folds")
               else "on the test split") + ".", "",
            tables(results)]
    return _write(args.name or name, "\n".join(text), out)


def run_set(name: str, args: argparse.Namespace) -> str:
    from userfm.demo import DemoConfig, run_demo

    folder, fields = SETS[name]
    data = Path(args.data_root) / folder
    if not data.is_dir():
        raise SystemExit(f"[real] {name}: no folder {data} (the shared real data; --data-root points at it)")
    out = Path(args.out) / name
    cfg = DemoConfig(out=str(out / "run"), data=str(data), eval_seeds=args.seeds, report=False, serve=False,
                     baselines=DemoConfig.baselines + ("sasrec", "sparse-mlp"),
                     objectives=tuple(args.objectives) if args.objectives is not None else None,
                     minilm_cache=str(Path(args.minilm_cache).resolve()) if args.minilm_cache else "",
                     **({"pretrain_steps": args.steps} if args.steps else {}),
                     **{**fields, **({"eval_folds": args.folds} if args.folds is not None else {}),
                        **({"tasks": str(Path(args.tasks).resolve())} if args.tasks else {})})
    t0 = time.perf_counter()
    summary = run_demo(cfg, num_cpus=args.num_cpus)
    wall = time.perf_counter() - t0
    results = json.loads((out / "run" / "evaluate" / "results.json").read_text())
    text = [f"# Real data: {name} ({data.name})", "",
            f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()} "
            f"{platform.processor() or ''}, {os.cpu_count()} CPUs)".replace(" ,", ","), "",
            *_pretrain_lines(summary["pretrain"]), "",
            f"Pretraining budget: {next(iter(summary['pretrain'].values()), {}).get('budget', '-')}.", "",
            f"Head seeds {cfg.eval_seeds}; evaluation "
            + (f"{summary['evaluate']['folds']}-fold cross-fitted" if (summary.get("evaluate") or {}).get("folds")
               else "on the test split") + ".", "",
            f"Wall time {wall:.0f} s; stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()), "",
            tables(results)]
    return _write(args.name or name, "\n".join(text), out)


def label_budgets(name: str, args: argparse.Namespace) -> str:
    """``--labels N ...``: the run's evaluation again per label budget, over its finished run folder: the same
    encoder tables (pretrained on every training user, unlabelled), tasks, folds and yardsticks, but every head
    and yardstick trains on N labelled users (``EvalConfig.labels``; the same test users). Writes
    ``OUT/<set>/labels.md`` and ``docs/results/real-<name>-labels.md``."""
    from userfm.config import from_dict
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig

    out = Path(args.out) / name
    ev = out / "run" / "evaluate"
    passes = sorted((ev / "passes").glob("*/results.json"))  # the demo's evaluate passes (one per holdout / history)
    if not passes and not (ev / "results.json").is_file():
        raise SystemExit(f"[real] --labels: {ev} holds no finished evaluation (run the set first)")
    configs = {f.parent.name: json.loads(f.read_text())["config"] for f in passes} or {
        "all": json.loads((ev / "results.json").read_text())["config"]}
    text = [f"# Real data: {name}, label budgets ({out / 'run'})", "",
            f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
            f"{os.cpu_count()} CPUs)", "",
            "The run's own evaluation again, per label budget N: the same encoder tables (pretrained on every training "
            "user, unlabelled), tasks, folds and test users; every head and every yardstick trains on N labelled "
            f"users (and the same share of validation users; `EvalConfig.labels`). Head seeds {args.seeds}.", ""]
    for n in args.labels:
        t0 = time.perf_counter()
        merged: dict = {"tasks": [], "rows": [], "skipped_tasks": []}
        for pass_name, base in configs.items():
            cfg = from_dict(EvalConfig, {**base, "labels": n, "seeds": args.seeds, "save_heads": False,
                                         "charts": False, "out": str(out / f"labels{n}" / pass_name)},
                            where=f"{pass_name} config")
            res = run_evaluate(cfg)
            for k in merged:
                merged[k] += res.get(k, [])
        text += [f"## {n:,} labelled users ({time.perf_counter() - t0:.0f} s)", "", tables(merged)]
        print("\n".join(text[-3:]), flush=True)
    md = "\n".join(text)
    (out / "labels.md").write_text(md)
    docs = REPO / "docs" / "results" / f"real-{args.name or name}-labels.md"
    docs.write_text(md)
    print(f"[real] wrote {out / 'labels.md'} and {docs}", flush=True)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), help="which real sets (default: all)")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                    help="folder holding the shared real sets (default: ../shared/data beside the repository)")
    ap.add_argument("--out", default="runs/real", help="run folders, one per set (each replaced)")
    ap.add_argument("--steps", type=int, default=0, help="pretraining steps of each objective, at most (0 = the demo's default)")
    ap.add_argument("--seeds", type=int, default=2, help="head trainings per (task, model)")
    ap.add_argument("--folds", type=int, default=None,
                    help="cross-fitting folds (default: the demo's rule, 5 when a task has < 2,000 test users; 0 = split)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")
    ap.add_argument("--objectives", nargs="*", default=None,
                    help="pretrain these too, next to CLUE (e.g. future next, or a multi-task sum: clue+future; none "
                         "given: CLUE alone). Default: the demo's own choice on real data, userfm.demo.REAL_OBJECTIVES "
                         "(every task then gets a val-chosen row)")
    ap.add_argument("--minilm-cache", default="runs/real/minilm_cache",
                    help="MiniLM vectors kept between runs, each distinct text encoded once ('' = one per run)")
    ap.add_argument("--tasks", default=None,
                    help="a task file to evaluate instead of the set's own (e.g. some of its tasks; one set at a time)")
    ap.add_argument("--name", default=None,
                    help="write docs/results/real-NAME.md instead of real-<set>.md (one set at a time)")
    ap.add_argument("--labels", nargs="+", type=int, default=[], metavar="N",
                    help="then evaluate again with every head and yardstick on N labelled users each (the encoders "
                         "as pretrained; with --render: those passes alone, over the run folders already in --out); writes "
                         "docs/results/real-<set>-labels.md")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write the tables of the run folders already in --out (every finished pass)")
    args = ap.parse_args()
    if (args.tasks or args.name) and len(args.sets) != 1:
        ap.error("--tasks and --name apply to one set: give --sets with one name")
    if args.tasks and not Path(args.tasks).is_file():
        ap.error(f"--tasks: no file {args.tasks}")
    for name in args.sets:
        if not (args.render and args.labels):  # --render --labels: the label passes alone (real-<set>.md kept)
            (render_set if args.render else run_set)(name, args)
        if args.labels:
            label_budgets(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
