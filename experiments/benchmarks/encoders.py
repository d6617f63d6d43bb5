"""Encoder throughput on this machine: forward+backward samples/s per named size and item encoder,
estimated FLOPs per sample, and the MiniLM cache build rate.

    .venv/bin/python experiments/benchmarks/encoders.py [--sizes tiny,small,base] [--batch 16] ...

FLOPs per sample (``userfm.models.encoders.flops_per_sample``, Kaplan et al. 2020): training = 3 x forward,
forward per user = 2 * N_user * T + 2 * n_layers * T^2 * d with T = events + 1 ([CLS]), plus for the
text item encoder events * (2 * N_item * K + 2 * item_layers * K^2 * d) with K tokens per event, plus
2 * 384 * d * events for a frozen-vector projection. N = non-embedding parameters.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from userfm.models.encoders import ITEM_ENCODERS, SIZES, UserEncoder, config_for, expected_num_params, flops_per_sample
from userfm.objectives.losses import symmetric_info_nce


def synthetic_batch(cfg, batch: int, events: int, tokens: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Random ids of the right ranges; every user has ``events`` events of ``tokens`` tokens."""
    b = {
        "length": torch.full((batch,), events, dtype=torch.long),
        "service": torch.as_tensor(rng.integers(2, cfg.n_services, (batch, events))),
        "category": torch.as_tensor(np.stack([rng.integers(2, n, (batch, events)) for n in cfg.category_sizes], -1)),
        "time": torch.as_tensor(np.stack([rng.integers(2, n, (batch, events)) for n in cfg.time_sizes], -1)),
        "masked": torch.zeros(batch, events, dtype=torch.bool),
    }
    if cfg.item_encoder == "text":
        b["tokens"] = torch.as_tensor(rng.integers(3, cfg.text_vocab, (batch, events, tokens)))
    if cfg.text_vector_dim:
        b["text_vector"] = torch.as_tensor(rng.standard_normal((batch, events, cfg.text_vector_dim)), dtype=torch.float32)
    return b


def bench_encoder(size: str, item: str, batch: int, events: int, tokens: int, steps: int) -> dict:
    cfg = config_for(size, item_encoder=item, text_vector_dim=384 if item != "text" else 0,
                     max_events=events, max_text_tokens=tokens, text_vocab=8192)
    torch.manual_seed(0)
    model = UserEncoder(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    a, b = (synthetic_batch(cfg, batch, events, tokens, rng) for _ in range(2))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = symmetric_info_nce(model(a), model(b), 0.07)  # 2 * batch samples forward + backward
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sps = 2 * batch / float(np.median(times))  # median: robust to other processes on a shared 2-core box
    flops = flops_per_sample(cfg, n_events=events, n_tokens=tokens)
    return {
        "size": size, "item": item, "params": expected_num_params(cfg),
        "non_emb": expected_num_params(cfg, non_embedding=True), "samples_s": sps, "flops": flops,
        "gflops_s": sps * flops / 1e9,
    }


def bench_minilm(n_texts: int) -> dict:
    from userfm.models.minilm import MiniLMEncoder, build_cache

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)] + ["red", "running", "shoes", "phone", "case", "한국어", "café"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(n_texts)]
    t0 = time.perf_counter()
    enc = MiniLMEncoder(batch_size=256)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        first = build_cache(texts + texts[: n_texts // 2], d, encoder=enc)  # duplicates encoded once
        t0 = time.perf_counter()
        second = build_cache(texts, d, encoder=enc)
        reuse_s = time.perf_counter() - t0
    return {"load_s": load_s, "first": first, "second": second, "reuse_s": reuse_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small,base,large", help="comma-separated named sizes")
    p.add_argument("--items", default=",".join(ITEM_ENCODERS), help="comma-separated item encoders")
    p.add_argument("--batch", type=int, default=16, help="users per view (2 views per step)")
    p.add_argument("--events", type=int, default=32, help="events per user")
    p.add_argument("--tokens", type=int, default=16, help="BPE tokens per event (text item encoder)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    p.add_argument("--minilm-texts", type=int, default=1000, help="unique texts for the cache build (0: skip)")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 2x{args.batch} users, "
          f"{args.events} events/user, {args.tokens} tokens/event, fwd+bwd+AdamW, symmetric InfoNCE")
    print(f"{'size':<10} {'item':<9} {'params':>12} {'non-emb':>12} {'samples/s':>10} {'GFLOP/sample':>13} {'GFLOP/s':>8}")
    for size in args.sizes.split(","):
        for item in args.items.split(","):
            r = bench_encoder(size, item, args.batch, args.events, args.tokens, args.steps)
            print(f"{size:<10} {item:<9} {r['params']:>12,} {r['non_emb']:>12,} {r['samples_s']:>10.1f} "
                  f"{r['flops'] / 1e9:>13.3f} {r['gflops_s']:>8.1f}", flush=True)
    clue = config_for("clue-725m")
    print(f"{'clue-725m':<10} {'text':<9} {expected_num_params(clue):>12,} "
          f"{expected_num_params(clue, non_embedding=True):>12,} {'(not run)':>10} "
          f"{flops_per_sample(clue, n_events=args.events, n_tokens=args.tokens) / 1e9:>13.3f}")
    if args.minilm_texts:
        r = bench_minilm(args.minilm_texts)
        f, s = r["first"], r["second"]
        print(f"MiniLM cache: model load {r['load_s']:.1f} s; build {f['n_new']} new of {f['n_texts']} texts "
              f"({f['n_unique']} unique) in {f['seconds']:.1f} s = {f['texts_per_s']:.0f} texts/s; "
              f"rebuild reused {s['n_reused']}, encoded {s['n_new']}, in {r['reuse_s']:.2f} s")


if __name__ == "__main__":
    main()
