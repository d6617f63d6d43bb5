"""Serving latency and throughput: the userfm Ray Serve app vs a bare FastAPI + uvicorn process.

Same encoder, same head, same requests, in the same run, 127.0.0.1 only, bounded request counts:

  serve  `userfm.serve.start` on an embedded 2-CPU Ray: Ingress -> Encoder (@serve.batch) / EmbeddingStore
         -> Head, one replica each (1 torch thread in the encoder)
  bare   one uvicorn process with a FastAPI app that loads the same encoder and head and computes each
         request on its own (no batching; sync routes in uvicorn's thread pool, 1 torch thread): what a
         user might write instead. The per-request work is the same code (events_to_rows + EmbedActor).

Routes: POST /v1/embed (a user's stored events -> embedding) and POST /v1/heads/<head>/predict by user id
(stored embedding -> head). At each concurrency (closed loop: C clients, each sends its next request
when the last answered) it prints p50/p95/p99 latency (ms) and requests/s, the median over --repeats,
then the targets: at 1 client serve p99 - bare p99 <= 5 ms; at 32 clients serve/bare throughput >= 2.

    python experiments/benchmarks/serve_load.py                       # runs/demo, 3 repeats
    python experiments/benchmarks/serve_load.py --run runs/demo --requests 60 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def bare_app(model: str, embeddings: str, head_dir: str, head_name: str):
    """The baseline: one process, one request at a time per thread, no batching."""
    import numpy as np
    import torch
    from fastapi import FastAPI, HTTPException

    from userfm.embed import EmbedActor, model_identity, read_embeddings
    from userfm.evaluate import load_head
    from userfm.serve import events_to_rows

    torch.set_num_threads(1)
    actor = EmbedActor(model, model_identity(model), threads=1)
    head = load_head(head_dir)
    ids, x = read_embeddings(embeddings)
    index = {u: i for i, u in enumerate(ids)}
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/embed")
    def embed(req: dict):
        rows = events_to_rows([req["events"]], actor.model.config.max_events)
        vec = actor(rows).column("embedding").combine_chunks().flatten().to_numpy()
        return {"user_id": req.get("user_id"), "embedding": vec.tolist()}

    @app.post(f"/v1/heads/{head_name}/predict")
    def predict(req: dict):
        i = index.get(req["user_id"])
        if i is None:
            raise HTTPException(404, "unknown user")
        p = head.predict_proba(x[i][None])[0]
        return {"prediction": head.classes[int(np.argmax(p))], "probabilities": p.tolist()}

    return app


async def load(url: str, bodies: list[dict], n: int, clients: int) -> dict:
    """Closed loop: ``clients`` workers send ``n`` requests in all; latency per request, wall throughput."""
    import httpx

    lat, errors, counter = [], [], iter(range(n))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker():
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)])
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.status_code)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles([v * 1000 for v in lat], n=100, method="inclusive")
    return {"n": len(lat), "errors": len(errors), "p50": q[49], "p95": q[94], "p99": q[98], "rps": len(lat) / wall}


def measure(base: str, routes: dict, levels: list[int], requests: dict, repeats: int) -> dict:
    out = {}
    for route, (path, bodies) in routes.items():
        asyncio.run(load(base + path, bodies, 20, 4))  # warm-up: connections, first batches
        for c in levels:
            runs = [asyncio.run(load(base + path, bodies, requests[c], c)) for _ in range(repeats)]
            out[(route, c)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            r = out[(route, c)]
            print(f"    {route:8s} c={c:<3d} n={int(r['n'])} p50 {r['p50']:6.1f} ms  p95 {r['p95']:6.1f}  p99 {r['p99']:6.1f}  "
                  f"{r['rps']:6.1f} req/s  errors {int(r['errors'])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="demo run folder (pretrain/clue/model, embeddings/clue, evaluate/heads)")
    ap.add_argument("--head", default="age_bracket", help="task whose clue-mlp/seed0 head is served")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=100, help="requests per level at 1 client (x2 at 8, x4 at 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-s", type=float, default=0.002)
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)  # internal: run the baseline
    args = ap.parse_args()

    run = Path(args.run)
    model, embeddings = str(run / "pretrain" / "clue" / "model"), str(run / "embeddings" / "clue")
    head_dir = str(run / "evaluate" / "heads" / args.head / "clue-mlp" / "seed0")
    if args.bare_server:
        import uvicorn

        uvicorn.run(bare_app(model, embeddings, head_dir, args.head), host="127.0.0.1", port=args.bare_server,
                    log_level="warning")
        return

    import httpx

    from userfm import serve
    from userfm.dataset import read_sequences
    from userfm.serve import ServeConfig, _free_port, events_from_sequence

    levels = [int(c) for c in args.concurrency.split(",")]
    requests = {c: args.requests * (1 if c == 1 else 2 if c <= 8 else 4) for c in levels}
    rows = read_sequences(run / "dataset").slice(0, 200).to_pylist()
    embed_bodies = [{"user_id": r["user_id"], "events": events_from_sequence(r)} for r in rows]
    predict_bodies = [{"user_id": r["user_id"]} for r in rows]
    routes = {"embed": ("/v1/embed", embed_bodies), "predict": (f"/v1/heads/{args.head}/predict", predict_bodies)}
    print(f"[serve_load] {len(rows)} users' histories (median {statistics.median(len(b['events']) for b in embed_bodies):.0f} "
          f"events), requests per level {requests}, {args.repeats} repeat(s), medians; load avg {os.getloadavg()[0]:.1f}")

    results = {}
    port = _free_port("127.0.0.1")
    bare = subprocess.Popen([sys.executable, __file__, "--run", str(run), "--head", args.head, "--bare-server", str(port)])
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"  bare FastAPI + uvicorn (1 process, 1 torch thread) on :{port}")
        results["bare"] = measure(f"http://127.0.0.1:{port}", routes, levels, requests, args.repeats)
    finally:
        bare.terminate()
        bare.wait(30)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = ServeConfig(model=model, embeddings=embeddings, heads={args.head: head_dir}, port=0,
                      batch_size=args.batch_size, batch_wait_s=args.batch_wait_s)
    base = serve.start(cfg, progress=lambda s: print("  " + s))
    try:
        print(f"  userfm serve (Ray Serve, batch {args.batch_size}, wait {args.batch_wait_s * 1000:.0f} ms)")
        results["serve"] = measure(base, routes, levels, requests, args.repeats)
        batching = httpx.get(f"{base}/healthz").json()["encoder"]["batching"]
    finally:
        serve.stop()
        ray.shutdown()

    print(f"\n[serve_load] encoder batching: {batching['requests']} requests in {batching['batches']} batches "
          f"(largest {batching['largest_batch']})")
    for route in routes:
        s1, b1 = results["serve"][(route, 1)], results["bare"][(route, 1)]
        line = f"[serve_load] {route:8s} 1 client: p99 serve {s1['p99']:.1f} ms vs bare {b1['p99']:.1f} ms (+{s1['p99'] - b1['p99']:.1f} ms; target <= +5)"
        if 32 in levels:
            s32, b32 = results["serve"][(route, 32)], results["bare"][(route, 32)]
            line += f"; 32 clients: {s32['rps']:.1f} vs {b32['rps']:.1f} req/s = {s32['rps'] / b32['rps']:.2f}x (target >= 2x)"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({f"{k}/{r}/{c}": v for k, res in results.items() for (r, c), v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
