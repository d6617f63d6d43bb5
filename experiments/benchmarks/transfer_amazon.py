"""Amazon Arts <-> Office transfer: does pretraining on both services beat pretraining on the target's alone?

Three CLUE encoders pretrained with the demo's recipe (``userfm.demo.pretrain_config``: epoch budget, early
stopping, best weights), identical but for the services their pretraining reads (``PretrainConfig.services``):
both, Arts only, Office only. Each embeds the histories of the task file's transfer tasks
(``experiments/tasks/amazon-arts-office.yaml``, the tasks with ``history: service:<name>``):

    office_from_arts, office_category_from_arts   the Office target from the user's Arts events alone
    arts_from_office, arts_category_from_office   the Arts target from the user's Office events alone

U-MLP and logistic heads are fitted on each table as in ``real.py`` (the dataset's user-disjoint split), and
every row gets its paired difference (same resampled test users) to the encoder pretrained on the target's
service alone (``EvalConfig.reference``), the comparison the issue asks for, plus the cheap yardsticks
(popularity, item-kNN, bag-of-items, TF-IDF; the full set with SASRec and mean-MiniLM is ``real.py``'s table,
on the same users).

    python experiments/benchmarks/transfer_amazon.py                          # converts + ingests the shared set
    python experiments/benchmarks/transfer_amazon.py --dataset runs/real/amazon/run/dataset   # reuse real.py's

Writes ``OUT/transfer.md``, ``OUT/transfer.json`` and ``docs/results/transfer-amazon.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "experiments" / "tasks" / "amazon-arts-office.yaml"
ENCODERS = {"both": (), "arts-only": ("arts",), "office-only": ("office",)}  # name -> PretrainConfig.services


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ci(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci") or (None, None)
    return f"{d['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{d['value']:+.3f}"


def table(results: dict, reference: dict[str, str]) -> list[str]:
    """Markdown per task: every row, its interval, and its paired difference to the target-only encoder."""
    out = []
    for task in results["tasks"]:
        name = task["name"]
        rows = [r for r in results["rows"] if r["task"] == name]
        ref = reference[name]
        out += [f"### {name} ({rows[0]['metric']}; {task['users']['test']:,} test users; reads {task['history']})", "",
                f"| model | {rows[0]['metric']} [95 % CI] | vs {ref} (same head) | vs best yardstick "
                f"({task.get('best_yardstick') or '-'}) |", "|---|---|---|---|"]
        order = {e: i for i, e in enumerate(ENCODERS)}
        for r in sorted(rows, key=lambda r: (order.get(r["embedding"], len(order)), r["model"])):
            own = (r.get("paired") or {}).get(f"{ref}/{r['head']}", {}).get("test")
            t = r["test"]
            ci = t.get("ci") or [None, None]
            cell = f"{_fmt(t['value'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
            vs_best = "(best)" if r["model"] == task.get("best_yardstick") else _ci(r.get("vs_best"))
            out.append(f"| {r['model']} | {cell} | {_ci(own) if own else '-'} | {vs_best} |")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--dataset", default="", help="an ingested Amazon Arts/Office dataset (e.g. real.py's "
                                                  "runs/real/amazon/run/dataset); default: convert + ingest the shared set")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                    help="folder holding amazon-arts-office/ (default: ../shared/data beside the repository)")
    ap.add_argument("--out", default="runs/transfer-amazon", help="output folder (replaced)")
    ap.add_argument("--seeds", type=int, default=1, help="head trainings per (task, model)")
    ap.add_argument("--heads", nargs="+", default=["mlp", "logreg"], choices=["mlp", "logreg"])
    ap.add_argument("--baselines", nargs="*", default=["popularity", "item-knn", "bag-of-items", "tfidf"],
                    help="yardsticks next to the encoders (real.py's table has all of them)")
    ap.add_argument("--minilm-cache", default="runs/real/minilm_cache", help="MiniLM vectors kept between runs")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")
    args = ap.parse_args(argv)

    import shutil

    from userfm.data.convert import convert
    from userfm.demo import DemoConfig, pretrain_config
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig, load_tasks
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.train.pretrain import run_pretrain
    from userfm.runtime import init_ray

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cache = str(Path(args.minilm_cache).resolve()) if args.minilm_cache else ""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    init_ray(num_cpus=args.num_cpus)
    if args.dataset:
        dataset = Path(args.dataset).resolve()
    else:
        src = Path(args.data_root) / "amazon-arts-office"
        if not src.is_dir():
            raise SystemExit(f"[transfer] no folder {src} (the shared real data; --data-root points at it)")
        convert("recbole", src, out / "raw", service_field="domain")
        dataset = out / "dataset"
        run_ingest(IngestConfig(inputs=(str(out / "raw" / "events.parquet"),), out=str(dataset)))
        timings["convert + ingest"] = time.perf_counter() - t0

    tasks = [t for t in load_tasks(TASKS) if t.history_service]
    views: dict[tuple[int, str], list] = {}
    for t in tasks:
        views.setdefault(t.view, []).append(t)
    demo = DemoConfig(data=str(dataset), format="events", minilm_cache=cache)
    pretrained = {}
    for name, services in ENCODERS.items():
        t1 = time.perf_counter()
        pcfg = replace(pretrain_config(demo, "clue", dataset, out / "pretrain" / name), services=services)
        s = run_pretrain(pcfg)
        pretrained[name] = {"services": list(services) or ["arts", "office"], "model": s["model"],
                            "exported": s["exported"], "early_stopped": s["early_stopped"],
                            **{k: s["final"].get(k) for k in ("step", "loss", "val_loss")}}
        timings[f"pretrain {name}"] = time.perf_counter() - t1
        print(f"[transfer] pretrained {name}: exported step {s['exported']['step']} (val loss "
              f"{_fmt(s['exported']['val_loss'])}), {timings[f'pretrain {name}']:.0f}s", flush=True)

    merged = {"tasks": [], "rows": []}
    reference = {}
    for (holdout, svc), group in views.items():
        targets = {t.users.split(":", 1)[1] for t in group}
        if len(targets) != 1 or not next(iter(targets)):
            raise SystemExit(f"[transfer] the tasks reading {svc} history must share one target service (users: "
                             f"last_service:<name>), got {sorted(t.users for t in group)}")
        ref = f"{next(iter(targets))}-only"
        t1 = time.perf_counter()
        tables = {}
        for name, p in pretrained.items():
            e = out / "embeddings" / f"heldout{holdout}_{svc}" / name
            run_embed(EmbedConfig(model=p["model"], data=str(dataset), out=str(e), holdout_last=holdout,
                                  history_service=svc, minilm_cache=cache))
            tables[name] = str(e)
        timings[f"embed {svc} histories"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        r = run_evaluate(EvalConfig(data=str(dataset), out=str(out / "evaluate" / f"{svc}_history"), tasks=str(TASKS),
                                    only_tasks=tuple(t.name for t in group), embeddings=tables, reference=ref,
                                    heads=tuple(args.heads), baselines=tuple(args.baselines), seeds=args.seeds,
                                    minilm_cache=cache, save_heads=False))
        timings[f"evaluate {svc} histories"] = time.perf_counter() - t1
        merged["tasks"] += r["tasks"]
        merged["rows"] += r["rows"]
        reference.update({t.name: ref for t in group})

    wall = time.perf_counter() - t0
    (out / "transfer.json").write_text(json.dumps({"pretrained": pretrained, "results": merged, "timings_s": timings},
                                                  indent=2, default=str) + "\n")
    md = ["# Amazon Arts <-> Office: pretraining on both services vs on the target service alone", "",
          f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs). Dataset {dataset}.", "",
          "CLUE, the demo's recipe; the encoders differ only in the services pretraining reads:", "",
          "| encoder | pretrained on | exported step (val loss) | stopped early |", "|---|---|---|---|",
          *(f"| {n} | {', '.join(p['services'])} | {p['exported']['step']} ({_fmt(p['exported']['val_loss'])}) | "
            f"{'yes' if p['early_stopped'] else 'no'} |" for n, p in pretrained.items()), "",
          "Validation losses are each encoder's own (different services, different pairs): not comparable across rows.", "",
          f"Head seeds {args.seeds}; heads {', '.join(args.heads)}; the dataset's user-disjoint test split.", "",
          f"Wall time {wall:.0f} s; stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
          *table(merged, reference)]
    text = "\n".join(md) + "\n"
    (out / "transfer.md").write_text(text)
    docs = REPO / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "transfer-amazon.md").write_text(text)
    print(text, flush=True)
    print(f"[transfer] wrote {out / 'transfer.md'} and {docs / 'transfer-amazon.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
