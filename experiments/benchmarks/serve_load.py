"""Serving latency and throughput: the userfm Ray Serve app vs a bare FastAPI + uvicorn process.

Same encoder, same head, same requests, in the same run, 127.0.0.1 only, bounded request counts:

  serve  `userfm.serve.app.start` on an embedded 2-CPU Ray: Ingress -> Encoder (@serve.batch) / EmbeddingStore
         -> Head, one replica each (1 torch thread in the encoder)
  bare   one uvicorn process with a FastAPI app that loads the same encoder and head and computes each
         request on its own (no batching; sync routes in uvicorn's thread pool, 1 torch thread): what a
         user might write instead. The per-request work is the same code (events_to_rows + EmbedActor).

Routes: POST /v1/embed (a user's stored events -> embedding) and POST /v1/heads/<head>/predict by user id
(stored embedding -> head). At each concurrency (closed loop: C clients, each sends its next request
when the last answered) it prints p50/p95/p99 latency (ms) and requests/s, the median over --repeats,
a table of serve/bare ratios, then the targets: at 1 client serve p99 - bare p99 <= 5 ms; at 32
clients serve/bare throughput >= 2.

--breakdown (after the load levels, 1 client, sequential requests) splits a request's time over its hops
from the Server-Timing header the ingress writes (time of the route in the ingress replica and of each
handle call / local table lookup in it), the same model work timed in this process, and the floor of
the proxy + ingress hops (GET /v1/heads, no model call) next to the bare app's GET /healthz.

    python experiments/benchmarks/serve_load.py                       # runs/demo, 3 repeats
    python experiments/benchmarks/serve_load.py --run runs/demo --requests 60 --repeats 1 --breakdown
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

    from userfm.infer.embed import EmbedActor, model_identity, read_embeddings
    from userfm.eval.heads import load_head
    from userfm.serve.deployments import events_to_rows

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


def server_timing(header: str) -> dict[str, float]:
    """``"encoder;dur=3.1, ingress;dur=4.0"`` -> ``{"encoder": 3.1, "ingress": 4.0}`` (ms; repeated hops summed)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        out[name] = out.get(name, 0.0) + float(dur)
    return out


def floor(base: str, get_path: str, post_path: str, n: int, clients: int) -> dict:
    """Requests that do no model work, through the whole HTTP path: median ms of ``n`` sequential GETs
    of ``get_path`` and POSTs to ``post_path`` (a 404 answered after the JSON body is parsed), and the
    POSTs' req/s with ``clients`` closed-loop clients: the ceiling of any route's latency and throughput."""
    import httpx

    get, post = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            for acc, call in ((get, lambda: client.get(base + get_path)),
                              (post, lambda: client.post(base + post_path, json={"user_id": "nobody-at-all"}))):
                t0 = time.perf_counter()
                r = call()
                acc.append((time.perf_counter() - t0) * 1000)
                assert r.status_code in (200, 404), r.text
    rps = statistics.median(asyncio.run(load(base + post_path, [{"user_id": "nobody-at-all"}], 4 * n, clients))["rps"]
                            for _ in range(3))
    return {"get_ms": statistics.median(get), "post_ms": statistics.median(post), "post_rps": rps}


def breakdown(base: str, routes: dict, n: int, model: str, head_dir: str, embeddings: str) -> dict:
    """1 client, ``n`` sequential requests per route: medians (ms) of the client's time, the ingress
    route time and each hop from Server-Timing, the model work alone (in this process, same code)."""
    import httpx
    import numpy as np

    from userfm.infer.embed import EmbedActor, model_identity, read_embeddings
    from userfm.eval.heads import load_head
    from userfm.serve.deployments import events_to_rows

    actor = EmbedActor(model, model_identity(model), threads=1)
    head = load_head(head_dir)
    ids, x = read_embeddings(embeddings)
    index = {u: i for i, u in enumerate(ids)}

    def work(route, body):  # what the model replicas compute for one request
        if route == "embed":
            actor(events_to_rows([body["events"]], actor.model.config.max_events))
        else:
            head.predict_proba(x[index[body["user_id"]]][None])

    def med(values):
        return statistics.median(values) if values else 0.0

    out = {}
    with httpx.Client(timeout=60) as client:
        for route, (path, bodies) in routes.items():
            for body in bodies[:5]:
                work(route, body)  # warm-up
            compute = []
            for i in range(n):
                t0 = time.perf_counter()
                work(route, bodies[i % len(bodies)])
                compute.append((time.perf_counter() - t0) * 1000)
            total, hops = [], []
            for i in range(n):
                t0 = time.perf_counter()
                r = client.post(base + path, json=bodies[i % len(bodies)])
                total.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
                hops.append(server_timing(r.headers.get("server-timing", "")))
            names = sorted({k for h in hops for k in h} - {"ingress"})
            row = {"client": med(total), "ingress": med([h.get("ingress", 0.0) for h in hops]), "compute": med(compute)}
            row.update({f"hop:{k}": med([h.get(k, 0.0) for h in hops]) for k in names})
            row["proxy+http"] = med([t - h.get("ingress", 0.0) for t, h in zip(total, hops)])
            row["ingress own"] = med([h.get("ingress", 0.0) - sum(v for k, v in h.items() if k != "ingress") for h in hops])
            out[route] = row
    return out


