"""Is the Amazon Arts <-> Office set's order across services behaviour? Two checks, seconds on 2 cores.

The set's README: each user's interactions are in time order, with no timestamps, and the last two are
the source's held-out targets, one per service, appended in file order. Models of transitions (SASRec, the
``next`` objective) sit at popularity level on its leave-one-out next item, while readers of bags of
recent items (item-kNN, a logistic head on the embeddings) do not (docs/benchmarks.md). If the order
across services were merged by position rather than by time, a transition model would learn an order
that is not behaviour. This script measures two things:

1. How often consecutive events switch service. It compares the body (every event but the last two),
   the last pair and the pair before it. The reference is what a random order of the same events would
   give: per user, 1 - sum_s c_s (c_s - 1) / (n (n - 1)), with c_s the user's events of service s among n.
2. Item-kNN HR@10 on each user's last event, from the last k items of the history, with and without the
   event just before it (the other service's appended target for most users). The cosine comes from
   every user's events but the last two, as in ``loo.py``. The differences are paired, over the same
   users. If dropping the nearest preceding event helps, that event carries less about the target than
   the ones before it.

    python experiments/benchmarks/amazon_order.py RUN      # RUN: a demo run folder of the set (RUN/dataset)

Writes ``docs/results/amazon-order.md`` (``--name``: ``amazon-order-<name>.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
K = 10


def switch_shares(services: list[np.ndarray]) -> dict[str, float]:
    """Per-user service sequences (n >= 4 each) -> share of consecutive pairs that switch service in the body
    (events before the last two), at the last pair and at the pair before it, and the body's share under a
    random order of the same events (the expectation, per user, averaged over body pairs)."""
    body_sw = body_pairs = 0
    expect = 0.0
    last = prev = 0
    for s in services:
        body = s[:-2]
        n = len(body)
        body_sw += int(np.sum(body[1:] != body[:-1]))
        body_pairs += n - 1
        _, c = np.unique(body, return_counts=True)
        expect += (n - 1) * (1.0 - float(np.sum(c * (c - 1))) / (n * (n - 1)))
        last += int(s[-1] != s[-2])
        prev += int(s[-2] != s[-3])
    return {"body": body_sw / body_pairs, "body_random_order": expect / body_pairs,
            "last_pair": last / len(services), "pair_before_last": prev / len(services)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("run", help="a demo run folder of the Amazon set (its dataset/)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="write docs/results/amazon-order-NAME.md")
    args = ap.parse_args()

    from userfm.data.dataset import read_sequences
    from userfm.eval import metrics as M
    from userfm.eval.heads import retrieval_ranks
    from userfm.eval.item_knn import item_cosine, knn_scorer
    from userfm.eval.render import _fmt, _fmt_diff
    from userfm.eval.task_data import item_histories

    data = Path(args.run) / "dataset"
    if not data.is_dir():
        raise SystemExit(f"amazon_order: no dataset folder {data} (a demo run of the Amazon set)")
    t0 = time.perf_counter()
    seq = read_sequences(data, columns=["user_id", "service"]).to_pydict()
    services = [np.asarray(s) for s in seq["service"] if len(s) >= 4]
    shares = switch_shares(services)

    catalog, items = item_histories(data)
    users = sorted(u for u, h in items.items() if len(h) >= 4)
    n_items = len(catalog)
    fit = [items[u][:-2] for u in users]
    counts = np.bincount(np.concatenate(fit), minlength=n_items).astype(np.float64)
    sim = item_cosine(fit, n_items)
    y = np.array([items[u][-1] for u in users])
    views = {"history as is": [items[u][:-1] for u in users],
             "without the event just before the target": [items[u][:-2] for u in users]}
    ranks = {(v, k): retrieval_ranks(knn_scorer(sim, h, k, counts), len(y), y)
             for v, h in views.items() for k in (1, 3)}
    hr = lambda r: M.hit_rate_at_k(r, K)  # noqa: E731
    ci = lambda t: {"value": t[0], "ci": [t[1], t[2]]}  # noqa: E731

    lines = ["# Amazon Arts <-> Office: is the order across services behaviour?", "",
             f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
             f"{os.cpu_count()} CPUs); {len(services):,} users with >= 4 events; wall {time.perf_counter() - t0:.0f} s.", "",
             "## Consecutive events that switch service", "",
             "| pairs | share that switch service |", "|---|---|",
             f"| body (every event but the last two) | {shares['body']:.3f} |",
             f"| body, expected under a random order of each user's events | {shares['body_random_order']:.3f} |",
             f"| the pair before the last (2nd-last target and the event before it) | {shares['pair_before_last']:.3f} |",
             f"| the last pair (the two appended targets) | {shares['last_pair']:.3f} |", "",
             f"## Item-kNN HR@10 on the last event ({len(users):,} users, {n_items:,} items, full ranking)", "",
             "| history read | last 1 item | last 3 items |", "|---|---|---|"]
    for v in views:
        lines.append(f"| {v} | {_fmt(ci(M.bootstrap_interval(hr, [ranks[(v, 1)]], args.bootstrap, args.seed)))} | "
                     f"{_fmt(ci(M.bootstrap_interval(hr, [ranks[(v, 3)]], args.bootstrap, args.seed)))} |")
    a, b = views
    lines.append("| difference (without - as is), paired | " + " | ".join(
        _fmt_diff(ci(M.bootstrap_difference(hr, [ranks[(b, k)]], [ranks[(a, k)]], n_samples=args.bootstrap, seed=args.seed)))
        for k in (1, 3)) + " |")
    md = "\n".join(lines) + "\n"
    print(md, flush=True)
    docs = REPO / "docs" / "results" / f"amazon-order{'-' + args.name if args.name else ''}.md"
    docs.write_text(md)
    print(f"[amazon_order] wrote {docs}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
