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
- ``encoder <name>, last w, sequential head`` (``--encoder NAME=MODEL``): the frozen pretrained encoder
  reads a user's last w events; a softmax head over the catalog (one linear layer, bias starting at log
  popularity) is trained on (window, next item) pairs cut from the other folds' users' histories
  (``--pairs-per-user`` windows each, plus their held-out items), early-stopped on the held-out items
  of one of those folds: many pairs per user for a head over a catalog of thousands, where evaluate's
  retrieval heads get one label per user. ``random encoder <name>`` is the control: the same architecture and
  inputs (MiniLM item vectors, co-occurrence table), untrained weights, the same head.

    python experiments/benchmarks/next_item.py runs/q-ml/movielens/dataset \\
        --embedding clue=runs/q-ml/movielens/embeddings_heldout/clue \\
        --encoder clue=runs/q-ml/movielens/pretrain/clue/model

Prints one row per scorer: HR@10, its ratio to popularity and the paired difference from popularity
(95 % bootstrap over the same users), all measured in the same run.
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
    ap.add_argument("--encoder", action="append", default=[], metavar="NAME=MODEL",
                    help="an exported encoder (pretrain's model folder; pretrained with holdout_last=1) for the "
                         "sequential head; repeatable")
    ap.add_argument("--window", type=int, nargs="+", default=[5], help="events the encoder reads before each target (default 5)")
    ap.add_argument("--pairs-per-user", type=int, default=50, help="training windows cut from each user's history (default 50)")
    ap.add_argument("--max-epochs", type=int, default=30, help="sequential head: epoch cap (early stopping, patience 3)")
    ap.add_argument("--no-random-encoder", dest="random_encoder", action="store_false",
                    help="skip the untrained-encoder control of each --encoder")
    args = ap.parse_args(argv)
    if args.folds < 3 and args.encoder:
        ap.error("--encoder needs --folds >= 3 (one training fold early-stops the head)")
    if args.folds < 2:
        ap.error("--folds must be >= 2")
    if min(args.window) < 1 or args.pairs_per_user < 0 or args.max_epochs < 1:
        ap.error("--window and --max-epochs must be >= 1, --pairs-per-user >= 0")

    from scipy import sparse

    from userfm.eval import metrics as M
    from userfm.eval.embeddings import embeddings_holdout, load_embeddings
    from userfm.eval.task_data import fold_of, item_histories

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

    encoders = [spec.partition("=") for spec in args.encoder]
    for name, _, path in encoders:
        if not path:
            ap.error(f"--encoder {name!r} is not NAME=MODEL")
    windows = {}  # (encoder name, random?, w) -> (pair users, pair targets, pair vectors, query vectors)
    if encoders:
        windows = _encode_windows(args, users, hist, encoders)

    def sequential_head(key):
        pair_user, pair_y, pairs, query = windows[key]

        def score(te, tr):
            f_val = (folds[te[0]] + 1) % args.folds  # the next fold of the training users early-stops
            val, fit = tr[folds[tr] == f_val], tr[folds[tr] != f_val]
            pick = np.isin(pair_user, tr)
            xs = np.concatenate([pairs[pick], query[fit]])
            ys = np.concatenate([pair_y[pick], y[fit]])
            prior = np.asarray(with_target[fit].sum(0)).ravel() + np.asarray(x[val].sum(0)).ravel()
            return _fit_head(xs, ys, query[val], y[val], prior, n_items, args.max_epochs)(query[te])
        return score

    rows = [("popularity", popularity)]
    rows += [(f"user-kNN {name}, k={k}", user_knn(t, k)) for name, t in tables.items() for k in args.neighbours]
    rows += [(f"item-item, last {m}", item_item(m)) for m in args.last]
    rows += [(f"{'random encoder' if rnd else 'encoder'} {name}, last {w}, sequential head", sequential_head((name, rnd, w)))
             for (name, rnd, w) in windows]
    base = None
    width = max(len(name) for name, _ in rows)
    print(f"{'scorer':<{width}} {'HR@10':>7}  {'95% interval':<16} {'x popularity':>12}  {'- popularity, paired':<26}")
    for name, score in rows:
        t1 = time.perf_counter()
        hits = evaluate(score).astype(np.float64)
        lo, hi = _bootstrap(hits)
        base = hits if base is None else base
        dlo, dhi = _bootstrap(hits - base)  # the same users resampled for both: a paired interval
        print(f"{name:<{width}} {hits.mean():7.4f}  [{lo:.4f}, {hi:.4f}] {hits.mean() / base.mean():12.2f}  "
              f"{hits.mean() - base.mean():+.4f} [{dlo:+.4f}, {dhi:+.4f}]   ({time.perf_counter() - t1:.1f}s)", flush=True)


