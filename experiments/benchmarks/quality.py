"""Quality benchmark: do the frozen user embeddings earn their place against simple baselines?

One command runs, at demo size, synth (latent story) -> ingest -> pretrain each objective (CLUE, SimCLR,
MLM) -> embed -> evaluate, i.e. ``userfm demo --compare`` with the T-Trans baseline, and prints, per
task, every model's test metric with its 95 % bootstrap interval, the same on the cold users (bottom
quartile of history length), CLUE + U-MLP's margin over TF-IDF and over T-Trans on all and on cold
users, the Bayes oracle, and the wall time of each stage. ``--movielens DIR`` adds the same pipeline on
real MovieLens logs (next-genre, next-item HR@10 / NDCG@10, attributes where the release has them).

    python experiments/benchmarks/quality.py                          # synthetic, ~15-25 min on 2 cores
    python experiments/benchmarks/quality.py --no-t-trans --steps 200  # quicker look
    python experiments/benchmarks/quality.py --movielens ../shared/data/movielens-latest-small
    python experiments/benchmarks/quality.py --clue-only --no-t-trans --labels 200 1000 --seeds 2  # label budgets
    python experiments/benchmarks/quality.py --labels 200 1000 --seeds 2 --t-trans-tasks is_parent segment \\
        --labels-over runs/bench-quality/synthetic  # label budgets only, over a finished run

``--labels N ...`` adds the semi-supervised setting a foundation model is for: the encoder is pretrained on
every training user (unlabelled) as before, but the heads and every baseline (TF-IDF, T-Trans,
mean-MiniLM) train on only N labelled users (EvalConfig.labels; the same test users), per budget.

The numbers are the demo's own results.json rows (nothing is recomputed here), so they match
``runs/.../evaluate/results.md`` of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = ("clue/mlp", "clue/logreg", "simclr/mlp", "mlm/mlp", "random/mlp", "tfidf/logreg", "minilm-mean/mlp",
          "clue+tfidf/logreg", "t-trans", "popularity", "oracle")
HEADER = ("CLUE U-MLP", "CLUE logreg", "SimCLR", "MLM", "random", "TF-IDF", "mean-MiniLM", "CLUE+TF-IDF", "T-Trans",
          "popularity", "oracle")


def _cell(part: dict | None) -> str:
    if not part or part.get("value") is None:
        return "-"
    lo, hi = part.get("ci") or (None, None)
    return f"{part['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def _margin(a: dict | None, b: dict | None, higher: bool) -> str:
    if not a or not b or a.get("value") is None or b.get("value") is None:
        return "-"
    d = a["value"] - b["value"]
    return f"{d if higher else -d:+.3f}"


def tables(by: dict) -> str:
    """Markdown: all users, cold users, and CLUE's margins, one row per task; ``by``: (task, model) -> row."""
    rows = list(by.values())
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    present = [m for m in MODELS if any(k[1] == m for k in by)]
    head = [HEADER[MODELS.index(m)] for m in present]
    out = []
    for part, title in (("test", "all test users"), ("cold", "cold users (bottom quartile of history length)")):
        out += [f"### {title}", "", "| task (metric) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for t in tasks:
            metric = next(r["metric"] for r in rows if r["task"] == t)
            cells = [_cell(by[(t, m)].get(part)) if (t, m) in by and (part == "test" or m != "oracle") else "-" for m in present]
            out.append(f"| {t} ({metric}) | " + " | ".join(cells) + " |")
        out.append("")
    out += ["### CLUE + U-MLP margin (positive = CLUE better; rmse sign flipped)", "",
            "| task | vs TF-IDF | vs TF-IDF, cold | vs T-Trans | vs T-Trans, cold | vs SimCLR | vs random |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        c = by.get((t, "clue/mlp"))
        if c is None:
            continue
        hi = c["higher_is_better"]
        g = lambda m, part="test": (by.get((t, m)) or {}).get(part)  # noqa: E731
        out.append(f"| {t} | {_margin(c['test'], g('tfidf/logreg'), hi)} | {_margin(c['cold'], g('tfidf/logreg', 'cold'), hi)} | "
                   f"{_margin(c['test'], g('t-trans'), hi)} | {_margin(c['cold'], g('t-trans', 'cold'), hi)} | "
                   f"{_margin(c['test'], g('simclr/mlp'), hi)} | {_margin(c['test'], g('random/mlp'), hi)} |")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace, out: Path, **data) -> tuple[dict, dict]:
    """The demo's stages (no report, no serve), then T-Trans on the attribute tasks in a second evaluate
    pass over the same dataset and tables (T-Trans on every task would take hours on 2 cores).
    Returns (demo summary, {(task, model): row} over both passes)."""
    from userfm.demo import DemoConfig, _default_tasks, run_demo
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig

    cfg = DemoConfig(out=str(out), compare=not args.clue_only, eval_seeds=args.seeds, report=False, serve=False,
                     n_users=args.users, seed=args.seed, baselines=("tfidf", "oracle", "popularity", "minilm-mean", "concat-tfidf"),
                     **({"pretrain_steps": args.steps} if args.steps else {}), **data)
    t0 = time.perf_counter()
    summary = run_demo(cfg, num_cpus=args.num_cpus)
    rows = json.loads((out / "evaluate" / "results.json").read_text())["rows"]
    tasks = [t for t in args.t_trans_tasks if any(r["task"] == t for r in rows)]
    if args.t_trans and tasks:
        t1 = time.perf_counter()
        tables = {o: p["embeddings"] for o, p in summary["pretrain"].items()}
        vcfg = EvalConfig(data=str(out / "dataset"), out=str(out / "evaluate-ttrans"), tasks=str(_default_tasks(cfg)),
                          only_tasks=tuple(tasks), seeds=1, embeddings={"clue": tables["clue"]},
                          baselines=("t-trans",), t_trans_lrs=tuple(args.t_trans_lrs), save_heads=False, charts=False)
        extra = run_evaluate(vcfg)
        rows += [r for r in extra["rows"] if r["model"] == "t-trans"]
        summary["timings_s"]["T-Trans pass"] = round(time.perf_counter() - t1, 1)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary, {(r["task"], r["model"]): r for r in rows}


def _ttrans_choice(row: dict) -> str:
    t = row.get("t_trans") or {}
    return f"{t['lr']:g}, {t['best_epoch']}" if "lr" in t else "-"


def label_curve(args: argparse.Namespace, out: Path, summary: dict, tasks: list[str]) -> tuple[str, dict]:
    """One evaluate pass per label budget over the demo's dataset and CLUE table: CLUE and random (U-MLP and
    logistic heads), TF-IDF, mean-MiniLM and T-Trans on ``tasks``. Returns (markdown table, {budget: rows})."""
    from userfm.demo import DemoConfig, _default_tasks
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.render import _fmt, _fmt_diff
    from userfm.eval.tasks import EvalConfig

    clue = summary["pretrain"]["clue"]["embeddings"]
    lines = ["### Label budget: heads and baselines on N labelled users (encoder pretrained on all training users, unlabelled)", "",
             "| task | labels | CLUE U-MLP | CLUE logreg | TF-IDF | T-Trans | mean-MiniLM | random | CLUE - TF-IDF | cold | CLUE - T-Trans | cold "
             "| T-Trans s | T-Trans lr, best epoch |", "|---" * 14 + "|"]
    by_budget = {}
    for n in args.labels:
        t0 = time.perf_counter()
        cfg = EvalConfig(data=str(out / "dataset"), out=str(out / f"evaluate-labels{n}"), tasks=str(_default_tasks(DemoConfig())),
                         only_tasks=tuple(tasks), seeds=args.seeds, labels=n, heads=("mlp", "logreg"),
                         embeddings={"clue": clue, "random": "random"},
                         baselines=("tfidf", "minilm-mean", "t-trans"),
                         t_trans_lrs=tuple(args.t_trans_lrs), save_heads=False, charts=False,
                         # few users = few steps per epoch: T-Trans gets U-MLP's epoch cap and patience, so its
                         # own early stopping, not the cap, ends it (best epochs are in the results)
                         t_trans_max_epochs=200, t_trans_patience=10)
        rows = {(r["task"], r["model"]): r for r in run_evaluate(cfg)["rows"]}
        by_budget[n] = rows
        print(f"[quality] label budget {n}: {time.perf_counter() - t0:.0f} s", flush=True)
        for t in tasks:
            c = rows.get((t, "clue/mlp"))
            if c is None:
                continue
            g = lambda m: (rows.get((t, m)) or {}).get("test")  # noqa: E731
            p = c.get("paired", {})
            tt = rows.get((t, "t-trans")) or {}
            lines.append(f"| {t} ({c['metric']}) | {n:,} | {_fmt(c['test'])} | {_fmt(g('clue/logreg'))} | {_fmt(g('tfidf/logreg'))} | {_fmt(g('t-trans'))} | "
                         f"{_fmt(g('minilm-mean/mlp'))} | {_fmt(g('random/mlp'))} | "
                         f"{_fmt_diff(p.get('tfidf/logreg', {}).get('test'))} | {_fmt_diff(p.get('tfidf/logreg', {}).get('cold'))} | "
                         f"{_fmt_diff(p.get('t-trans', {}).get('test'))} | {_fmt_diff(p.get('t-trans', {}).get('cold'))} | "
                         f"{tt.get('train_s', '-')} | {_ttrans_choice(tt)} |")
    return "\n".join(lines) + "\n", by_budget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="runs/bench-quality", help="run folder (replaced)")
    ap.add_argument("--users", type=int, default=10_000, help="synthetic users (demo size: 10,000)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps per objective (400: the documented runs; the demo takes 200)")
    ap.add_argument("--seeds", type=int, default=3, help="head trainings per (task, model)")
    ap.add_argument("--no-t-trans", dest="t_trans", action="store_false", help="skip the from-scratch T-Trans baseline on all labels "
                                                                                   "(the --labels passes still run it: it is cheap there)")
    ap.add_argument("--t-trans-tasks", nargs="+", default=["age_bracket", "is_parent", "segment"],
                    help="tasks T-Trans runs on (one seed, lr chosen on validation)")
    ap.add_argument("--t-trans-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3], help="T-Trans learning-rate grid")
    ap.add_argument("--clue-only", action="store_true", help="pretrain CLUE alone (no SimCLR / MLM)")
    ap.add_argument("--movielens", metavar="DIR", help="also run on a MovieLens folder (100k, 1M or latest layout)")
    ap.add_argument("--movielens-folds", type=int, default=5,
                    help="MovieLens: k-fold cross-fitted evaluation, every user scored once (0 = the dataset's "
                         "~10 %% test split, 61 users on latest-small); pretraining then holds out each last event")
    ap.add_argument("--labels", nargs="+", type=int, default=[], metavar="N",
                    help="synthetic: also evaluate the --t-trans-tasks with heads and baselines on N labelled users "
                         "each (EvalConfig.labels), the encoder pretrained on all training users as before")
    ap.add_argument("--labels-over", metavar="RUN",
                    help="with --labels: only the label-budget passes, over a finished synthetic run folder (its "
                         "demo_summary.json, dataset and CLUE table; e.g. runs/bench-quality/synthetic); writes RUN/labels.md")
    ap.add_argument("--skip-synthetic", action="store_true", help="run only the --movielens part")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")
    args = ap.parse_args()

    if args.labels_over:
        run_dir = Path(args.labels_over)
        if not args.labels:
            ap.error("--labels-over needs --labels N ...")
        if not (run_dir / "demo_summary.json").is_file():
            ap.error(f"--labels-over {run_dir}: no demo_summary.json there (a quality run's synthetic folder)")
        t0 = time.perf_counter()
        curve, _ = label_curve(args, run_dir, json.loads((run_dir / "demo_summary.json").read_text()), args.t_trans_tasks)
        curve += f"\nCommand: `{' '.join(['python', *sys.argv])}`; label-budget passes: {time.perf_counter() - t0:.0f} s\n"
        (run_dir / "labels.md").write_text(curve)
        print(curve + f"[quality] wrote {run_dir / 'labels.md'}")
        return 0

    out = Path(args.out)
    report = [f"# userfm quality benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"Command: `{' '.join(['python', *sys.argv])}`", ""]
    runs = [] if args.skip_synthetic else [("synthetic (latent story)", out / "synthetic", {})]
    if args.movielens:
        runs.append((f"MovieLens {args.movielens}", out / "movielens", {"data": args.movielens, "format": "movielens",
                                                                      "eval_folds": args.movielens_folds}))
    for title, folder, data in runs:
        summary, by = run(args, folder, **data)
        report += [f"## {title}", "", f"Wall time {summary['wall_s']:.0f} s; stages (s): "
                   + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()), "", tables(by)]
        print("\n".join(report[-4:]), flush=True)
        if args.labels and not data:
            t0 = time.perf_counter()
            curve, _ = label_curve(args, folder, summary, [t for t in args.t_trans_tasks if any(k[0] == t for k in by)])
            report += [curve, f"Label-budget passes: {time.perf_counter() - t0:.0f} s", ""]
            print("\n".join(report[-3:]), flush=True)
    (out / "quality.md").write_text("\n".join(report))
    print(f"[quality] wrote {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
