"""The GPU paths, measured: bf16 autocast vs fp32 training steps, Ray Train with ``use_gpu``, GPU embed actors.

Runs unchanged wherever a CUDA device is present (``--device cpu`` runs the same code on the CPU, as a
smoke check of the script itself; its figures say nothing about a GPU). Same data and model in every row:

  (a) plain fp32   ``worker.train_loop``'s step in this process on the device (no Ray): batches go
                   through pinned memory with non-blocking copies (``pretrain._to_device``)
  (b) plain bf16   the same under ``torch.autocast(dtype=bfloat16)`` (``--set precision=bf16``)
  (c) ray bf16     ``run_pretrain(num_workers=1, use_gpu=True, precision="bf16")`` (Ray Train, one GPU worker)
  (d) embed plain  a plain torch inference loop on the device (load, make_batch, forward)
  (e) embed ray    ``run_embed(gpus=1)``: one Ray Data actor on the GPU

Prints samples/s (median over --repeats), MFU against the device's measured matmul peak in the same
dtype (a 4096^3 matmul), the ratios b/a (bf16 speed-up), c/b (Ray Train's cost on a GPU) and e/d
(embed actors vs the plain loop), and the bf16-vs-fp32 difference of the first losses (same seed).

    python experiments/benchmarks/gpu.py                     # cuda, small encoder
    python experiments/benchmarks/gpu.py --size base --batch-size 256 --steps 60
    python experiments/benchmarks/gpu.py --device cpu --size tiny --steps 6 --users 600 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_steps(cfg, enc_cfg, rows, device, steps: int, warmup: int) -> tuple[float, float, list[float]]:
    """train_loop's step on ``device`` at ``cfg.precision``: (samples/s after warm-up, model FLOP/s, losses)."""
    import torch

    import train_throughput as tt
    from userfm.models.encoders import UserEncoder
    from userfm.models.features import trim_events
    from userfm.objectives.pretext import build_head, loss_and_backward
    from userfm.train.steps import _objective_config, batch_flops, lr_at, step_inputs, step_seed
    from userfm.train.worker import _to_device, make_optimizer

    torch.manual_seed(cfg.seed)
    ocfg = _objective_config(cfg)
    model, head = UserEncoder(enc_cfg).to(device), build_head(ocfg, enc_cfg).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = make_optimizer(params, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    batches = [b for e in range(1000) for b in tt._batches(cfg, rows, e, bucketed=True)][: warmup + steps]
    losses, samples, flops, t0 = [], 0, 0.0, 0.0
    model.train()
    for i, idx in enumerate(batches):
        if i == warmup:
            sync(device)
            t0, samples, flops = time.perf_counter(), 0, 0.0
        nb = {k: v[idx] for k, v in rows.items()}
        seed = step_seed(cfg.seed, i, 0)
        torch.manual_seed(seed)
        batch = _to_device(trim_events(step_inputs(nb, cfg, np.random.default_rng(seed))), device)
        for g in opt.param_groups:
            g["lr"] = lr_at(i, cfg)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = loss_and_backward(model, head, batch, ocfg)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(loss))  # (a host sync per step, as train_loop's logging has)
        samples += len(idx)
        flops += batch_flops(nb, enc_cfg, cfg.max_text_tokens, False)
    sync(device)
    dt = time.perf_counter() - t0
    return samples / dt, flops / dt, losses


