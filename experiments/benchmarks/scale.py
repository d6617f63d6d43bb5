"""Scale: every stage at 10k, 100k and 1M synthetic users, its wall time, peak memory and growth exponent.

Each size runs in its own process (its driver's peak memory is its own), on an embedded local Ray over every
core, into ``--workdir/<N>``:

    synth      synthetic multi-service logs (~30 events per user)      userfm.data.synth.generate
    ingest     read, validate, partition, build sequences (Ray Data)    userfm ingest
    pretrain   read the training rows, fit the vocabularies, encode the distinct texts with MiniLM (the cache),
               fit the co-occurrence vectors, featurize (Ray Data), then --steps CLUE steps on Ray Train: each a
               row of its own, timed by run_pretrain's own progress lines
    embed      every user with the pretrained encoder (Ray Data actors); then the similar-users index (faiss
               IVF, userfm.infer.ann) when the table has >= 50,000 users
    evaluate   one task (is_parent): a logistic head on the embeddings and the bag-of-items yardstick (sparse)
    serve      start the Ray Serve app on the table, then --requests GET /v1/users/{id}/similar?k=10 and as many
               GET .../embedding, one client (p50 / p99 ms), then stop it
    ann        recall@10 of the index against exact cosine top-10 for 1,000 users, and the latency of one
               query (index vs exact, one thread, p50 / p99 ms)

Memory: a thread samples every 2 s (and at every stage's start and end) the resident memory (RSS) of the
driver and the summed proportional set size (PSS: a page shared by k processes counts 1/k in each) of every
other process of the run (the Ray processes: GCS, raylet, workers, Serve replicas; the object store's shared
pages included) and keeps each stage's peak. The exponent of a stage between two sizes is log(t2 / t1) / log(n2 / n1).

    python experiments/benchmarks/scale.py                                # 10k, 100k, 1M users (hours on 2 cores)
    python experiments/benchmarks/scale.py --sizes 1e4,1e5 --steps 20     # a quicker look
    python experiments/benchmarks/scale.py --render                       # tables again from --workdir's results

Prints the table and writes ``docs/results/scale.md`` (``--doc ''`` to skip); each size's figures are in
``--workdir/<N>/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASK = "is_parent"


class Sampler:
    """Peak RSS of this process and summed PSS of all its descendants, per stage, sampled every ``every`` s."""

    def __init__(self, every: float = 2.0):  # a PSS sample of ~15 Ray processes costs ~0.1 s of CPU
        import psutil

        self.me, self.every, self.stage, self.peaks = psutil.Process(), every, None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        import psutil

        driver, others = self.me.memory_info().rss, 0
        for p in self.me.children(recursive=True):
            try:
                others += p.memory_full_info().pss  # shared pages (libraries, the object store) split between processes
            except psutil.Error:  # exited between the listing and the read
                pass
        return driver, others

    def mark(self, stage: str | None = None):
        """Sample now into ``stage`` (default: the current one): stages shorter than a period get a figure too."""
        stage = stage or self.stage
        if stage is not None:
            d, o = self._sample()
            pd, po = self.peaks.get(stage, (0, 0))
            self.peaks[stage] = (max(pd, d), max(po, o))

    def switch(self, stage: str):
        self.mark()
        self.stage = stage
        self.mark()

    def _run(self):
        while not self._stop.is_set():
            self.mark()
            self._stop.wait(self.every)

    def close(self):
        self._stop.set()
        self._thread.join()


def one_size(n: int, args) -> dict:
    """Run every stage for ``n`` users in this process; returns {stage: {seconds, rows, driver_mb, ray_mb}}."""
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.demo import DemoConfig, pretrain_config
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.runtime import init_ray
    from userfm.train.pretrain import run_pretrain

    work = Path(args.workdir) / str(n)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    sampler = Sampler()
    stages: dict[str, dict] = {}

    def save():  # after every stage: a size stopped part-way keeps what it measured
        for name, (d, o) in sampler.peaks.items():
            if name in stages:
                stages[name].update(driver_mb=round(d / 2**20), ray_mb=round(o / 2**20))
        (work / "scale.json").write_text(json.dumps({"users": n, "steps": args.steps, "stages": stages, **info}, indent=2, default=str))

    info: dict = {"events": None, "minilm": "", "ann": None, "finished": False}

    @contextmanager
    def stage(name: str, rows: int | None = None):
        sampler.switch(name)
        print(f"[scale {n:,}] {name} ...", flush=True)
        t0 = time.perf_counter()
        rec = {"rows": rows}
        yield rec
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        sampler.mark()
        stages[name] = rec
        save()
        print(f"[scale {n:,}] {name}: {rec['seconds']:.1f}s", flush=True)

    raw, ds = work / "raw", work / "dataset"
    with stage("synth") as rec:
        s = generate(SynthConfig(n_users=n, events_per_user=args.events_per_user, seed=0), raw, progress=lambda m: None)
        rec["rows"] = int(s["activity"]["n_events"])
    with stage("start Ray"):
        init_ray()
    with stage("ingest") as rec:
        m = run_ingest(IngestConfig(inputs=(str(raw / "events"),), out=str(ds),
                                    attributes=tuple(str(raw / f) for f in ("attributes.parquet", "future_labels.parquet"))),
                       progress=lambda m: None)
        rec["rows"] = m["rows_in"]
    info["events"] = m["rows_in"]

    # pretrain: its own progress lines end each fit; the sampler's stage follows them
    pcfg = pretrain_config(DemoConfig(pretrain_steps=args.steps), "clue", ds, work / "pretrain")
    lines: list[tuple[float, str]] = []
    marks = [("vocabularies", "pretrain: read rows + vocabularies", "pretrain: MiniLM cache"),
             ("MiniLM cache ready", None, "pretrain: co-occurrence vectors"),
             ("item co-occurrence vectors", None, "pretrain: featurize"),
             ("training rows", None, "pretrain: train")]

    def progress(msg: str):
        lines.append((time.perf_counter(), msg))
        for key, _, nxt in marks:
            if key in msg:
                sampler.switch(nxt)
        print(msg, flush=True)

    sampler.switch("pretrain: read rows + vocabularies")
    print(f"[scale {n:,}] pretrain ...", flush=True)
    t0 = time.perf_counter()
    summary = run_pretrain(pcfg, progress=progress)
    t_end = time.perf_counter()
    at = {key: next(t for t, msg in lines if key in msg) for key, _, _ in marks}
    cuts = [("pretrain: read rows + vocabularies", t0, at["vocabularies"]),
            ("pretrain: MiniLM cache", at["vocabularies"], at["MiniLM cache ready"]),
            ("pretrain: co-occurrence vectors", at["MiniLM cache ready"], at["item co-occurrence vectors"]),
            ("pretrain: featurize", at["item co-occurrence vectors"], at["training rows"]),
            ("pretrain: train", at["training rows"], t_end)]
    for name, a, b in cuts:
        stages[name] = {"seconds": round(b - a, 2), "rows": n if name != "pretrain: train" else args.steps}
    stages["pretrain: train"]["rows_kind"] = "steps"
    info["minilm"] = next((msg for _, msg in lines if "MiniLM cache ready" in msg), "")
    sampler.mark()
    save()
    print(f"[scale {n:,}] pretrain: {t_end - t0:.1f}s", flush=True)

    emb = work / "embeddings"
    with stage("embed") as rec:
        # one actor (Ray Data's read tasks need the other CPU), torch on every core
        e = run_embed(EmbedConfig(model=summary["model"], data=str(ds), out=str(emb), ann="off",
                                  threads_per_actor=os.cpu_count() or 1), progress=print)
        rec["rows"] = e["users_in"]
    from userfm.infer.embed import write_ann

    with stage("ann index build") as rec:
        info["ann"] = ann = write_ann(emb, "on" if n >= args.ann_min else "auto", progress=print)
        rec["rows"] = ann["users"] if ann else 0

    with stage("evaluate") as rec:
        res = run_evaluate(EvalConfig(data=str(ds), out=str(work / "evaluate"), tasks=str(REPO / "experiments" / "tasks" / "synthetic.yaml"),
                                      only_tasks=(TASK,), embeddings={"clue": str(emb)}, heads=("logreg",),
                                      baselines=("bag-of-items",), seeds=1, workers=1, save_heads=False),
                           progress=lambda m: None)
        rec["rows"] = n
        rec["metrics"] = {r["model"]: r["test"]["value"] for r in res["rows"] if r["task"] == TASK}

    with stage("serve") as rec:
        rec.update(serve_load(summary["model"], emb, args.requests))
        rec["rows"] = 2 * args.requests

    with stage("ann recall + latency") as rec:
        rec.update(ann_quality(emb, args.queries))
    sampler.close()
    info["finished"] = True
    save()


def serve_load(model: str, emb: Path, requests: int) -> dict:
    """Start the app on ``emb``, time ``requests`` similar-user and as many stored-embedding calls, stop it."""
    import httpx
    import numpy as np

    from userfm.infer.embed import read_embeddings
    from userfm.serve import app as serve
    from userfm.serve.config import ServeConfig

    ids, _ = read_embeddings(emb)
    rng = np.random.default_rng(0)
    users = [ids[i] for i in rng.choice(len(ids), requests, replace=False)]
    t0 = time.perf_counter()
    base = serve.start(ServeConfig(model=model, embeddings=str(emb), port=0, max_k=10), progress=lambda m: None)
    start_s = time.perf_counter() - t0
    out = {"start_s": round(start_s, 2)}
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            out["similar"] = c.get("/healthz").json()["embeddings"].get("similar")
            for route in ("similar", "embedding"):
                lat = []
                for u in users:
                    t = time.perf_counter()
                    r = c.get(f"/v1/users/{u}/{route}", params={"k": 10} if route == "similar" else None)
                    lat.append((time.perf_counter() - t) * 1000)
                    if r.status_code != 200:
                        raise RuntimeError(f"GET /v1/users/{u}/{route} -> {r.status_code} {r.text[:200]}")
                out[f"{route}_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
                out[f"{route}_p99_ms"] = round(float(np.percentile(lat, 99)), 2)
    finally:
        serve.stop()
    return out


def ann_quality(emb: Path, queries: int) -> dict:
    """Recall@10 of the table's index (or a fresh one) against exact search, and one-query latencies."""
    import faiss
    import numpy as np

    from userfm.infer.ann import exact_top_k, normalized, read_index, recall_at_k, search
    from userfm.infer.embed import read_embeddings

    faiss.omp_set_num_threads(1)
    ids, x = read_embeddings(emb)
    index, meta = read_index(emb, ids, x)
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(len(ids), min(queries, len(ids)), replace=False))
    exact = np.concatenate([exact_top_k(x, x[q[i:i + 50]], 11) for i in range(0, len(q), 50)])
    xn = normalized(x)

    def timed(fn) -> list[float]:
        lat = []
        for j in q[:200]:
            t = time.perf_counter()
            fn(j)
            lat.append((time.perf_counter() - t) * 1000)
        return lat

    def exact_one(j):  # what the store does without an index: one matvec and a partition
        s = xn @ xn[j]
        np.argpartition(-s, 10)[:11]

    ex_lat = timed(exact_one)
    out = {"exact_p50_ms": round(float(np.percentile(ex_lat, 50)), 3), "exact_p99_ms": round(float(np.percentile(ex_lat, 99)), 3)}
    if index is None:
        return out
    _, found = search(index, x[q], 11)
    out["recall_at_10"] = round(recall_at_k(drop_self(found, q), drop_self(exact, q)), 4)
    lat = timed(lambda j: search(index, x[j], 11))
    out.update(ann_p50_ms=round(float(np.percentile(lat, 50)), 3), ann_p99_ms=round(float(np.percentile(lat, 99)), 3),
               index_mb=round(meta["bytes"] / 2**20, 1), nlist=meta["nlist"], nprobe=meta["nprobe"])
    return out