def _encode_windows(args, users: np.ndarray, hist: dict, encoders: list) -> dict:
    """Encode, per encoder (and its untrained control) and window width, the training windows of every
    user and each user's query window (the events before the held-out one). Returns {(name, random, w):
    (pair user index (P,), pair target item (P,), pair vectors (P, D), query vectors (n_users, D))}."""
    import os

    import pyarrow as pa
    import torch

    import userfm
    from userfm.data.dataset import read_sequences
    from userfm.infer.embed import event_windows, minilm_vectors
    from userfm.models.encoders import UserEncoder
    from userfm.models.features import make_batch, to_torch
    from userfm.objectives.pretext import add_vectors

    seqs = read_sequences(args.data)
    at = {u: i for i, u in enumerate(seqs.column("user_id").to_pylist())}
    seqs = seqs.take(pa.array([at[u] for u in users]))
    item_ids = seqs.column("item_id").to_pylist()
    pos = [np.flatnonzero([v is not None for v in ids]) for ids in item_ids]  # event position of each catalog item
    assert all(len(p) == len(hist[u]) for p, u in zip(pos, users))
    rng = np.random.default_rng(0)
    p_user, p_end, p_y = [], [], []
    for i, u in enumerate(users):
        cand = np.arange(1, len(hist[u]) - 1)  # targets with >= 1 event before them; the held-out last excluded
        if len(cand) > args.pairs_per_user:
            cand = np.sort(rng.choice(cand, args.pairs_per_user, replace=False))
        p_user.append(np.full(len(cand), i)), p_end.append(pos[i][cand]), p_y.append(hist[u][cand])
    p_user, p_end, p_y = (np.concatenate(a).astype(np.int64) for a in (p_user, p_end, p_y))
    q_end = np.array([p[-1] for p in pos])
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, _, path in encoders:
        model, vocabs, tok = userfm.load_encoder(path)
        vectors = None
        vdir = minilm_vectors(path, args.data, progress=lambda s: None)
        if vdir:
            from userfm.models.minilm import VectorCache

            vectors = VectorCache.load(vdir)
        models = [(False, model)]
        if args.random_encoder:
            torch.manual_seed(0)
            control = UserEncoder(model.config)
            buffers = {k for k, _ in model.named_buffers()}  # the co-occurrence table: an input, not a learned weight
            control.load_state_dict({k: v for k, v in model.state_dict().items() if k in buffers}, strict=False)
            models.append((True, control))
        for rnd, m in models:
            m.eval()
            for w in args.window:
                t0 = time.perf_counter()

                def encode(rows):
                    parts = []
                    for s in range(0, rows.num_rows, 512):
                        nb = add_vectors(make_batch(rows.slice(s, 512), vocabs, tok, max_events=w), vectors)
                        with torch.no_grad():
                            parts.append(m(to_torch(nb, "cpu")).float().numpy())
                    return np.concatenate(parts)

                pairs = encode(event_windows(seqs.take(pa.array(p_user)), p_end, w))
                query = encode(event_windows(seqs, q_end, w))
                out[(name, rnd, w)] = (p_user, p_y, pairs, query)
                print(f"[next_item] {'random ' if rnd else ''}encoder {name}, last {w}: {len(p_y):,} training windows "
                      f"+ {len(users)} queries encoded ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def _fit_head(xs, ys, x_val, y_val, prior, n_items: int, max_epochs: int, patience: int = 3, seed: int = 0):
    """Softmax head over the catalog: (D,) -> (n_items,) logits, weight 0 and bias log(1 + prior) at
    start (the popularity ranking), AdamW on cross-entropy, the epoch with the lowest validation loss
    kept. Returns a scorer (n, D) -> (n, n_items)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    head = torch.nn.Linear(xs.shape[1], n_items)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log1p(torch.as_tensor(prior, dtype=torch.float32)))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.as_tensor(xs), torch.as_tensor(ys)
    xv, yv = torch.as_tensor(x_val), torch.as_tensor(y_val)
    g = torch.Generator().manual_seed(seed)
    best, best_state, bad = float("inf"), None, 0
    for _ in range(max_epochs):
        for b in torch.randperm(len(xt), generator=g).split(256):
            loss = F.cross_entropy(head(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float(F.cross_entropy(head(xv), yv))
        if val < best:
            best, best_state, bad = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)

    def score(q):
        with torch.no_grad():
            return head(torch.as_tensor(q)).numpy()
    return score


if __name__ == "__main__":
    main()
