"""Cross-service transfer matrix: pretrain CLUE without service C, evaluate on tasks defined on C.

For every service C of the dataset, one encoder is pretrained on the other services only
(``PretrainConfig.services``), plus one on all services (the in-domain reference). Each encoder then
embeds every user from ONE service's history at a time (``EmbedConfig.scope``), and a logistic head
predicts persona attributes from that table, for the users active in that service
(``experiments/tasks/transfer.yaml``). The matrix: rows = what the encoder was pretrained on,
columns = the service whose history is embedded; the cells where the column's service was left out
of pretraining are the transfer cases. A random-embedding row is the floor.

    .venv/bin/python experiments/transfer/run.py --data runs/demo/dataset --out runs/transfer

The dataset must be ingested with the synthetic attributes (``userfm demo`` or ``userfm synth`` +
``userfm ingest --attributes``). Writes ``<out>/transfer.json`` and ``<out>/transfer.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ingested dataset folder with the 'attributes' table")
    ap.add_argument("--out", default="runs/transfer", help="output folder (replaced)")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per encoder")
    ap.add_argument("--batch-size", type=int, default=64, help="users per worker per step")
    ap.add_argument("--item-encoder", default="minilm", choices=("minilm", "text", "category"),
                    help="item encoder (text/minilm can read a service never seen in pretraining; category cannot)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2, help="head seeds per cell")
    ap.add_argument("--tasks", default=str(REPO / "experiments/tasks/transfer.yaml"))
    args = ap.parse_args(argv)

    import shutil

    from userfm.data.dataset import load_manifest
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig, load_tasks
    from userfm.train.pretrain import run_pretrain
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.runtime import init_ray

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    services = sorted(load_manifest(args.data)["services"])
    if len(services) < 2:
        print(f"{args.data}: needs 2+ services, has {services}", file=sys.stderr)
        return 2
    tasks = load_tasks(args.tasks)
    init_ray()
    quiet = lambda _m: None  # noqa: E731
    rows = {"all": tuple(services), **{f"without {c}": tuple(s for s in services if s != c) for c in services}}
    t0 = time.perf_counter()
    embeddings: dict[str, dict[str, str]] = {}
    for name, pre in rows.items():
        tag = name.replace(" ", "-")
        cfg = PretrainConfig(data=args.data, out=str(out / "pretrain" / tag), objective="clue", item_encoder=args.item_encoder,
                             size=args.size, services=() if name == "all" else pre, max_steps=args.steps,
                             batch_size=args.batch_size, num_workers=args.num_workers, eval_every=args.steps,
                             checkpoint_every=args.steps, log_every=max(1, args.steps // 5))
        s = run_pretrain(cfg, progress=quiet)
        print(f"[transfer] pretrained on {', '.join(pre)}: val_loss {s['final'].get('val_loss', float('nan')):.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        for svc in services:
            e = out / "embeddings" / tag / svc
            run_embed(EmbedConfig(model=s["model"], data=args.data, out=str(e), scope=svc), progress=quiet)
            embeddings.setdefault(svc, {})[name] = str(e)
    cells: dict[str, dict[str, dict]] = {}
    for svc in services:
        only = tuple(t.name for t in tasks if t.users == f"service:{svc}")
        if not only:
            continue
        ev = run_evaluate(EvalConfig(data=args.data, out=str(out / "evaluate" / svc), tasks=args.tasks, only_tasks=only,
                                     embeddings={**embeddings[svc], "random": "random"}, heads=("logreg",),
                                     baselines=(), seeds=args.seeds, bootstrap_samples=300, save_heads=False),
                          progress=quiet)
        for r in ev["rows"]:
            if r.get("embedding"):
                cells.setdefault(r["task"], {})[r["embedding"]] = {k: r["test"][k] for k in ("value", "ci", "n")}
        print(f"[transfer] evaluated {svc} ({time.perf_counter() - t0:.0f}s)", flush=True)

    result = {"data": args.data, "services": services, "pretrained_on": {k: list(v) for k, v in rows.items()},
              "config": vars(args), "cells": cells, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "transfer.json").write_text(json.dumps(result, indent=2, default=str))
    md = [f"# Cross-service transfer ({args.item_encoder} items, {args.size}, {args.steps} steps, logistic head)", ""]
    for task in sorted(cells):
        md += [f"## {task}", "", "| encoder pretrained on | " + task + " |", "|---|---|"]
        for model in [*rows, "random"]:
            c = cells[task].get(model)
            if c and c["value"] is not None:
                ci = c["ci"]
                ci_s = f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else ""
                md.append(f"| {model} | {c['value']:.3f}{ci_s} |")
        md.append("")
    (out / "transfer.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
