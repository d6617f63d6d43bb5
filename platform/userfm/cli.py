"""The ``userfm`` command line. Each subcommand is a thin shell over one stage's library function;
heavy imports (Ray, torch) happen inside the subcommand, so ``userfm --help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from userfm import __version__
from userfm.errors import UserfmError


class CLIError(UserfmError):
    """A user-facing error: printed as one line, exit status 2."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file; keys are the config dataclass field names")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (repeatable), applied after --config",
    )


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray (default: all)")
    p.add_argument("--verbose", action="store_true", default=None,
                   help="print Ray's own logs and the workers' output on the console (default: to a log file, "
                   "<run>/logs/ray.log for the demo, else <Ray session>/logs/userfm.log)")


# ---------------------------------------------------------------------------------- subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    cfg = load_config(
        SynthConfig, args.config, args.overrides,
        n_users=args.users, events_per_user=args.events_per_user, seed=args.seed,
    )
    t0 = time.perf_counter()
    truth = generate(cfg, args.out, progress=print)
    stats = truth.get("activity", {})
    print(f"[synth] wrote {args.out} in {time.perf_counter() - t0:.1f}s: " + json.dumps(stats))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from userfm.data.convert import convert

    manifest = convert(args.format, args.src, args.out, service=args.service, service_field=args.service_field,
                       category_field=args.category_field, time=args.time)
    print(json.dumps(manifest, indent=2))
    return 0