def drop_self(rows, q):
    """(B, 11) neighbour rows of queries ``q`` -> (B, 10) without the query itself (the first 10 others)."""
    import numpy as np

    return np.array([[j for j in r if j != i][:10] for r, i in zip(rows, q)])


def exponent(t1: float, t2: float, n1: int, n2: int) -> float | None:
    return round(math.log(t2 / t1) / math.log(n2 / n1), 2) if t1 > 0 and t2 > 0 else None


def render(results: list[dict], wall: dict) -> str:
    results = sorted(results, key=lambda r: r["users"])
    sizes = [r["users"] for r in results]
    names = list(dict.fromkeys(nm for r in results for nm in r["stages"]))
    head = ["stage"] + [f"{n:,} users (s)" for n in sizes]
    pairs = list(zip(results, results[1:]))
    head += [f"exponent {a['users']:,}->{b['users']:,}" for a, b in pairs]
    head += [f"rows/s at {sizes[-1]:,}", f"peak MB at {sizes[-1]:,} (driver / Ray)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for nm in names:
        cells = [nm] + [f"{r['stages'][nm]['seconds']:.1f}" if nm in r["stages"] else "-" for r in results]
        for a, b in pairs:
            sa, sb = a["stages"].get(nm), b["stages"].get(nm)
            e = exponent(sa["seconds"], sb["seconds"], a["users"], b["users"]) if sa and sb and sa.get("rows") and sb.get("rows") else None
            cells.append("-" if e is None or nm in ("start Ray", "pretrain: train") else f"{e:.2f}")
        last = results[-1]["stages"].get(nm, {})
        per_s = last.get("rows") / last["seconds"] if last.get("rows") and last.get("seconds") else None
        cells.append("-" if per_s is None or nm in ("start Ray", "serve") else
                     f"{per_s:,.2f} steps/s" if last.get("rows_kind") == "steps" else f"{per_s:,.0f}")
        cells.append(f"{last.get('driver_mb', '-')} / {last.get('ray_mb', '-')}")
        lines.append("| " + " | ".join(cells) + " |")
    out = ["| " + " | ".join(["size", "events", "MiniLM texts", "serve start (s)", "similar p50/p99 (ms)",
                               "embedding p50/p99 (ms)", "served by"]) + " |", "|---" * 7 + "|"]
    for r in results:
        s = r["stages"].get("serve", {})
        out.append(f"| {r['users']:,} | {r['events'] or 0:,} | {r['minilm'].split(': ', 1)[-1].split(' (')[0]} | {s.get('start_s', '-')} | "
                   f"{s.get('similar_p50_ms', '-')} / {s.get('similar_p99_ms', '-')} | {s.get('embedding_p50_ms', '-')} / "
                   f"{s.get('embedding_p99_ms', '-')} | {s.get('similar', '-')} |")
    ann = ["| size | recall@10 vs exact | index p50 / p99 (ms) | exact p50 / p99 (ms) | index MB | nlist / nprobe | build (s) |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        a = r["stages"].get("ann recall + latency", {})
        b = r["stages"].get("ann index build", {})
        ann.append(f"| {r['users']:,} | {a.get('recall_at_10', '-')} | {a.get('ann_p50_ms', '-')} / {a.get('ann_p99_ms', '-')} | "
                   f"{a.get('exact_p50_ms', '-')} / {a.get('exact_p99_ms', '-')} | {a.get('index_mb', '-')} | "
                   f"{a.get('nlist', '-')} / {a.get('nprobe', '-')} | {b.get('seconds', '-')} |")
    models = sorted({m for r in results for m in (r['stages'].get('evaluate', {}).get('metrics') or {})})
    ev = ["| size | " + " | ".join(models) + " |"]
    ev.append("|---" * (len(models) + 1) + "|")
    for r in results:
        mt = r["stages"].get("evaluate", {}).get("metrics") or {}
        ev.append(f"| {r['users']:,} | " + " | ".join(f"{mt[m]:.3f}" if isinstance(mt.get(m), float) else "-" for m in models) + " |")
    per_size = ", ".join(f"{r['users']:,}: {sum(st['seconds'] for st in r['stages'].values()):.0f}"
                         + ("" if r.get("finished") else f" (stopped after {list(r['stages'])[-1]})") for r in results)
    return "\n".join([
        f"Measured {wall['date']} on {wall['machine']}; `{wall['command']}`; {results[0]['steps']} pretraining steps at "
        "every size (the train row is not expected to grow with users, so it has no exponent). Rows/s: events for "
        "synth and ingest, users for the other stages, steps for train. Wall time per "
        f"size (s): {per_size}.",
        "", "### Stages", "", *lines, "", "### Serving (one client, sequential requests)", "", *out, "",
        "### Similar users: index vs exact (one thread, in process)", "", *ann, "",
        f"### The evaluated task ({TASK}, accuracy on the test split)", "", *ev, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated user counts (default 1e4,1e5,1e6)")
    ap.add_argument("--steps", type=int, default=50, help="pretraining steps at every size (default 50)")
    ap.add_argument("--events-per-user", type=float, default=30.0, help="mean synthetic events per user (default 30)")
    ap.add_argument("--requests", type=int, default=200, help="serve requests per route (default 200)")
    ap.add_argument("--queries", type=int, default=1000, help="ANN recall queries (default 1000)")
    ap.add_argument("--ann-min", type=int, default=0, help="build the index from this many users (default 0: at every size, "
                    "so its recall and latency are measured everywhere; embed's own default is 50,000)")
    ap.add_argument("--workdir", default="runs/scale", help="scratch folder, one subfolder per size (default runs/scale)")
    ap.add_argument("--doc", default=str(REPO / "docs" / "results" / "scale.md"), help="results page ('' = none)")
    ap.add_argument("--render", action="store_true", help="only render the tables from --workdir's scale.json files")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.one:
        one_size(args.one, args)
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if not args.render:
        for n in sizes:
            cmd = [sys.executable, __file__, "--one", str(n), "--steps", str(args.steps), "--events-per-user",
                   str(args.events_per_user), "--requests", str(args.requests), "--queries", str(args.queries),
                   "--ann-min", str(args.ann_min), "--workdir", args.workdir]
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"[scale] {n:,} users: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
            if rc:
                sys.exit(f"[scale] the run at {n:,} users failed (exit {rc}); the sizes before it are in {args.workdir}")
    results = [json.loads((Path(args.workdir) / str(n) / "scale.json").read_text())
               for n in sizes if (Path(args.workdir) / str(n) / "scale.json").is_file()]
    if not results:
        sys.exit(f"[scale] no scale.json under {args.workdir}")
    ran = time.gmtime(max((Path(args.workdir) / str(r["users"]) / "scale.json").stat().st_mtime for r in results))
    argv = [a for a in sys.argv[1:] if a != "--render"]
    wall = {"date": time.strftime("%Y-%m-%d", ran), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python experiments/benchmarks/scale.py " + " ".join(argv)
            + (" (tables rendered again from its scale.json files with --render)" if args.render else "")}
    text = render(results, wall)
    print(text)
    if args.doc:
        Path(args.doc).write_text("# Scale: every stage from 10k to 1M users\n\n"
                                  "Written by `experiments/benchmarks/scale.py` (what each row is: its docstring).\n\n" + text)
        print(f"[scale] wrote {args.doc}")


if __name__ == "__main__":
    main()
