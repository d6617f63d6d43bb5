"""Ingest throughput: `userfm ingest` (Ray Data) vs DuckDB doing the equivalent group-by on the same files.

For each size, synthetic events are written once as Parquet; then, alternating, in the same run:
  - userfm: the full ingest (read, validate every row, hash-partition users, dedupe, sort, build the
    combined and per-service sequences, write events + sequences + quarantine + manifest), on the
    already-started local Ray (start-up is reported separately, once);
  - DuckDB: read the same files, group by user, `list(... ORDER BY ts)` of every column, write Parquet
    (the core of what ingest does, without validation, dedupe or per-service sequences).
Both use every core of the machine. Prints events/s for each, the median over repeats, and the ratio.

    python experiments/benchmarks/ingest.py                 # 1M and 10M events, 3 repeats
    python experiments/benchmarks/ingest.py --sizes 1e6 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def duckdb_ingest(events_dir: Path, out: Path, threads: int) -> int:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads TO {threads}")
    con.execute(
        f"""
        COPY (
            SELECT user_id, count(*) AS n_events,
                   list(ts ORDER BY ts) AS ts, list(service ORDER BY ts) AS service,
                   list(text ORDER BY ts) AS text, list(item_id ORDER BY ts) AS item_id,
                   list(category ORDER BY ts) AS category, list(value ORDER BY ts) AS value
            FROM read_parquet('{events_dir}/*.parquet')
            GROUP BY user_id
        ) TO '{out}' (FORMAT parquet)
        """
    )
    n = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
    con.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated event counts (default: 1e6,1e7)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system and size (median reported)")
    ap.add_argument("--events-per-user", type=float, default=30.0, help="mean events per user")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed after)")
    args = ap.parse_args()

    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.runtime import init_ray
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    cpus = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="userfm-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    init_ray(num_cpus=cpus)
    print(f"machine: {cpus} CPUs; Ray start-up {time.perf_counter() - t0:.1f}s (not in the timings below)")

    # Warm-up: the first Ray Data job starts worker processes and imports pyarrow/numpy in them.
    generate(SynthConfig(n_users=300, seed=1), work / "warmup")
    run_ingest(IngestConfig(inputs=(str(work / "warmup" / "events"),), out=str(work / "warmup-ds"), overwrite=True), progress=lambda s: None)

    rows = []
    try:
        for size in [int(float(s)) for s in args.sizes.split(",")]:
            raw = work / f"raw-{size}"
            n_users = max(1, int(size / args.events_per_user))
            t0 = time.perf_counter()
            truth = generate(SynthConfig(n_users=n_users, events_per_user=args.events_per_user, seed=0, users_per_file=max(1, n_users // 8)), raw)
            n_events = truth["activity"]["n_events"]
            mb = sum(f.stat().st_size for f in (raw / "events").glob("*.parquet")) / 1e6
            print(f"\n{n_events:,} events, {n_users:,} users, {mb:.0f} MB Parquet (generated in {time.perf_counter() - t0:.1f}s)")
            ours, duck = [], []
            for r in range(args.repeats):
                out = work / f"ds-{size}"
                t0 = time.perf_counter()
                m = run_ingest(IngestConfig(inputs=(str(raw / "events"),), out=str(out), overwrite=True), progress=lambda s: None)
                ours.append(time.perf_counter() - t0)
                assert m["rows_kept"] == n_events, m["rows_kept"]
                dout = work / f"duck-{size}.parquet"
                t0 = time.perf_counter()
                n_users_duck = duckdb_ingest(raw / "events", dout, cpus)
                duck.append(time.perf_counter() - t0)
                assert n_users_duck == m["users"]["total"], (n_users_duck, m["users"]["total"])
                print(f"  run {r + 1}: userfm {ours[-1]:.2f}s ({n_events / ours[-1]:,.0f} ev/s)  duckdb {duck[-1]:.2f}s ({n_events / duck[-1]:,.0f} ev/s)")
            o, d = statistics.median(ours), statistics.median(duck)
            rows.append((n_events, n_events / o, n_events / d, d / o))
            shutil.rmtree(raw, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\nmedian events/s (target: userfm >= 0.5x DuckDB)")
    print(f"{'events':>12} {'userfm':>12} {'duckdb':>12} {'ratio':>7}")
    for n, a, b, ratio in rows:
        print(f"{n:>12,} {a:>12,.0f} {b:>12,.0f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
