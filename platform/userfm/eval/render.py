"""Evaluate's results as Markdown tables and PNG charts (``format_markdown``, ``write_charts``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from userfm.eval.tasks import PAIRED_WITH


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def head_timings(rows: list[dict]) -> list[dict]:
    """ShopperBERT's speed claim on our setup: per task with a T-Trans row, each U-MLP row's training and
    inference seconds (head only: the frozen embeddings are computed once for every task) against
    T-Trans's (featurizing the task's sequences included), seed means, and the ratios T-Trans / U-MLP.
    T-Trans's seconds are one fit at the chosen learning rate; its search over ``t_trans_lrs`` is extra
    (the row's ``t_trans.lr_search_s``)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        tt = next((r for r in rows if r["task"] == task and r["model"] == "t-trans"), None)
        for r in rows:
            if tt is None or r["task"] != task or r["head"] != "mlp":
                continue
            out.append({"task": task, "u_mlp": r["model"], "u_mlp_train_s": r["train_s"], "u_mlp_infer_s": r["infer_s"],
                        "t_trans_train_s": tt["train_s"], "t_trans_infer_s": tt["infer_s"],
                        "train_ratio": round(tt["train_s"] / max(r["train_s"], 1e-9), 1),
                        "infer_ratio": round(tt["infer_s"] / max(r["infer_s"], 1e-9), 1)})
    return out


def _fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci", [None, None])
    return f"{d['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _fmt_diff(d: dict | None) -> str:
    """A signed difference with its interval: ``+0.021 [+0.004, +0.039]``."""
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci", [None, None])
    return f"{d['value']:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "")


def _users_text(u: dict) -> str:
    if "folds" in u:
        return (f"{u['folds']}-fold cross-fit: all {u['test']} users are test users once (train ~{round(float(np.mean(u['train'])))} / "
                f"val ~{round(float(np.mean(u['val'])))} per fold)")
    return f"users train {u['train']} / val {u['val']} / test {u['test']}"


def _tuning_notes(rows: list[dict]) -> list[str]:
    """What validation chose for the tuned baselines of one task (TF-IDF C, concat C / factor, T-Trans lr)."""
    notes = []
    for r in rows:
        if "tfidf" in r:
            notes.append(f"{r['model']}: {r['tfidf']['features']:,} terms, C={r['tfidf']['C']:g}")
        if "bag_of_items" in r:
            notes.append(f"{r['model']}: {r['bag_of_items']['features']:,} items, C={r['bag_of_items']['C']:g}")
        if "sasrec" in r:
            notes.append(f"{r['model']}: best epoch {r['sasrec']['best_epoch'] + 1} of {r['sasrec']['epochs']} "
                         "(counting from 1), "
                         f"{r['sasrec']['params']:,} parameters")
        if "item_knn" in r:
            notes.append(f"{r['model']}: last {r['item_knn']['last'] or 'all'} items (val HR@10 by last: "
                         + ", ".join(f"{'all' if k == '0' else k}: {v:.4f}" for k, v in r['item_knn']['val_hr@10'].items()) + ")")
        if "concat" in r:
            c = r["concat"]
            notes.append(f"{r['model']}: {c['embedding_dim']} + {c['tfidf_features']:,} features, C={c['C']:g}, "
                         f"TF-IDF factor {c['tfidf_weight']:g}")
        if "val_chosen" in r:
            picks = [c for f in r["val_chosen"].get("per_fold", [r["val_chosen"]]) for c in f["chosen"]]
            notes.append(f"{r['model']}: " + ", ".join(f"{m} {picks.count(m)}x" for m in dict.fromkeys(picks))
                         + f" (of {len(picks)} fold x seed choices)")
        if "t_trans" in r and "lr_grid" in r["t_trans"]:
            grid = ", ".join(f"{g['lr']:g}: {g['val_loss']:.4f}" if g["val_loss"] is not None else f"{g['lr']:g}: -"
                             for g in r["t_trans"]["lr_grid"])
            notes.append(f"t-trans: lr {r['t_trans']['lr']:g} (val loss by lr: {grid}), best epochs {r['t_trans']['best_epoch']}")
    return ["Chosen on val: " + "; ".join(notes) + ".", ""] if notes else []


def format_markdown(results: dict) -> str:
    """One table per task: value [95 % CI] on test, cold and heavy users, vs the random floor, paired
    differences to TF-IDF / T-Trans (all and cold test users), timings; then what val chose."""
    level = round(100 * results["config"]["confidence"])
    folds = results["config"].get("folds", 0)
    split = f"the {folds} cross-fitted folds (every labelled user)" if folds else "the test split"
    lines = [f"# userfm evaluate: {results['dataset']['path']}", "",
             f"Seeds {results['seeds']}; values are seed means on {split} with {level} % bootstrap "
             f"intervals over test users ({results['config']['bootstrap_samples']} resamples). Cold / heavy: bottom / "
             f"top {round(100 * results['config']['quantile'])} % of test users by history length. "
             f"vs X: paired bootstrap difference (this row - X, same resampled users), on all test users and on the "
             f"cold ones; > 0 is better for higher-is-better metrics, < 0 for rmse / log_loss.", ""]
    if results["config"].get("labels"):
        lines += [f"Label budget: heads and baselines train on {results['config']['labels']:,} labelled training users "
                  f"(and the same share of val users); the encoders' pretraining saw every training user unlabelled.", ""]
    info = {t["name"]: t for t in results["tasks"]}
    for name, t in info.items():
        rows = [r for r in results["rows"] if r["task"] == name]
        c = t["config"]
        lines += [f"## {name}", "",
                  f"`{c['table']}.{c['target']}` ({c['type']}, users: {c['users']}); " + _users_text(t['users']) +
                  f"; cold <= {t['cold_max_events']:g} events "
                  f"({t['n_cold']} users), heavy >= {t['heavy_min_events']:g} ({t['n_heavy']} users)."
                  + (f" Held-out last event; full ranking over {t['n_items']:,} items"
                     f"{', seen items masked' if t.get('mask_seen') else ', seen items not masked'}." if "n_items" in t else
                     " Held-out last event (history without it)." if t.get("holdout_last") else "")
                  + (f" Every model reads the user's {t['history'].split(':', 1)[1]} events only." if t.get("history") else ""),
                  ""]
        refs = [m for m in (*PAIRED_WITH, t.get("best_yardstick")) if m and any(m in r.get("paired", {}) for r in rows)]
        refs = list(dict.fromkeys(refs))
        if t.get("best_yardstick"):
            lines += [f"Best yardstick (no pretraining; picked on test, which favours it): `{t['best_yardstick']}`.", ""]
        short = [m.split("/")[0] for m in refs]  # "tfidf/logreg" -> "tfidf", unless another head of it is a column too
        names = [n if short.count(n) == 1 else m for n, m in zip(short, refs)]
        ref_cols = "".join(f" vs {n} | vs {n}, cold |" for n in names)
        own = results["config"].get("reference") or ""  # EvalConfig.reference: each row vs that table's row of its head
        own_col = f" vs {own} (same head) |" if own else ""
        lines += [f"| model | {c['metric']} (test) | cold | heavy | vs random |{ref_cols}{own_col} train s | infer s |",
                  "|---|---|---|---|---|" + "---|---|" * len(refs) + ("---|" if own else "") + "---|---|"]
        for r in rows:
            metric_note = "" if r["metric"] == c["metric"] else f" ({r['metric']})"
            paired = r.get("paired", {})
            ref_cells = "".join(f" {_fmt_diff(paired.get(m, {}).get('test'))} | {_fmt_diff(paired.get(m, {}).get('cold'))} |"
                                for m in refs)
            if own:
                same_head = paired.get(f"{own}/{r.get('head')}", {})
                ref_cells += f" {_fmt_diff(same_head.get('test'))} |"
            lines.append(f"| {r['model']}{metric_note} | {_fmt(r['test'])} | {_fmt(r.get('cold'))} | {_fmt(r.get('heavy'))} | "
                         f"{_fmt(r.get('vs_random'))} |{ref_cells} {r.get('train_s', '-')} | {r.get('infer_s', '-')} |")
        lines.append("")
        lines += _tuning_notes(rows)
    if results.get("head_timings"):
        lines += ["## Head timings: U-MLP vs T-Trans (seconds, seed means)", "",
                  "| task | U-MLP | U-MLP train s | T-Trans train s | ratio | U-MLP infer s | T-Trans infer s | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {h['task']} | {h['u_mlp']} | {h['u_mlp_train_s']} | {h['t_trans_train_s']} | {h['train_ratio']}x | "
                  f"{h['u_mlp_infer_s']} | {h['t_trans_infer_s']} | {h['infer_ratio']}x |" for h in results["head_timings"]]
        lines.append("")
    for sk in results.get("skipped_tasks", []):
        lines.append(f"Skipped task {sk['task']}: {sk['reason']}")
    return "\n".join(lines)


def write_charts(results: dict, out: Path) -> list[str]:
    """PNG charts (metric by model with intervals; cold vs heavy), or [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for t in results["tasks"]:
        rows = [r for r in results["rows"] if r["task"] == t["name"] and r["test"]["value"] is not None]
        if not rows:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5))
        names = [r["model"] for r in rows]
        ypos = np.arange(len(rows))

        def bars(ax, key, offset=0.0, label=None):
            vals = np.array([np.nan if r.get(key) is None or r[key]["value"] is None else r[key]["value"] for r in rows])
            err = np.array([[v - (r[key]["ci"][0] if r.get(key) and r[key]["ci"][0] is not None else v),
                             (r[key]["ci"][1] if r.get(key) and r[key]["ci"][1] is not None else v) - v]
                            for v, r in zip(vals, rows)]).T
            ax.barh(ypos + offset, vals, height=0.4 if label else 0.7, xerr=np.nan_to_num(err), label=label, capsize=2)

        bars(ax1, "test")
        ax1.set_yticks(ypos, names)
        ax1.set_xlabel(f"{rows[0]['metric']} (test)")
        ax1.set_title(t["name"])
        bars(ax2, "cold", -0.2, "cold")
        bars(ax2, "heavy", 0.2, "heavy")
        ax2.set_yticks(ypos, names)
        ax2.set_xlabel(f"{rows[0]['metric']}: cold vs heavy users")
        ax2.legend()
        fig.tight_layout()
        path = out / f"chart_{t['name']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written
