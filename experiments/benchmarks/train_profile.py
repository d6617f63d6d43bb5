"""Where a pretraining step's time goes, and the MFU ceiling the encoder's own matrix shapes allow.

Runs ``worker.train_loop``'s step (the plain, Ray-free loop of ``train_throughput.py`` (a): featurized
train split, length bucketing, ``step_inputs``, ``trim_events``, ``loss_and_backward``, clipping, the same
optimizer) on 1 torch thread under ``torch.profiler``, and prints:

1. the top operators by self CPU time (the ``torch.profiler`` table), and the step split into groups:
   GEMMs (``mm`` / ``addmm`` / ``bmm`` / ``linear``, forward and backward), attention kernels, other
   element-wise / normalisation ops, the optimizer, and the per-step data preparation on the host;
2. MFU of those steps (model FLOPs over real events / the 1-thread fp32 peak of a 1024^3 matmul);
3. the **shape ceiling**: the FLOP/s one thread reaches on the encoder's own GEMMs (token rows x d_model
   -> 3 d_model, d_model, 4 d_model and back, forward + both backward products, at this run's mean
   tokens per step), as a share of the same peak. A step cannot reach a higher MFU than that share even
   with zero overhead elsewhere, so it is the measured ceiling for the MFU target (>= 40 %).

    .venv/bin/python experiments/benchmarks/train_profile.py                   # small, clue, category
    .venv/bin/python experiments/benchmarks/train_profile.py --size tiny --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

GROUPS = {  # operator-name substrings -> group (first match wins; names are aten::... or profiler labels)
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "_efficient_attention", "_flash_attention", "aten::_softmax", "softmax"),
    "optimizer": ("Optimizer.step", "_fused_adamw", "adamw", "clip_grad"),
}


def gemm_ceiling(d: int, rows: int, threads: int = 1, seconds: float = 0.5) -> dict:
    """FLOP/s of the encoder layer's GEMMs at ``rows`` token rows: for each (d_in, d_out) of the layer
    (qkv, out-projection, feed-forward up and down), the forward x W and both backward products, timed
    together (the mix one layer runs). Returns {"flops_per_s", "shapes"}."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    mats = [(torch.randn(rows, i), torch.randn(i, o), torch.randn(rows, o)) for i, o in shapes]

    def once() -> float:
        flops = 0.0
        for x, w, g in mats:
            x @ w  # forward
            g @ w.T  # grad wrt the input
            x.T @ g  # grad wrt the weight
            flops += 3 * 2 * rows * w.shape[0] * w.shape[1]
        return flops

    once()
    reps, total, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        total += once()
        reps += 1
    rate = total / (time.perf_counter() - t0)
    torch.set_num_threads(old)
    return {"flops_per_s": rate, "shapes": shapes}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--size", default="small", help="named encoder size (tiny | small | base | large)")
    ap.add_argument("--objective", default="clue", help="mlm | simclr | clue")
    ap.add_argument("--item-encoder", default="category", help="category | text")
    ap.add_argument("--batch-size", type=int, default=32, help="users (clue: pairs) per step")
    ap.add_argument("--bucket-batches", type=int, default=8, help="length bucketing group (1 = off)")
    ap.add_argument("--max-events", type=int, default=64, help="events per view")
    ap.add_argument("--users", type=int, default=2000, help="synthetic users in the dataset")
    ap.add_argument("--warmup", type=int, default=5, help="steps before profiling")
    ap.add_argument("--steps", type=int, default=30, help="profiled steps")
    ap.add_argument("--repeats", type=int, default=3, help="peak / ceiling measurements (median reported)")
    ap.add_argument("--rows", type=int, default=20, help="operators in the profiler table")
    ap.add_argument("--dropout", type=float, default=None, help="encoder dropout (default: PretrainConfig's)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: steps under CPU autocast")
    args = ap.parse_args()

    import ray
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import train_throughput as tt
    from userfm.models.encoders import UserEncoder
    from userfm.models.features import to_torch, trim_events
    from userfm.objectives.pretext import build_head, loss_and_backward
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import _objective_config, batch_flops, lr_at, measure_peak_flops, step_inputs, step_seed
    from userfm.train.worker import make_optimizer

    work = Path(tempfile.mkdtemp(prefix="userfm-prof-"))
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import: set the levels after)

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    data = tt.make_dataset(work, args.users, 30.0, seed=0)
    ray.shutdown()
    cfg = PretrainConfig(data=data, objective=args.objective, item_encoder=args.item_encoder, size=args.size,
                         max_events=args.max_events, batch_size=args.batch_size, bucket_batches=args.bucket_batches,
                         max_steps=args.warmup + args.steps, warmup_steps=args.warmup, threads_per_worker=1,
                         precision=args.precision,
                         **({} if args.dropout is None else {"dropout": args.dropout}))
    _, _, enc_cfg, rows = tt.featurized_train(cfg)

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    ocfg = _objective_config(cfg)
    model, head = UserEncoder(enc_cfg), build_head(ocfg, enc_cfg)
    params = list(model.parameters()) + list(head.parameters())
    opt = make_optimizer(params, cfg)
    model.train()
    batches = [b for e in range(100) for b in tt._batches(cfg, rows, e, bucketed=True)][: args.warmup + args.steps]
    keys = ["length"] if cfg.objective == "mlm" else ["a.length", "b.length"]
    flops, tokens, step_s = 0.0, [], []

    def step(i: int, idx) -> None:
        nonlocal flops
        t0 = time.perf_counter()
        with record_function("## data: step_inputs + trim + to_torch"):
            nb = {k: v[idx] for k, v in rows.items()}
            seed = step_seed(cfg.seed, i, 0)
            torch.manual_seed(seed)
            nb_step = trim_events(step_inputs(nb, cfg, np.random.default_rng(seed)))
            batch = to_torch(nb_step)
        for g in opt.param_groups:
            g["lr"] = lr_at(i, cfg)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):  # as train_loop
            loss, _ = loss_and_backward(model, head, batch, ocfg)
        with record_function("## optimizer: clip + step"):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        float(loss)
        if i >= args.warmup:
            step_s.append(time.perf_counter() - t0)
            width = int(max(nb_step[k].shape[1] if nb_step[k].ndim > 1 else 0 for k in nb_step if k.endswith("ts")))
            tokens.append(len(idx) * len(keys) * width)
            flops += batch_flops(nb, enc_cfg, cfg.max_text_tokens, False)

    for i, idx in enumerate(batches[: args.warmup]):
        step(i, idx)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, idx in enumerate(batches[args.warmup:], start=args.warmup):
            step(i, idx)
    total_s = sum(step_s)

    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    groups: dict[str, float] = {}
    labels = {}
    for e in avg:
        if e.key.startswith("## "):
            labels[e.key] = e.cpu_time_total / 1e6
            continue
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    # data and optimizer are labelled spans: take their totals, and their ops out of the op groups
    print(f"\nWhere a step's time goes ({args.steps} profiled steps, {total_s / args.steps * 1e3:.1f} ms/step, "
          f"1 thread, {args.size} {args.objective} {args.item_encoder}, batch {args.batch_size}):")
    print("| part | s | share |\n|---|---|---|")
    for name, s in sorted({**groups, **labels}.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s:.3f} | {100 * s / max(total_s, 1e-9):.1f} % |")
    print("(op groups count self time of every operator, including those inside the labelled data and optimizer "
          "spans; the labelled spans count their whole time)")

    peaks = [measure_peak_flops(1, seconds=1.0) for _ in range(args.repeats)]
    rows_mean = int(np.mean(tokens))
    ceilings = [gemm_ceiling(enc_cfg.d_model, rows_mean)["flops_per_s"] for _ in range(args.repeats)]
    peak, ceiling = statistics.median(peaks), statistics.median(ceilings)
    mfu = flops / total_s / peak
    print(f"\n1-thread fp32 peak (1024^3 matmul, median of {args.repeats}): {peak / 1e9:.1f} GFLOP/s")
    print(f"encoder GEMMs at {rows_mean} token rows x d_model {enc_cfg.d_model} (fwd + bwd, median of {args.repeats}): "
          f"{ceiling / 1e9:.1f} GFLOP/s = {100 * ceiling / peak:.1f} % of peak  <- the shape ceiling on MFU")
    print(f"profiled steps: MFU {100 * mfu:.1f} % of peak = {100 * mfu * peak / ceiling:.1f} % of the shape ceiling "
          f"(profiler overhead included: train_throughput.py gives the unprofiled figure)")


if __name__ == "__main__":
    main()
