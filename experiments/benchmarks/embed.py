"""Embedding throughput: `userfm embed` (Ray Data actor pool) vs a plain single-process torch loop.

Same dataset, same encoder, same batch size, in the same run: (a) a plain loop with 1 torch thread
(read Parquet, make_batch, forward); (b) `run_embed` with 1 actor x 1 thread; (c) 2 actors x 1 thread.
Ray timings include reading, the actors' start-up and model load (what a user waits for), on an
already-started local Ray. Prints users/s (median over repeats) and the ratios b/a and c/a.
Target: b/a >= 0.9.

Also printed, because wall clocks on a shared 2-core box are noisy: the CPU seconds (process time) of
the plain loop's per-batch work vs ``EmbedActor.__call__`` on the same batches in this process, i.e. the
actor's own per-batch overhead with Ray's scheduling and start-up taken out. What is left of the wall
ratio's gap is Ray's: actor start-up (process, torch import, model load) and per-batch transport.

    python experiments/benchmarks/embed.py                        # 20k users, size small, 3 repeats
    python experiments/benchmarks/embed.py --users 5000 --size tiny --repeats 1
    python experiments/benchmarks/embed.py --users 100000 --no-cpu-split  # start-up amortized
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def plain_loop(model_dir: Path, data: Path, batch_size: int) -> tuple[float, int]:
    import pyarrow.parquet as pq
    import torch

    import userfm
    from userfm.models.features import make_batch, to_torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, vocabs, tok = userfm.load_encoder(model_dir)
    table = pq.read_table(data / "sequences" / "all")
    n = 0
    with torch.no_grad():
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size)
            z = model(to_torch(make_batch(rows, vocabs, tok, max_events=model.config.max_events)))
            n += z.shape[0]
    return time.perf_counter() - t0, n


def cpu_per_batch(model_dir: Path, data: Path, batch_size: int) -> tuple[float, float]:
    """CPU seconds: (plain make_batch + forward, EmbedActor.__call__) over the same batches, in-process."""
    import pyarrow.parquet as pq
    import torch

    import userfm
    from userfm.infer.embed import EmbedActor
    from userfm.models.features import make_batch, to_torch

    torch.set_num_threads(1)
    model, vocabs, tok = userfm.load_encoder(model_dir)
    actor = EmbedActor(str(model_dir), {"model_id": "m", "model_version": "v", "config_hash": "c"})
    table = pq.read_table(data / "sequences" / "all")
    plain = ray = 0.0
    with torch.no_grad():
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size)
            c0 = time.process_time()
            model(to_torch(make_batch(rows, vocabs, tok, max_events=model.config.max_events)))
            c1 = time.process_time()
            actor(rows)
            ray += time.process_time() - c1
            plain += c1 - c0
    return plain, ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20000, help="synthetic users")
    ap.add_argument("--size", default="small", help="encoder size (tiny | small | base)")
    ap.add_argument("--item-encoder", default="category", help="category | text")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cpu-split", dest="cpu_split", action="store_false",
                    help="skip the in-process CPU-seconds comparison (two more passes over the data)")
    args = ap.parse_args()

    import torch

    from userfm.data.dataset import read_sequences
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.models.encoders import UserEncoder, config_for, save_encoder
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.runtime import init_ray
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.models.tokenizer import TextTokenizer

    work = Path(tempfile.mkdtemp(prefix="userfm-bench-embed-"))
    try:
        init_ray(num_cpus=2)
        generate(SynthConfig(n_users=args.users, seed=0), work / "raw")
        run_ingest(IngestConfig(inputs=(str(work / "raw" / "events"),), out=str(work / "ds"), max_events=64), progress=lambda s: None)
        rows = read_sequences(work / "ds")
        vocabs = fit_vocabs(rows, FeatureConfig(max_events=64, max_text_tokens=16))
        tok = None
        if args.item_encoder == "text":
            tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=2048)
        torch.manual_seed(0)
        model = UserEncoder(config_for(args.size, vocabs, tok, item_encoder=args.item_encoder, max_events=64))
        save_encoder(work / "model", model, vocabs, tok)
        print(f"{rows.num_rows:,} users, encoder {args.size}/{args.item_encoder}, batch {args.batch_size}, 2 CPUs")

        # warm-up: worker processes, imports
        run_embed(EmbedConfig(model=str(work / "model"), data=str(work / "ds"), out=str(work / "warm"), overwrite=True), progress=lambda s: None)
        res: dict[str, list[float]] = {"plain loop, 1 thread": [], "ray, 1 actor x 1 thread": [], "ray, 2 actors x 1 thread": []}
        for r in range(args.repeats):
            dt, n = plain_loop(work / "model", work / "ds", args.batch_size)
            res["plain loop, 1 thread"].append(n / dt)
            for actors, key in ((1, "ray, 1 actor x 1 thread"), (2, "ray, 2 actors x 1 thread")):
                t0 = time.perf_counter()
                m = run_embed(EmbedConfig(model=str(work / "model"), data=str(work / "ds"), out=str(work / f"emb{actors}"), overwrite=True,
                                          actors=actors, cpus_per_actor=1.0, batch_size=args.batch_size), progress=lambda s: None)
                res[key].append(m["users_in"] / (time.perf_counter() - t0))
            print(f"  run {r + 1}: " + "  ".join(f"{k}: {v[-1]:,.0f} users/s" for k, v in res.items()))
        if args.cpu_split:
            plain_cpu, actor_cpu = cpu_per_batch(work / "model", work / "ds", args.batch_size)
            print(f"  CPU s per pass (in-process): plain make_batch+forward {plain_cpu:.2f}, EmbedActor.__call__ {actor_cpu:.2f} "
                  f"({plain_cpu / actor_cpu:.2f}x)")
        med = {k: statistics.median(v) for k, v in res.items()}
        base = med["plain loop, 1 thread"]
        print("\nmedian users/s (target: 1 actor >= 0.9x the plain loop)")
        for k, v in med.items():
            print(f"  {k:<28} {v:>10,.0f}   {v / base:5.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
