"""Where next-item signal lives on a dataset: popularity vs long-term profiles vs the most recent items.

Leave-one-out next item (each user's last event held out), full ranking over the catalog, k folds of
users by user-id hash (``evaluate.fold_of``), HR@10 with a 95 % bootstrap interval over users. Every
scorer sees the held-out users' histories (without the last item) and the other folds' users'
histories and held-out items:

- ``popularity``: item counts over the other folds' users (the evaluate baseline).
- ``user-kNN <table>``: the k most cosine-similar other-fold users by a user table, their items
  weighted by the similarity. ``raw history`` is the binary user x item vector itself: the
  collaborative filter with the whole long-term profile, an upper reference for any whole-history
  embedding read this way.
- ``item-item, last m``: co-occurrence (over the other folds' users) of each candidate with the
  user's m most recent items: the sequential signal a whole-history embedding averages away.

    python experiments/benchmarks/next_item.py runs/q-ml/movielens/dataset \\
        --embedding clue=runs/q-ml/movielens/embeddings_heldout/clue

Prints one row per scorer and its HR@10 ratio to popularity, measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _bootstrap(hits: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (n, len(hits)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="an ingested sequence dataset folder (userfm ingest / quality.py <run>/dataset)")
    ap.add_argument("--embedding", action="append", default=[], metavar="NAME=PATH",
                    help="a user table embedded WITHOUT each user's last event (embed --set holdout_last=1); repeatable")
    ap.add_argument("--folds", type=int, default=5, help="folds of users (default 5)")
    ap.add_argument("--neighbours", type=int, nargs="+", default=[30, 100], help="k of user-kNN (default 30 100)")
    ap.add_argument("--last", type=int, nargs="+", default=[1, 5, 20], help="m of item-item (default 1 5 20)")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error("--folds must be >= 2")

    from scipy import sparse

    from userfm import metrics as M
    from userfm.evaluate import embeddings_holdout, fold_of, item_histories, load_embeddings

    t0 = time.perf_counter()
    catalog, hist = item_histories(args.data)
    users = np.array(sorted(u for u, h in hist.items() if len(h) >= 2))
    n_items, y = len(catalog), np.array([hist[u][-1] for u in users])
    past = [hist[u][:-1] for u in users]
    x = sparse.csr_matrix((np.ones(sum(map(len, past)), np.float32),
                           (np.repeat(np.arange(len(users)), [len(h) for h in past]), np.concatenate(past))),
                          shape=(len(users), n_items))
    x.data[:] = 1.0
    with_target = (x + sparse.csr_matrix((np.ones(len(y), np.float32), (np.arange(len(y)), y)), shape=x.shape)).sign()
    folds = fold_of(users, args.folds)
    tables = {"raw history": x}
    for spec in args.embedding:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--embedding {spec!r} is not NAME=PATH")
        if (embeddings_holdout(path) or 0) < 1:
            ap.error(f"--embedding {name}: {path} was embedded with the last event in the history (embed --set holdout_last=1)")
        tables[name] = load_embeddings(path, name).lookup(users)
    print(f"[next_item] {len(users)} users, {n_items:,} items, {args.folds} folds ({time.perf_counter() - t0:.1f}s)")

    def evaluate(score) -> np.ndarray:
        hits = np.zeros(len(users), bool)
        for f in range(args.folds):
            te, tr = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
            hits[te] = M.target_rank(score(te, tr), y[te]) < 10
        return hits

    def popularity(te, tr):
        return np.broadcast_to(np.asarray(with_target[tr].sum(0)).ravel(), (len(te), n_items))

    def user_knn(table, k):
        def score(te, tr):
            e = table.toarray() if sparse.issparse(table) else np.asarray(table, np.float64)
            e = e - e[tr].mean(0)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            sim = e[te] @ e[tr].T
            top = np.argsort(-sim, 1)[:, :k]
            w = np.take_along_axis(sim, top, 1).clip(0)
            items = with_target[tr]
            s = np.stack([items[top[i]].T @ w[i] for i in range(len(te))])
            return s + 1e-6 * popularity(te, tr)  # ties broken by popularity
        return score

    def item_item(m):
        def score(te, tr):
            c = (with_target[tr].T @ with_target[tr]).toarray()
            np.fill_diagonal(c, 0)
            c /= np.sqrt(np.maximum(c.sum(0, keepdims=True), 1))  # damp popular candidates
            return np.stack([c[past[i][-m:]].sum(0) for i in te]) + 1e-6 * popularity(te, tr)
        return score

    rows = [("popularity", popularity)]
    rows += [(f"user-kNN {name}, k={k}", user_knn(t, k)) for name, t in tables.items() for k in args.neighbours]
    rows += [(f"item-item, last {m}", item_item(m)) for m in args.last]
    base = None
    print(f"{'scorer':<40} {'HR@10':>7}  {'95% interval':<16} {'x popularity':>12}")
    for name, score in rows:
        t1 = time.perf_counter()
        hits = evaluate(score)
        lo, hi = _bootstrap(hits.astype(np.float64))
        base = hits.mean() if base is None else base
        print(f"{name:<40} {hits.mean():7.4f}  [{lo:.4f}, {hi:.4f}] {hits.mean() / base:12.2f}   ({time.perf_counter() - t1:.1f}s)",
              flush=True)


if __name__ == "__main__":
    main()
