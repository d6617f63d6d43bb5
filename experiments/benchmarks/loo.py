"""Leave-one-out next item over ALL users, as the SASRec / HSTU tables report it, beside ``userfm evaluate``'s
user-disjoint split.

Every user with at least 3 items is scored. Models train on every user's items minus the last two, select on
the second-to-last (given the items before it), and are tested on the last (given every item before it), with
full ranking over the catalog; HR@10 and NDCG@10 with 95 % bootstrap intervals over users, seen items masked
and not, and each row's paired difference to the best yardstick (popularity, item-kNN, SASRec from scratch).
A pretrained encoder enters frozen: its embeddings of each user's last K prefixes of items[:-2] train a
retrieval head towards the item after each (items[:-2-j] -> item[-2-j], j = 1..K, ``--head-pairs K``, default
1), every user's embedding of items[:-2] early-stops it on item[-2], and its embedding of items[:-1] is scored on
item[-1]: heads fit on the same items as the yardsticks and select on the same item. (``--head-pairs 0``, the
protocol before 2026-12-08: the head trains on item[-2] itself for 90 % of users, the other 10 % early-stop it
and choose val-chosen.) The
encoder is the demo run's, so pretrained on the training users' histories (with whatever holdout_last the run
used): the table says which. ``--pretrain`` makes them here instead, with the demo's real-data recipe
(epoch budget, early stopping on the validation loss, best weights) and ``holdout_last=2``: the encoder reads
what every yardstick fits on (each training user's items minus the last two), so neither the validation item
nor the test item was ever a pretraining target, and recipes can be compared on the validation HR@10.

Encoders pretrained with ``future`` or ``next`` also score the catalog with their own objective head, zero
training on top (``<objective>/own-head``: :mod:`userfm.infer.item_scorer`), and with the popularity prior that
the log-frequency correction took out in training put back, its weight chosen on validation
(``<objective>/own-head+pop``: + alpha x log(1 + the item's training count)). With any encoder, the row
``val-chosen`` is the default recipe's (the demo pretrains several objectives and keeps one per task): the
encoders' (table, head) row with the best HR@10 on the validation item of the users no head trained on (all of
them; 10 % with ``--head-pairs 0``; :mod:`userfm.eval.val_chosen`), test never read to choose.

    python experiments/benchmarks/loo.py RUN                       # a demo run folder (dataset/, pretrain/)
    python experiments/benchmarks/loo.py runs/real/movielens/run --objectives clue future --name movielens
    python experiments/benchmarks/loo.py RUN --pretrain future next --no-sasrec   # RUN needs only dataset/
    python experiments/benchmarks/loo.py RUN --objectives --service arts  # one service's events and items alone

Writes ``OUT/loo.md`` (default: RUN/loo/) and, with ``--name``, ``docs/results/loo-<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
K = 10


def _split_users(users: list[str], val_share: float = 0.1) -> np.ndarray:
    """True for the users whose second-to-last item early-stops the heads (a salted hash: stable, spread)."""
    from userfm.eval.task_data import label_rank

    rank = label_rank(np.asarray(users, dtype=object))
    return rank < np.quantile(rank, val_share)


def _embed(run: Path, model: Path, objective: str, holdout: int, out: Path, own: bool, cache: str) -> Path:
    """The embedding table of the encoder ``objective`` with the last ``holdout`` events held out (the run's own
    when ``own`` and it made one, else made here with ``userfm embed``)."""
    from userfm.demo import embeddings_key

    have = run / embeddings_key(holdout) / objective
    if own and have.is_dir():
        return have
    from userfm.infer.embed import EmbedConfig, run_embed

    dest = out / f"emb{holdout}" / objective
    if not dest.is_dir():
        run_embed(EmbedConfig(model=str(model), data=str(run / "dataset"), out=str(dest), holdout_last=holdout,
                              minilm_cache=cache))
    return dest


def _pretrain(run: Path, objective: str, out: Path, cache: str, overrides: list[str]) -> Path:
    """``objective`` pretrained on the run's dataset with the demo's real-data recipe and ``holdout_last=2``, then
    ``overrides`` (``KEY=VALUE``); reused when ``out/pretrain/<objective>/model`` exists -> its model folder."""
    from userfm.config import from_dict, parse_overrides, to_dict
    from userfm.demo import DemoConfig, pretrain_config
    from userfm.train.pretrain import run_pretrain

    dest = out / "pretrain" / objective
    if not (dest / "model").is_dir():
        cfg = DemoConfig(data=str(run / "dataset"), format="events", minilm_cache=cache)
        pcfg = pretrain_config(cfg, objective, run / "dataset", dest, holdout_last=2)
        if overrides:
            pcfg = from_dict(type(pcfg), {**to_dict(pcfg), **parse_overrides(overrides)}, where="--pretrain-set")
        run_pretrain(pcfg)
    return dest / "model"


def service_catalog(catalog: list[str], items: dict[str, np.ndarray], service: str
                    ) -> tuple[list[str], dict[str, np.ndarray]]:
    """One service's histories (indices into the whole ``catalog``) -> (the items they hold, in catalog order;
    the histories re-indexed into that catalog). Users with no event of the service are dropped."""
    used = np.unique(np.concatenate([h for h in items.values() if len(h)] or [np.zeros(0, np.int64)]))
    if not len(used):
        raise SystemExit(f"[loo] --service {service}: no event of that service (the dataset's services are its "
                         "events' 'service' field)")
    index = np.full(len(catalog), -1, dtype=np.int64)
    index[used] = np.arange(len(used))
    return [catalog[i] for i in used], {u: index[h] for u, h in items.items() if len(h)}


def head_pairs(items: dict[str, np.ndarray], users: list[str], k: int
               ) -> list[tuple[int, np.ndarray, np.ndarray, list[np.ndarray]]]:
    """The heads' training pairs inside each user's items[:-2] (what every yardstick fits on): for j = 1..``k``,
    the prefix items[:-2-j] -> the item after it, item[-2-j], for the users whose prefix is not empty.
    Returns, per j, (holdout = 2 + j events, the users' row indices in ``users``, their targets, their prefixes)."""
    out = []
    for j in range(1, k + 1):
        h = 2 + j
        rows = np.array([i for i, u in enumerate(users) if len(items[u]) > h], dtype=np.int64)
        out.append((h, rows, np.array([items[users[i]][-h] for i in rows], dtype=np.int64),
                    [items[users[i]][:-h] for i in rows]))
    return out


POP_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # weights of the popularity prior an own head may add (chosen on val)


def popularity_alpha(score_fn, log_counts: np.ndarray, n: int, y: np.ndarray, alphas=POP_ALPHAS, k: int = K
                     ) -> tuple[float, dict[float, float]]:
    """An own head's scores plus ``alpha`` * ``log_counts`` (log(1 + each item's training count), the prior the
    log-frequency correction of sampled softmax took out in training): the ``alphas`` value with the best HR@``k``
    of the ``n`` rows' targets ``y`` (a tie keeps the smaller). ``score_fn(rows)`` -> (len(rows), n_items).
    Returns (alpha, HR@k per alpha)."""
    from userfm.eval import metrics as M
    from userfm.eval.heads import retrieval_ranks

    hr = {a: M.hit_rate_at_k(retrieval_ranks(lambda r, a=a: score_fn(r) + a * log_counts, n, y), k) for a in alphas}
    return max(alphas, key=lambda a: (hr[a], -a)), hr


def with_val_chosen(ranks: dict, choice: dict[str, float], yard: list[str]) -> tuple[dict, str]:
    """``ranks`` (row -> ranks) with the row ``val-chosen`` after the yardsticks ``yard``: the ranks of the ``choice``
    row (pretrained (table, head) -> its val HR@10) with the highest val metric (a tie keeps the first). Returns
    (the reordered rows, the chosen row's name)."""
    from userfm.eval.val_chosen import VAL_CHOSEN, val_chosen

    (picked,), _ = val_chosen({m: {"val": [v], "scores": [m]} for m, v in choice.items()}, higher_is_better=True)
    rest = {m: r for m, r in ranks.items() if m not in yard}
    return {**{m: ranks[m] for m in yard}, VAL_CHOSEN: ranks[picked], **rest}, picked


def main() -> int:
    from userfm.eval.sasrec import SELECT, SASRecConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("run", help="a demo run folder (dataset/, pretrain/<objective>/model)")
    ap.add_argument("--objectives", nargs="*", default=["clue"], help="pretrained encoders of the run to score (default: clue)")
    ap.add_argument("--no-sasrec", action="store_true", help="skip SASRec (minutes per fit on large catalogs)")
    ap.add_argument("--skip-before-test", type=int, default=0, metavar="N",
                    help="score the test item from the history without the N events just before it (yardsticks only; "
                         "the Amazon set's appended other-service target: experiments/benchmarks/amazon_order.py)")
    ap.add_argument("--service", default="", metavar="NAME",
                    help="each user's events of this service alone, in their order, over this service's items "
                         "(yardsticks only): whether a sequence model learns from one service's order when the "
                         "services' merged order is left out")
    ap.add_argument("--sasrec-select", choices=SELECT, default=SASRecConfig.select,
                    help="SASRec's early-stopping criterion on the val users' held-out items: their mean reciprocal "
                         "rank in the full ranking (default) or their cross-entropy (the default before 2026-12-07)")
    ap.add_argument("--sasrec-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SASRecConfig field (repeatable; e.g. dropout=0.5, the SASRec paper's sparse-set "
                         "rate); compare settings on the val criterion the table prints, never on test")
    ap.add_argument("--head-pairs", type=int, default=1, metavar="K",
                    help="heads on the encoders fit on each user's last K (prefix -> next item) pairs of items[:-2] and "
                         "early-stop on every user's second-to-last item (default 1); 0: they fit on the "
                         "second-to-last item of 90 %% of users and early-stop on the other 10 %% (before 2026-12-08)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    ap.add_argument("--out", default=None, help="output folder (default: RUN/loo)")
    ap.add_argument("--name", default=None, help="also write docs/results/loo-<name>.md")
    ap.add_argument("--pretrain", nargs="*", default=[], metavar="OBJECTIVE",
                    help="pretrain these encoders here (demo recipe, holdout_last=2) into OUT/pretrain and score them too")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a PretrainConfig field of the encoders --pretrain makes (repeatable; compare recipes on "
                         "the own-head val HR@10, never on test)")
    ap.add_argument("--minilm-cache", default="", help="MiniLM vector cache kept between runs (default: RUN/dataset/minilm_cache)")
    args = ap.parse_args()
    for flag, given in (("--skip-before-test", args.skip_before_test), ("--service", args.service)):
        if given and (args.objectives or args.pretrain):
            ap.error(f"{flag} applies to the yardsticks alone (the encoders' tables hold out one event of the whole "
                     "history): give --objectives with no name and no --pretrain")
    if args.head_pairs < 0:
        ap.error(f"--head-pairs must be >= 0, got {args.head_pairs}")
    if args.skip_before_test < 0:
        ap.error(f"--skip-before-test must be >= 0, got {args.skip_before_test}")
    from userfm.config import ConfigError, from_dict, parse_overrides

    try:  # checked before any data is read
        scfg = from_dict(SASRecConfig, {"seed": args.seed, "select": args.sasrec_select,
                                        **parse_overrides(args.sasrec_set)}, where="--sasrec-set")
    except ConfigError as exc:
        ap.error(str(exc))

    from userfm.eval import metrics as M
    from userfm.eval.embeddings import load_embeddings
    from userfm.eval.heads import fit_retrieval, retrieval_ranks
    from userfm.eval.render import _fmt, _fmt_diff
    from userfm.eval.task_data import item_histories
    from userfm.eval.tasks import EvalConfig, TaskConfig
    from userfm.eval.item_knn import item_cosine, knn_scorer
    from userfm.eval.sasrec import fit_sasrec, sasrec_scorer
    from userfm.eval.val_chosen import VAL_CHOSEN
    from userfm.data.dataset import read_sequences
    from userfm.infer.embed import minilm_vectors
    from userfm.infer.item_scorer import ItemScorer, has_item_scorer

    run = Path(args.run)
    data = run / "dataset"
    out = Path(args.out) if args.out else run / "loo"
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    catalog, items = item_histories(data, service=args.service)
    if args.service:
        catalog, items = service_catalog(catalog, items, args.service)
    users = sorted(u for u, h in items.items() if len(h) >= 3)
    n_items = len(catalog)
    train = [items[u][:-2] for u in users]  # what every model fits on
    hist_val, y_val = train, np.array([items[u][-2] for u in users])
    # --skip-before-test N: the test history without the N events just before the held-out one (the Amazon set's
    # appended other-service target; amazon_order.py)
    hist_test, y_test = [items[u][:-1 - args.skip_before_test] for u in users], np.array([items[u][-1] for u in users])
    print(f"[loo] {len(users):,} users with >= 3 items ({len(items) - len(users):,} left out), {n_items:,} items", flush=True)
    counts = np.bincount(np.concatenate(train), minlength=n_items).astype(np.float64)
    log_counts = np.log1p(counts)
    ranks: dict[str, dict[bool, np.ndarray]] = {}  # model -> masked? -> (n,) test ranks
    info: dict[str, str] = {}
    timings: dict[str, float] = {}

    def score(name: str, fn, hist=hist_test, y=y_test) -> None:
        ranks[name] = {m: retrieval_ranks(fn, len(y), y, hist if m else None) for m in (False, True)}

    t0 = time.perf_counter()
    score("popularity", lambda r: np.repeat(counts[None, :], len(r), axis=0))
    timings["popularity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sim = item_cosine(train, n_items)
    val_hr = {m: M.hit_rate_at_k(retrieval_ranks(knn_scorer(sim, hist_val, m, counts), len(y_val), y_val), K)
              for m in (1, 3, 10, 0)}
    best_m = max(val_hr, key=val_hr.get)
    score("item-knn", knn_scorer(sim, hist_test, best_m, counts))
    info["item-knn"] = f"last {best_m or 'all'} items (val HR@10 " + ", ".join(f"{k or 'all'}: {v:.4f}" for k, v in val_hr.items()) + ")"
    timings["item-knn"] = time.perf_counter() - t0

    if not args.no_sasrec:
        t0 = time.perf_counter()
        model, sinfo = fit_sasrec(train, hist_val, y_val, n_items, scfg, progress=lambda m: print(m, flush=True))
        score("sasrec", sasrec_scorer(model, hist_test, scfg.max_len))
        crit = sinfo[f"val_{scfg.select}"]
        info["sasrec"] = (f"best epoch {sinfo['best_epoch'] + 1} of {sinfo['epochs']} (counting from 1) by val {scfg.select}"
                          + (f" ({crit:.4f})" if crit is not None else "") + f", {sinfo['params']:,} parameters, {sinfo['train_rows']:,} training sequences"
                          + (f"; set {', '.join(args.sasrec_set)}" if args.sasrec_set else ""))
        timings["sasrec"] = time.perf_counter() - t0
        print(f"[loo] sasrec: {info['sasrec']} ({timings['sasrec']:.0f} s)", flush=True)

    ecfg = EvalConfig()
    task = TaskConfig(name="loo", table="last_event", target="item_id", type="retrieval")
    # who selects: every user's item[-2] when heads fit on earlier pairs, else the 10 % no head trains on
    is_val = _split_users(users) if not args.head_pairs else np.ones(len(users), dtype=bool)
    pairs = head_pairs(items, users, args.head_pairs)
    uid = np.asarray(users, dtype=object)
    encoders = {o: (run / "pretrain" / o / "model", True) for o in args.objectives}
    if args.pretrain:
        from userfm import runtime

        runtime.init_ray()
        encoders.update({o: (_pretrain(run, o, out, args.minilm_cache, args.pretrain_set), False) for o in args.pretrain})
    rows = None
    choice: dict[str, float] = {}  # pretrained (table, head) -> val HR@10 on the is_val users, what val-chosen picks by
    for obj, (model, own) in encoders.items():
        pre = json.loads((model.parent / "config.json").read_text())["pretrain"]
        x2 = load_embeddings(_embed(run, model, obj, 2, out, own, args.minilm_cache)).lookup(uid)
        x1 = load_embeddings(_embed(run, model, obj, 1, out, own, args.minilm_cache)).lookup(uid)
        where = "on the training users" + ("" if own else " (pretrained here)")
        if has_item_scorer(model):
            t0 = time.perf_counter()
            rows = read_sequences(data) if rows is None else rows
            scorer = ItemScorer(model, rows, catalog, minilm_vectors(str(model), str(data), args.minilm_cache, progress=lambda s: None))
            name = f"{obj}/own-head"
            score(name, lambda r, f=scorer: f.scores(x1[r]))
            val_ranks = retrieval_ranks(lambda r, f=scorer: f.scores(x2[r]), len(y_val), y_val)
            val = M.hit_rate_at_k(val_ranks, K)
            choice[name] = M.hit_rate_at_k(val_ranks[is_val], K)
            info[name] = (f"the {obj} objective's own head, no training on top (val HR@10 {val:.4f}: the second-to-last item "
                          f"from the items before it); encoder holdout_last={pre.get('holdout_last', 0)} {where}")
            timings[name] = time.perf_counter() - t0
            print(f"[loo] {name}: HR@10 {M.hit_rate_at_k(ranks[name][False], K):.4f} ({timings[name]:.0f} s)", flush=True)
            t0, pop = time.perf_counter(), f"{obj}/own-head+pop"  # the same head with the popularity prior put back
            alpha, by_alpha = popularity_alpha(lambda r, f=scorer: f.scores(x2[is_val][r]), log_counts, int(is_val.sum()),
                                               y_val[is_val])
            score(pop, lambda r, f=scorer, a=alpha: f.scores(x1[r]) + a * log_counts)
            choice[pop] = by_alpha[alpha]
            info[pop] = (f"the own head + {alpha:g} x log(1 + the item's training count), the weight the best val HR@10 of "
                         f"{', '.join(f'{a:g}' for a in POP_ALPHAS)} (" + ", ".join(f"{v:.4f}" for v in by_alpha.values())
                         + f"; its val figure is the best of {len(POP_ALPHAS)})")
            timings[pop] = time.perf_counter() - t0
            print(f"[loo] {pop}: alpha {alpha:g}, HR@10 {M.hit_rate_at_k(ranks[pop][False], K):.4f}", flush=True)
        if pairs:  # the heads' training pairs inside items[:-2]: one embedding table per prefix length
            x_fit = np.concatenate([load_embeddings(_embed(run, model, obj, h, out, own, args.minilm_cache)).lookup(uid[r])
                                    for h, r, _, _ in pairs])
            y_fit, h_fit = np.concatenate([y for _, _, y, _ in pairs]), [p for *_, hs in pairs for p in hs]
        else:
            x_fit, y_fit, h_fit = x2[~is_val], y_val[~is_val], [h for h, v in zip(train, is_val) if not v]
        for head, hidden in (("logreg", 0), ("mlp", ecfg.mlp_hidden)):
            t0 = time.perf_counter()
            fitted = fit_retrieval(x_fit, y_fit, x2[is_val], y_val[is_val], task=task, classes=catalog,
                                   cfg=ecfg, seed=args.seed, history=h_fit, hidden=hidden)
            name = f"{obj}/{head}"
            score(name, lambda r, f=fitted: f.logits(x1[r]))
            choice[name] = M.hit_rate_at_k(retrieval_ranks(lambda r, f=fitted: f.logits(x2[is_val][r]), int(is_val.sum()),
                                                           y_val[is_val]), K)
            info[name] = f"encoder pretrained with holdout_last={pre.get('holdout_last', 0)} {where}"
            timings[name] = time.perf_counter() - t0
            print(f"[loo] {name}: HR@10 {M.hit_rate_at_k(ranks[name][False], K):.4f} ({timings[name]:.0f} s)", flush=True)

    yard = [m for m in ("popularity", "item-knn", "sasrec") if m in ranks]
    if choice:  # the default recipe's row: the (table, head) best on the validation item of the users no head trained on
        ranks, picked = with_val_chosen(ranks, choice, yard)
        timings[VAL_CHOSEN] = sum(timings[m] for m in choice)
        info[VAL_CHOSEN] = (f"{picked}, the best val HR@10 on the {int(is_val.sum()):,} users whose second-to-last item "
                            "early-stops the heads (" + ", ".join(f"{m} {v:.4f}" for m, v in choice.items()) + ")")
    lines = [f"# Leave-one-out next item, all users: {run}", "",
             f"Command: `{' '.join(['python', *sys.argv])}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
             f"{os.cpu_count()} CPUs); {len(users):,} users, {n_items:,} items, full ranking; wall {time.perf_counter() - t_all:.0f} s."
             + (f" Test histories without the {args.skip_before_test} event(s) just before the test item."
                if args.skip_before_test else "")
             + (f" Each user's {args.service} events alone, ranked among the {args.service} items."
                if args.service else "")
             + ((f" Heads on the encoders fit on {sum(len(r) for _, r, _, _ in pairs):,} (prefix -> next item) pairs, each "
                 f"user's last {args.head_pairs} inside items[:-2] (--head-pairs {args.head_pairs}), and early-stop on every "
                 "user's second-to-last item." if pairs else " Heads on the encoders fit on the second-to-last item of "
                 "90 % of users and early-stop on the other 10 % (--head-pairs 0).") if choice else ""), ""]
    as_ci = lambda t: {"value": t[0], "ci": [t[1], t[2]]}  # noqa: E731
    hr = lambda r: M.hit_rate_at_k(r, K)  # noqa: E731
    nd = lambda r: M.ndcg_at_k(r, K)  # noqa: E731
    for masked in (False, True):
        best = max(yard, key=lambda m: hr(ranks[m][masked]))
        vs_sasrec = "sasrec" in ranks and best != "sasrec"  # the acceptance's other bar: at or above SASRec from scratch
        lines += [f"## Seen items {'masked' if masked else 'not masked'} (best yardstick: {best})", "",
                  "| model | HR@10 [95 % CI] | vs best yardstick |" + " vs sasrec |" * vs_sasrec + " NDCG@10 [95 % CI] | fit s |",
                  "|---|---|---|" + "---|" * vs_sasrec + "---|---|"]

        def paired(r, ref):
            return _fmt_diff(as_ci(M.bootstrap_difference(hr, [r], [ranks[ref][masked]], n_samples=args.bootstrap, seed=args.seed)))

        for name, rk in ranks.items():
            r = rk[masked]
            row_hr = M.bootstrap_interval(hr, [r], args.bootstrap, args.seed)
            row_nd = M.bootstrap_interval(nd, [r], args.bootstrap, args.seed)
            diff = "(best)" if name == best else paired(r, best)
            to_sasrec = (" - |" if name in ("sasrec", "popularity", "item-knn") else f" {paired(r, 'sasrec')} |") if vs_sasrec else ""
            lines.append(f"| {name} | {_fmt(as_ci(row_hr))} | {diff} |{to_sasrec} {_fmt(as_ci(row_nd))} | {timings.get(name, 0):.1f} |")
        lines.append("")
    lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    md = "\n".join(lines)
    (out / "loo.md").write_text(md)
    print(md, flush=True)
    if args.name:
        dest = REPO / "docs" / "results" / f"loo-{args.name}.md"
        dest.write_text(md)
        print(f"[loo] wrote {out / 'loo.md'} and {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
