"""Does the synthetic taste channel hide from words? (``SynthConfig.item_signal``)

For each ``item_signal``, generates the latent story at demo size and fits a logistic regression on each
user's history to predict ``age_bracket`` from three views of the same events:

- ``tfidf-1``: TF-IDF of word unigrams;
- ``tfidf-12``: TF-IDF of word unigrams + bigrams (what ``userfm evaluate``'s TF-IDF baseline uses);
- ``items``: TF-IDF of whole item identities (service + full text), i.e. a model that sees which items;
- ``cooc``: the mean of the user's item co-occurrence vectors (``userfm.models.cooc``, 32-d PPMI-SVD fitted on
  the training users' histories, no labels): what the encoder's ``cooc_dim`` input can carry.

C is chosen on a validation split (60/20/20 user split, seed 0); accuracy is on the test split with a
95 % bootstrap interval. The taste sets share every word and bigram by construction, so the word views
should gain (almost) nothing as ``item_signal`` grows, while the item view should gain; the Bayes oracle
(knows every latent, incl. the taste class) is printed for scale.

    python experiments/benchmarks/synth_channels.py                     # 10k users, item_signal 0 0.5 1
    python experiments/benchmarks/synth_channels.py --users 3000 --signals 0 0.5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _cooc_means(ev, users, tr, va, te):
    """Mean co-occurrence vector per user (rows of ``users``); the vectors are fitted on ``tr`` only."""
    import pyarrow as pa
    from sklearn.preprocessing import normalize

    from userfm.models.cooc import CoocConfig, fit_item_vectors, user_item_matrix
    from userfm.models.minilm import VectorCache

    hist = ev.groupby("user_id")["text"].apply(list).loc[users]
    rows = pa.table({"text": pa.array(hist.tolist(), pa.list_(pa.string()))})
    hashes, v = fit_item_vectors(rows.take(tr), CoocConfig(dim=32, max_events=10**6))
    col_hashes, x = user_item_matrix(rows, max_events=10**6)
    table = VectorCache(hashes, v).lookup(col_hashes)  # (I, 32); items without a vector: zeros
    means = normalize(x @ table)  # (U, 32): a user's mean item vector, unit length
    return means[tr], means[va], means[te]


def run(users: int, item_signal: float, seed: int, target: str = "age_bracket") -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from userfm.eval.metrics import accuracy, bootstrap_interval
    from userfm.data.synth import generate_tables
    from userfm.data.synth_model import SynthConfig

    d = generate_tables(SynthConfig(n_users=users, seed=seed, item_signal=item_signal))
    ev = d["events"].to_pandas()
    docs = ev.groupby("user_id")["text"].apply(" \n ".join)
    items = (ev.service + ":" + ev.text.str.replace(" ", "_")).groupby(ev.user_id).apply(" ".join)
    y = d["attributes"].to_pandas().set_index("user_id").loc[docs.index, target].to_numpy()
    order = np.random.default_rng(0).permutation(len(docs))
    n_tr, n_va = int(0.6 * len(docs)), int(0.2 * len(docs))
    tr, va, te = order[:n_tr], order[n_tr:n_tr + n_va], order[n_tr + n_va:]
    out = {"item_signal": item_signal, "oracle": d["ground_truth"]["attributes"][target]["oracle_accuracy"],
           "majority": d["ground_truth"]["attributes"][target]["majority_accuracy"]}
    views = {"tfidf-1": (docs, dict(ngram_range=(1, 1))), "tfidf-12": (docs, dict(ngram_range=(1, 2))),
             "items": (items, dict(token_pattern=r"\S+"))}
    for name in (*views, "cooc"):
        if name == "cooc":
            x_tr, x_va, x_te = _cooc_means(ev, docs.index, tr, va, te)
        else:
            text, kw = views[name]
            vec = TfidfVectorizer(sublinear_tf=True, min_df=2, **kw)
            x_tr = vec.fit_transform(text.iloc[tr])
            x_va, x_te = vec.transform(text.iloc[va]), vec.transform(text.iloc[te])
        fits = [LogisticRegression(C=c, max_iter=2000).fit(x_tr, y[tr]) for c in (0.1, 1.0, 10.0)]
        best = max(fits, key=lambda m: (m.predict(x_va) == y[va]).mean())
        out[name] = bootstrap_interval(accuracy, [y[te], best.predict(x_te)])  # (accuracy, lower, upper)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000, help="synthetic users")
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--signals", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="item_signal values")
    args = ap.parse_args(argv)
    print(f"age_bracket accuracy on the test users ({args.users} users, seed {args.seed}; 95 % bootstrap)")
    print(f"{'item_signal':>11} | {'tfidf-1':>21} | {'tfidf-12':>21} | {'items':>21} | {'cooc':>21} | oracle | majority | s")
    base = None
    for s in args.signals:
        t0 = time.perf_counter()
        r = run(args.users, s, args.seed)
        cells = " | ".join(f"{r[k][0]:.3f} [{r[k][1]:.3f}, {r[k][2]:.3f}]" for k in ("tfidf-1", "tfidf-12", "items", "cooc"))
        print(f"{s:>11} | {cells} | {r['oracle']:.3f} | {r['majority']:.3f} | {time.perf_counter() - t0:.0f}", flush=True)
        if base is None:
            base = r
        else:
            gains = ", ".join(f"{k} {r[k][0] - base[k][0]:+.3f}" for k in ("tfidf-1", "tfidf-12", "items", "cooc"))
            print(f"{'':>11}   gain over item_signal={base['item_signal']}: {gains}")


if __name__ == "__main__":
    main()