def _ingest_config(args: argparse.Namespace):
    from userfm.config import load_config
    from userfm.data.ingest import IngestConfig

    return load_config(
        IngestConfig, args.config, args.overrides,
        inputs=tuple(args.inputs) or None, out=args.out,
        attributes=tuple(args.attributes) or None, overwrite=args.overwrite or None,
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    from userfm.data.dataset import format_summary, summarize
    from userfm.data.ingest import run_ingest
    from userfm.runtime import init_ray

    cfg = _ingest_config(args)
    init_ray(args.address, num_cpus=args.num_cpus)
    run_ingest(cfg)
    print(format_summary(summarize(cfg.out)))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.train.pretrain import run_pretrain
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.runtime import init_ray

    cfg = load_config(PretrainConfig, args.config, args.overrides, data=args.data, out=args.out)
    init_ray(args.address, num_cpus=args.num_cpus)
    run_pretrain(cfg, resume=args.resume)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.runtime import init_ray

    cfg = load_config(
        EmbedConfig, args.config, args.overrides, model=args.model, data=args.data, out=args.out,
        actors=args.actors, gpus=args.gpus, concat=args.concat, ann=args.ann, overwrite=args.overwrite,
    )
    init_ray(args.address, num_cpus=args.num_cpus)
    run_embed(cfg)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.infer.refresh import RefreshConfig, run_refresh
    from userfm.runtime import init_ray

    cfg = load_config(
        RefreshConfig, args.config, args.overrides, inputs=tuple(args.inputs) or None, data=args.data,
        embeddings=args.embeddings, model=args.model, out=args.out, actors=args.actors, gpus=args.gpus,
        overwrite=args.overwrite,
    )
    init_ray(args.address, num_cpus=args.num_cpus)
    m = run_refresh(cfg)
    print(json.dumps({k: m[k] for k in ("version", "window", "users", "partitions", "timings_s")}, indent=2))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.eval.drift import DriftConfig, format_markdown, run_drift

    cfg = load_config(
        DriftConfig, args.config, args.overrides, old=args.old, new=args.new, out=args.out, data=args.data,
        heads=tuple(args.heads) or None, k=args.k, min_cosine=args.min_cosine, min_overlap=args.min_overlap,
        max_metric_drop=args.max_metric_drop,
    )
    result = run_drift(cfg)
    print(format_markdown(result))
    if result["failures"]:
        print("userfm drift: over threshold: " + "; ".join(result["failures"]), file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig

    embeddings = None
    if args.embedding:
        embeddings = {}
        for pair in args.embedding:
            if "=" not in pair:
                raise CLIError(f"--embedding expects NAME=PATH (or NAME=random), got {pair!r}")
            name, path = pair.split("=", 1)
            embeddings[name] = path
    cfg = load_config(EvalConfig, args.config, args.overrides, data=args.data, out=args.out, tasks=args.tasks,
                      embeddings=embeddings)
    run_evaluate(cfg)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from userfm.data.dataset import format_summary, summarize

    s = summarize(args.dataset)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.demo import DemoConfig, resume_config, run_demo

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in ("config", "data", "format", "tasks", "users", "compare")
                 if getattr(args, k, None)] + ["--set"] * bool(args.overrides)
        if given:
            raise UserfmError(f"--resume continues the run in --out with its own config; drop {', '.join(given)}")
        cfg = resume_config(args.out or DemoConfig.out)
    else:
        cfg = load_config(
            DemoConfig, args.config, args.overrides,
            out=args.out, data=args.data, format=args.format, tasks=args.tasks, n_users=args.users, compare=args.compare,
        )
    run_demo(cfg, address=args.address, num_cpus=args.num_cpus, resume=args.resume)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.report.common import ReportConfig
    from userfm.report.page import run_report

    cfg = load_config(ReportConfig, args.config, args.overrides, run=args.run, out=args.out,
                      sweeps=tuple(args.sweep) or None)
    r = run_report(cfg)
    missing = {k: v for k, v in r["sections"].items() if v != "ok"}
    if missing:
        print("[report] sections without data: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    print(r["html"])
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.train.sweep import SweepConfig, grid_points, run_sweep
    from userfm.train.sweep_report import run_report

    if args.report:
        if args.report[0] != "report" or len(args.report) != 2:
            raise CLIError(f"expected `userfm sweep report EXPERIMENT_DIR`, got {' '.join(args.report)!r}")
        run_report(args.report[1])
        return 0
    if not args.config and not args.resume:
        raise CLIError("--config YAML is required (e.g. experiments/scaling/smoke.yaml)")
    cfg = load_config(SweepConfig, args.config, args.overrides, out=args.out)
    if not args.resume:
        grid_points(cfg)  # a bad grid fails here, before Ray is imported
    from userfm.runtime import init_ray

    init_ray(args.address, num_cpus=args.num_cpus)
    summary = run_sweep(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from userfm.config import load_config
    from userfm.serve.app import serve_forever
    from userfm.serve.config import ServeConfig

    cfg = load_config(ServeConfig, args.config, args.overrides, model=args.model, embeddings=args.embeddings,
                      host=args.host, port=args.port, api_key_file=args.api_key_file, admin_key_file=args.admin_key_file,
                      allow_unauthenticated=args.allow_unauthenticated)
    serve_forever(cfg, address=args.address, num_cpus=args.num_cpus)
    return 0


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userfm",
        description="User foundation models: pretrain one user encoder on multi-service behaviour logs, "
        "serve frozen user embeddings to many downstream heads. Runs on an embedded local Ray or a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"userfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="end-to-end demo: synthesize (or convert) logs -> ingest -> pretrain",
                       description="Run the whole pipeline on an embedded local Ray and print a summary.")
    p.add_argument("--out", help="run folder (default: runs/demo)")
    p.add_argument("--data", help="real logs instead of synthetic ones (a folder in --format)")
    p.add_argument("--format", help="format of --data: movielens, online-retail, amazon-reviews, recbole (atomic files; "
                   "--set service_field=FIELD names the .item field of each event's service), or events (canonical "
                   "Parquet/CSV/JSONL)")
    p.add_argument("--tasks", help="task file (default: experiments/tasks/<format>.yaml, synthetic.yaml without --data)")
    p.add_argument("--users", type=int, help="synthetic users (default from DemoConfig)")
    p.add_argument("--compare", action="store_true", default=None, help="also pretrain MLM and SimCLR next to CLUE")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after a failure or an interrupt: its finished stages (stages.json) "
                        "are reused, the rest run again with the run's own config")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("synth", help="generate synthetic multi-service logs with known ground truth",
                       description="Write events/, future_events/, attributes.parquet, future_labels.parquet and "
                       "ground_truth.json: personas shared across services, heavy-tailed activity, noisy labels.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--users", type=int, help="number of users (SynthConfig.n_users)")
    p.add_argument("--events-per-user", type=float, help="mean events per user (heavy-tailed)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same data)")
    _add_config_args(p)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("convert", help="convert a public dataset to the canonical event schema",
                       description="FORMAT: movielens (100k, 1m, latest-small), online-retail (CSV/XLSX), "
                       "amazon-reviews (JSON lines or concatenated JSON, optionally .gz), recbole (RecBole atomic "
                       "files: NAME.inter with optional NAME.item and NAME.user, or UniSRec-style pre-split "
                       "NAME.train/valid/test.inter history+target rows, rebuilt into each user's sequence). "
                       "The manifest's \"time\" says whether ts is real time or only an order.")
    p.add_argument("format", choices=["movielens", "online-retail", "amazon-reviews", "recbole"], metavar="FORMAT",
                   help="movielens | online-retail | amazon-reviews | recbole")
    p.add_argument("src", help="source file or folder")
    p.add_argument("out", help="output folder (events.parquet, attributes.parquet, rejected.parquet, manifest)")
    p.add_argument("--service", help="service name for the events (amazon-reviews: default reviews; "
                   "recbole: default the data set NAME)")
    p.add_argument("--service-field", metavar="FIELD",
                   help="recbole: the .item token field whose value is the event's service (e.g. domain)")
    p.add_argument("--category-field", metavar="FIELD",
                   help="recbole: the .item field whose words are the event's category "
                   "(default: categories or category when present)")
    p.add_argument("--time", choices=["auto", "real", "ordinal"],
                   help="recbole: the timestamp field holds unix seconds (real) or per-user positions (ordinal); "
                   "auto (default) picks ordinal when every user's values are exactly 0..n-1")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("ingest", help="validate logs with Ray Data and build per-user sequences",
                       description="Read Parquet/CSV/JSONL events, quarantine bad rows with a reason, build "
                       "per-user time-sorted sequences (combined and per service) and a user-disjoint split.")
    p.add_argument("inputs", nargs="*", help="event files, folders or globs (or IngestConfig.inputs)")
    p.add_argument("--out", help="output dataset folder (IngestConfig.out)")
    p.add_argument("--attributes", action="append", default=[], metavar="PATH",
                   help="user attribute/label table (user_id + columns), Parquet or CSV; repeatable")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing dataset at --out")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("pretrain", help="pretrain the user encoder (mlm | simclr | clue | future | next | masked-item, or a "
                       "weighted sum: --set objective=clue+future) on Ray Train",
                       description="Fit vocabularies/tokenizer, featurize with Ray Data, train with DDP on Ray Train "
                       "workers, checkpoint, validate, and export OUT/model (load with userfm.load_encoder).")
    p.add_argument("--data", help="sequence dataset folder from `userfm ingest` (PretrainConfig.data)")
    p.add_argument("--out", help="run folder (PretrainConfig.out)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("embed", help="embed every user of a dataset with a pretrained encoder (Ray Data actors)",
                       description="Batch inference over an actor pool (one model load per actor): writes "
                       "OUT/embeddings/*.parquet (user_id, embedding, model id/version, config hash), "
                       "OUT/skipped.parquet, OUT/manifest.json (users in = embedded + skipped) and, at >= 50,000 users, "
                       "OUT/ann/ (a faiss IVF index that serve answers /similar from).")
    p.add_argument("--model", help="exported encoder folder, e.g. runs/pretrain/clue/model")
    p.add_argument("--data", help="sequence dataset folder from `userfm ingest`")
    p.add_argument("--out", help="output folder")
    p.add_argument("--actors", type=int, help="inference actors (default 1)")
    p.add_argument("--gpus", type=float, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--concat", help="second embedding table to append to each user's embedding")
    p.add_argument("--ann", choices=("auto", "on", "off"),
                   help="similar-users index (faiss IVF) in OUT/ann: auto (default) = at >= 50,000 users, on, off")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("refresh", help="a new window of logs -> new dataset + embedding table versions, re-embedding only changed users",
                       description="Incremental refresh: validate the window's events with the dataset's own rules, rebuild "
                       "only the sequences of the users it touches (others are copied), re-embed only users whose sequence "
                       "changed or who are new (others keep their exact old rows), and write OUT/dataset, OUT/embeddings "
                       "(version n + 1, same schemas) and OUT/manifest.json (window rows in = kept + quarantined; users "
                       "unchanged / changed / new). Reload a running server with POST /v1/admin/reload.")
    p.add_argument("inputs", nargs="*", help="the window's event files, folders or globs (RefreshConfig.inputs)")
    p.add_argument("--data", help="current sequence dataset folder (userfm ingest, or OUT/dataset of a refresh)")
    p.add_argument("--embeddings", help="its embedding table folder (userfm embed, or OUT/embeddings of a refresh)")
    p.add_argument("--model", help="the exported encoder that made --embeddings")
    p.add_argument("--out", help="output folder")
    p.add_argument("--actors", type=int, help="inference actors (default 1)")
    p.add_argument("--gpus", type=float, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_refresh)

    p = sub.add_parser("drift", help="compare two embedding tables: aligned per-user cosine, neighbour overlap@k, old heads on the new table",
                       description="Per-user cosine after orthogonal Procrustes alignment, neighbour overlap@k, and the old "
                       "table's saved heads scored on the new table (as is and aligned). Writes drift.json, drift.md and "
                       "per_user.parquet to --out and prints the Markdown. Exit status 1 when a threshold is crossed "
                       "(--min-cosine, --min-overlap, --max-metric-drop), 2 on bad input.")
    p.add_argument("old", nargs="?", help="the old embedding table (the one the heads were fitted on)")
    p.add_argument("new", nargs="?", help="the new embedding table")
    p.add_argument("--out", help="output folder (drift.json, drift.md, per_user.parquet)")
    p.add_argument("--data", help="dataset folder with the heads' labels (needed with --heads)")
    p.add_argument("--heads", action="append", default=[], metavar="DIR",
                   help="a saved head, or a folder searched for heads (e.g. <evaluate out>/heads); repeatable")
    p.add_argument("--k", type=int, help="neighbours per user for overlap@k (default 10)")
    p.add_argument("--min-cosine", type=float, help="exit 1 when the mean aligned cosine is below this")
    p.add_argument("--min-overlap", type=float, help="exit 1 when the mean overlap@k is below this")
    p.add_argument("--max-metric-drop", type=float,
                   help="exit 1 when a head's metric on the new table is worse than on the old by more than this")
    _add_config_args(p)
    p.set_defaults(fn=cmd_drift)

    p = sub.add_parser("evaluate", help="downstream tasks on frozen embeddings: U-MLP / logistic heads vs baselines",
                       description="Train small heads on frozen embedding tables for the tasks of a YAML file, next to "
                       "TF-IDF, random-embedding, oracle (and opt-in T-Trans) baselines, on user-disjoint splits with "
                       "several seeds, bootstrap 95 % intervals and a cold/heavy-user breakdown. Writes results.json, "
                       "results.md, charts and pickle-free heads.")
    p.add_argument("--data", help="sequence dataset folder (its ingested attribute tables hold the labels)")
    p.add_argument("--embedding", action="append", default=[], metavar="NAME=PATH",
                   help="an embedding table to evaluate (repeatable); NAME=random adds the random floor")
    p.add_argument("--tasks", help="task YAML (default experiments/tasks/synthetic.yaml)")
    p.add_argument("--out", help="run folder")
    _add_config_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("report", help="write an HTML report (with PNG figures) of a run folder",
                       description="One self-contained HTML page plus PNGs in RUN_DIR/report/: data summary, pretraining "
                       "curves, the evaluation table with intervals and cold/heavy users, 2-D maps of the embeddings "
                       "coloured by attribute, k-means clusters with their top keywords, sweep figures. Missing pieces "
                       "become notes.")
    p.add_argument("run", help="run folder (as written by userfm demo: dataset/, pretrain/, embeddings/, evaluate/)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("--sweep", action="append", default=[], metavar="DIR",
                   help="a folder with sweep figures fig_*.png to link (repeatable)")
    _add_config_args(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("sweep", help="scaling-law sweep on Ray Tune (`sweep report EXPERIMENT` for fits and figures)",
                       description="`userfm sweep --config YAML`: one Tune trial per grid point (model size x global batch x "
                       "training users x steps/epochs x output dim), each pretraining on Ray Train, then test loss, embedding "
                       "and one downstream task; results.parquet/csv in the experiment folder. `userfm sweep report "
                       "EXPERIMENT_DIR`: power-law fits, fig_*.png and summary.md in EXPERIMENT_DIR/report.")
    p.add_argument("report", nargs="*", metavar="report EXPERIMENT_DIR", help="write the report of an experiment folder")
    p.add_argument("--out", help="experiment folder (SweepConfig.out)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in out (Tuner.restore); finished trials are kept")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("serve", help="serve embeddings and downstream heads over HTTP (Ray Serve), until Ctrl-C",
                       description="One Ray Serve app: an Encoder (events -> embedding, batched), an EmbeddingStore "
                       "(stored embeddings, similar users, reload), one Head deployment per saved head, behind a FastAPI "
                       "ingress: POST /v1/embed, GET /v1/users/{id}/embedding, GET /v1/users/{id}/similar, GET /v1/heads, "
                       "POST /v1/heads/{name}/predict, GET /healthz, /docs. Binds 127.0.0.1 by default. The same app "
                       "runs under Ray's `serve run experiments/serve/serve-config.yaml`.")
    p.add_argument("--model", help="exported encoder folder (ServeConfig.model)")
    p.add_argument("--embeddings", help="embedding table from `userfm embed` (ServeConfig.embeddings)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; any other needs --api-key-file or --allow-unauthenticated)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; 0 = a free one)")
    p.add_argument("--api-key-file", help="file with the read key clients send as X-API-Key (chmod 600)")
    p.add_argument("--admin-key-file", help="file with the admin key for /v1/admin/* (without it admin routes are off)")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve a non-loopback --host without a read key (every route open to the network)")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("summary", help="print counts of an ingested dataset",
                       description="Rows kept/quarantined by reason, users by split, services, history lengths.")
    p.add_argument("dataset", help="dataset folder written by userfm ingest")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(fn=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "verbose"):  # a subcommand that starts Ray (_add_ray_args): console settings first
            from userfm.runtime import set_verbose

            set_verbose(bool(args.verbose))
        return int(args.fn(args) or 0)
    except (UserfmError, FileNotFoundError) as exc:
        print(f"userfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"userfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