def embed_plain(model_dir: str, data: str, device, batch_size: int) -> float:
    """users/s of a plain inference loop on ``device`` (model load included, as run_embed's actors)."""
    import pyarrow.parquet as pq
    import torch

    import userfm
    from userfm.models.features import make_batch, to_torch

    t0 = time.perf_counter()
    model, vocabs, tok = userfm.load_encoder(model_dir, device=str(device))
    table = pq.read_table(Path(data) / "sequences" / "all")
    n = 0
    with torch.no_grad():
        for start in range(0, table.num_rows, batch_size):
            z = model(to_torch(make_batch(table.slice(start, batch_size), vocabs, tok, max_events=model.config.max_events), str(device)))
            n += int(z.shape[0])
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke check of this script)")
    ap.add_argument("--size", default="small", help="named encoder size (tiny | small | base | large)")
    ap.add_argument("--objective", default="clue", help="mlm | simclr | clue")
    ap.add_argument("--batch-size", type=int, default=128, help="users (clue: pairs) per step")
    ap.add_argument("--max-events", type=int, default=64, help="events per view")
    ap.add_argument("--users", type=int, default=4000, help="synthetic users")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (CUDA context, autotuning)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each row (median reported)")
    ap.add_argument("--embed-batch", type=int, default=1024, help="users per embed batch")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed after)")
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, or --device cpu for a smoke check of the script.")
        return 2
    import ray

    import train_throughput as tt
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.train.pretrain import run_pretrain
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import measure_peak_flops

    work = Path(args.workdir or tempfile.mkdtemp(prefix="userfm-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    ray.init(num_cpus=len(os.sched_getaffinity(0)), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        data = tt.make_dataset(work, args.users, 30.0, seed=0)
        cfg = PretrainConfig(data=data, objective=args.objective, item_encoder="category", size=args.size,
                             max_events=args.max_events, batch_size=args.batch_size, bucket_batches=8,
                             max_steps=args.warmup + args.steps, warmup_steps=args.warmup, num_workers=1,
                             use_gpu=device.type == "cuda", log_every=max(1, args.steps // 4), eval_every=0,
                             checkpoint_every=10**9, keep_checkpoints=1, max_failures=0, threads_per_worker=1)
        _, _, enc_cfg, rows = tt.featurized_train(cfg)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        n = 4096 if device.type == "cuda" else 1024
        peaks = {name: measure_peak_flops(torch.get_num_threads(), n=n, dtype=dt, device=str(device))
                 for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        print(f"[gpu] {name}: matmul peak fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.1f} TFLOP/s; "
              f"{args.size} encoder, {args.objective}, batch {args.batch_size}", flush=True)

        res: dict[str, list] = {"a": [], "b": [], "c": [], "d": [], "e": []}
        mfu: dict[str, list] = {"a": [], "b": []}
        first_losses = {}
        for r in range(args.repeats):
            for key, prec in (("a", "fp32"), ("b", "bf16")):
                sps, fps, losses = plain_steps(replace(cfg, precision=prec), enc_cfg, rows, device, args.steps, args.warmup)
                res[key].append(sps)
                mfu[key].append(fps / peaks[prec])
                first_losses[prec] = losses[:3]
            out = work / f"ray{r}"
            run_pretrain(replace(cfg, out=str(out), precision="bf16"), progress=lambda s: None)
            import json

            rows_ = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            timed = [x["samples_per_s"] for x in rows_ if "samples_per_s" in x][1:] or [rows_[-1]["samples_per_s"]]
            res["c"].append(float(np.median(timed)))
            model_dir = str(out / "model")
            res["d"].append(embed_plain(model_dir, data, device, args.embed_batch))
            t0 = time.perf_counter()
            e = run_embed(EmbedConfig(model=model_dir, data=data, out=str(work / f"emb{r}"), batch_size=args.embed_batch,
                                      gpus=1.0 if device.type == "cuda" else 0.0, overwrite=True), progress=lambda s: None)
            res["e"].append(e["users_in"] / (time.perf_counter() - t0))
            print(f"[gpu] repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()), flush=True)
        med = {k: statistics.median(v) for k, v in res.items()}
        labels = {"a": "plain fp32 (samples/s)", "b": "plain bf16 autocast (samples/s)", "c": "Ray Train use_gpu bf16 (samples/s)",
                  "d": "embed: plain loop (users/s)", "e": "embed: run_embed, 1 GPU actor (users/s)"}
        print(f"\n| row | median of {args.repeats} | MFU |\n|---|---|---|")
        for k, label in labels.items():
            m = f"{100 * statistics.median(mfu[k]):.1f} %" if k in mfu else "-"
            print(f"| ({k}) {label} | {med[k]:.0f} | {m} |")
        print(f"\nbf16 speed-up b/a {med['b'] / med['a']:.2f}x; Ray Train on the GPU c/b {med['c'] / med['b']:.2f}x; "
              f"embed actors e/d {med['e'] / med['d']:.2f}x")
        print(f"first losses fp32 {[round(x, 4) for x in first_losses['fp32']]} vs bf16 {[round(x, 4) for x in first_losses['bf16']]}")
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