def print_breakdown(b: dict) -> None:
    print("\n[serve_load] breakdown at 1 client (medians, ms; client = what the client waited; ingress = the route in the "
          "ingress replica; proxy+http = client - ingress: HTTP, Serve's proxy and the proxy -> ingress hop; hop:X = one "
          "handle call (or local table lookup) from the ingress; compute = the same model work in this process)")
    for route, row in b.items():
        if route == "floor":
            continue
        hops = "  ".join(f"{k[4:]} {v:.2f}" for k, v in row.items() if k.startswith("hop:"))
        handle = sum(v for k, v in row.items() if k.startswith("hop:") and k != "hop:table") - row["compute"]
        print(f"    {route:8s} client {row['client']:6.2f} = proxy+http {row['proxy+http']:6.2f} + ingress {row['ingress']:6.2f} "
              f"[own {row['ingress own']:5.2f}; hops: {hops}]; compute alone {row['compute']:.2f} -> handle hops cost "
              f"{handle:.2f} over the compute")
    s, f = b["floor"]["serve"], b["floor"]["bare"]
    print(f"    floor    no model work (serve: proxy + ingress only): GET serve /v1/heads {s['get_ms']:.2f} vs bare /healthz "
          f"{f['get_ms']:.2f} (+{s['get_ms'] - f['get_ms']:.2f}); POST a 404 after parsing the body: serve {s['post_ms']:.2f} vs bare "
          f"{f['post_ms']:.2f} (+{s['post_ms'] - f['post_ms']:.2f}: Serve's replica fetches a POST body back from the proxy, one "
          f"more round trip); at 32 clients {s['post_rps']:.1f} vs {f['post_rps']:.1f} req/s = "
          f"{s['post_rps'] / f['post_rps']:.2f}x: the ceiling of any serve/bare throughput ratio for a route whose model work is ~0")


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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ServeConfig field of the served app (repeatable), e.g. ingress_table=false")
    ap.add_argument("--breakdown", action="store_true", help="also split a 1-client request's time over its hops")
    ap.add_argument("--breakdown-requests", type=int, default=100, help="sequential requests per route in --breakdown")
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

    from userfm.serve import app as serve
    from userfm.config import load_config
    from userfm.data.dataset import read_sequences
    from userfm.serve.app import _free_port
    from userfm.serve.config import ServeConfig
    from userfm.serve.deployments import events_from_sequence

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
        if args.breakdown:  # the bare app's 404 for an unknown user comes before any model work
            bare_floor = floor(f"http://127.0.0.1:{port}", "/healthz", f"/v1/heads/{args.head}/predict", args.breakdown_requests, 32)
    finally:
        bare.terminate()
        bare.wait(30)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = load_config(ServeConfig, None, args.set, model=model, embeddings=embeddings, heads={args.head: head_dir}, port=0,
                      batch_size=args.batch_size, batch_wait_s=args.batch_wait_s)
    base = serve.start(cfg, progress=lambda s: print("  " + s))
    try:
        print(f"  userfm serve (Ray Serve, batch {args.batch_size}, wait {args.batch_wait_s * 1000:.0f} ms while busy, "
              f"ingress_table {cfg.ingress_table}, --set {args.set or '-'})")
        results["serve"] = measure(base, routes, levels, requests, args.repeats)
        batching = httpx.get(f"{base}/healthz").json()["encoder"]["batching"]
        if args.breakdown:
            parts = breakdown(base, routes, args.breakdown_requests, model, head_dir, embeddings)
            parts["floor"] = {"serve": floor(base, "/v1/heads", "/v1/heads/no-such-head/predict", args.breakdown_requests, 32),
                              "bare": bare_floor}
    finally:
        serve.stop()
        ray.shutdown()

    print(f"\n[serve_load] encoder batching: {batching['requests']} requests in {batching['batches']} batches "
          f"(largest {batching['largest_batch']}); load avg now {os.getloadavg()[0]:.1f}")
    print("\n[serve_load] serve / bare, same run (latency ratio > 1: serve slower; throughput ratio > 1: serve faster)")
    print(f"    {'route':8s} {'clients':>7s}  {'p50 serve':>9s} {'bare':>7s} {'ratio':>6s}  {'p99 serve':>9s} {'bare':>7s} {'ratio':>6s}  "
          f"{'req/s serve':>11s} {'bare':>7s} {'ratio':>6s}")
    for route in routes:
        for c in levels:
            s_, b_ = results["serve"][(route, c)], results["bare"][(route, c)]
            print(f"    {route:8s} {c:7d}  {s_['p50']:9.1f} {b_['p50']:7.1f} {s_['p50'] / b_['p50']:6.2f}  {s_['p99']:9.1f} "
                  f"{b_['p99']:7.1f} {s_['p99'] / b_['p99']:6.2f}  {s_['rps']:11.1f} {b_['rps']:7.1f} {s_['rps'] / b_['rps']:6.2f}")
    if args.breakdown:
        print_breakdown(parts)
    print()
    for route in routes:
        s1, b1 = results["serve"][(route, 1)], results["bare"][(route, 1)]
        gap = s1["p99"] - b1["p99"]
        line = (f"[serve_load] {route:8s} 1 client: p99 serve {s1['p99']:.1f} ms vs bare {b1['p99']:.1f} ms ({gap:+.1f} ms; "
                f"target <= +5: {'met' if gap <= 5 else 'MISSED'})")
        if 32 in levels:
            s32, b32 = results["serve"][(route, 32)], results["bare"][(route, 32)]
            ratio = s32["rps"] / b32["rps"]
            line += (f"; 32 clients: {s32['rps']:.1f} vs {b32['rps']:.1f} req/s = {ratio:.2f}x "
                     f"(target >= 2x: {'met' if ratio >= 2 else 'MISSED'})")
        print(line)
    if args.out:
        figures = {f"{k}/{r}/{c}": v for k, res in results.items() for (r, c), v in res.items()}
        if args.breakdown:
            figures["breakdown"] = parts
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
