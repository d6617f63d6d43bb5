"""``userfm sweep report``: a finished sweep's figures (loss against each scaling axis), its power-law fits and
its summary, from the trials' results alone (pandas, headless matplotlib; no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from userfm.train.sweep import AXES, SweepError


# --------------------------------------------------------------------------------------- report


def _slice(df, x: str, vary: tuple[str, ...] = ("size",)):
    """The trials that vary ``x`` (and ``vary``) with every other axis fixed: the largest such group."""
    others = [a for a in AXES if a != x and a not in vary and not (x == "epochs" and a == "max_steps")]
    best = None
    for _, g in df.groupby([df[a].astype(str) for a in others], sort=False):
        if best is None or g[x].nunique() > best[x].nunique() or (
                g[x].nunique() == best[x].nunique() and len(g) > len(best)):
            best = g
    return best if best is not None else df.iloc[:0]


def _lines(ax, g, x: str, y: str, xlabel: str, ylabel: str, logx: bool = True, ci: bool = True):
    sizes = sorted(g["size"].unique(), key=lambda s: g[g["size"] == s]["params_non_embedding"].iloc[0])
    for s in sizes:
        h = g[g["size"] == s].sort_values(x)
        label = f"{s} ({int(h['params_non_embedding'].iloc[0]):,} non-emb. params)"
        if ci and {"downstream_lo", "downstream_hi"} <= set(h.columns) and y == "downstream":
            yerr = np.abs(np.stack([h[y] - h["downstream_lo"], h["downstream_hi"] - h[y]]).astype(float))
            ax.errorbar(h[x], h[y], yerr=yerr, marker="o", capsize=3, label=label)
        else:
            ax.plot(h[x], h[y], marker="o", label=label)
    if logx and len(g) and (g[x] > 0).all() and g[x].nunique() > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if g[x].nunique() < 2:
        ax.text(0.5, 0.5, f"{xlabel}: not varied in this sweep", transform=ax.transAxes, ha="center", alpha=0.6)
    if len(g):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _fit_or_none(x, y, offset=False):
    from userfm.train.scaling import fit_power_law

    try:
        return fit_power_law(x, y, offset=offset)
    except (ValueError, RuntimeError):
        return None


def _effect(g, x: str) -> list[dict]:
    """Per size: metric at the smallest and largest x of a slice, and their Spearman correlation."""
    from userfm.train.scaling import correlation

    out = []
    for s, h in g.groupby("size"):
        h = h.sort_values(x)
        if h[x].nunique() < 2:
            continue
        out.append({"size": s, "x_lo": h[x].iloc[0], "x_hi": h[x].iloc[-1], "lo": h["downstream"].iloc[0],
                    "hi": h["downstream"].iloc[-1], "spearman": correlation(h[x], h["downstream"])["spearman"],
                    "ci_half": float(np.nanmedian((h["downstream_hi"] - h["downstream_lo"]) / 2))})
    return out


def run_report(experiment: str | Path, progress=print) -> dict:
    """Fits, six figures and a Markdown summary of an experiment, into ``<experiment>/report/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from userfm.train.scaling import best_per_group, compute_frontier, correlation

    exp = Path(experiment)
    if not (exp / "results.parquet").exists():
        raise SweepError(f"{exp}: no results.parquet (run `userfm sweep --config ...` first)")
    table = pd.read_parquet(exp / "results.parquet")
    df = table[(table["status"] == "done") & table["test_loss"].notna()].copy()
    if df.empty:
        raise SweepError(f"{exp}: no finished trials in results.parquet")
    rep = exp / "report"
    rep.mkdir(exist_ok=True)
    higher = bool(df["metric"].iloc[0] not in ("rmse", "log_loss"))
    metric = f"{df['task'].iloc[0]} {df['metric'].iloc[0]}"

    # fits
    c, l = df["pf_days"].to_numpy(float), df["test_loss"].to_numpy(float)
    front = compute_frontier(c, l)
    fit_c, fit_c_off, fit_all = _fit_or_none(c[front], l[front]), _fit_or_none(c[front], l[front], True), _fit_or_none(c, l)
    base_dim = df["out_dim"].mode().iloc[0]
    n_keys, n_loss = best_per_group(df[df["out_dim"] == base_dim]["params_non_embedding"], df[df["out_dim"] == base_dim]["test_loss"])
    fit_n = _fit_or_none(np.array(n_keys, float), n_loss)
    corr_loss = correlation(df["test_loss"], df["downstream_loss"])
    corr_metric = correlation(df["test_loss"], df["downstream"])

    figs = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    g1 = _slice(df, "global_batch")
    _lines(ax, g1, "global_batch", "downstream", "global contrastive batch (users)", metric)
    ax.set_title("(1) downstream vs batch size x model size")
    figs["batch_size"] = g1
    fig.tight_layout(), fig.savefig(rep / "fig_batch_size.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g2 = _slice(df, "train_users")
    _lines(ax, g2, "train_rows", "downstream", "dataset length (training users)", metric)
    ax.set_title("(2) downstream vs dataset length x model size")
    figs["data_length"] = g2
    # L(D) on the data-length slice (every other axis fixed), per model size: the largest one with >= 3 lengths
    fit_d = None
    for _, h in sorted(g2.groupby("size"), key=lambda kv: -kv[1]["params_non_embedding"].iloc[0]):
        d_keys, d_loss = best_per_group(h["train_rows"], h["test_loss"])
        fit_d = fit_d or _fit_or_none(np.array(d_keys, float), d_loss)
    fig.tight_layout(), fig.savefig(rep / "fig_data_length.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, h in df.groupby("size"):
        ax.scatter(h["pf_days"], h["test_loss"], label=s, alpha=0.7)
    ax.plot(c[front][np.argsort(c[front])], l[front][np.argsort(c[front])], "k--", lw=1, label="compute frontier")
    if fit_c is not None:
        xs = np.geomspace(c.min(), c.max(), 100)
        ax.plot(xs, fit_c.predict(xs), "r-", label=f"fit: b = {fit_c.b:.3f} ± {fit_c.b_err:.3f}, R² = {fit_c.r2:.2f}")
    ax.set_xscale("log"), ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f")), ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("compute (PF-days)"), ax.set_ylabel(f"pretext test loss (batch {int(_cfg(exp).get('test_batch', 0))})")
    ax.set_title("(3) test loss vs compute"), ax.legend(fontsize=8), ax.grid(alpha=0.3, which="both")
    fig.tight_layout(), fig.savefig(rep / "fig_loss_vs_compute.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, h in df.groupby("size"):
        ax.scatter(h["test_loss"], h["downstream_loss"], label=s, alpha=0.7)
    if corr_loss["pearson"] is not None:
        k, b0 = np.polyfit(df["test_loss"], df["downstream_loss"], 1)
        xs = np.linspace(df["test_loss"].min(), df["test_loss"].max(), 10)
        ax.plot(xs, k * xs + b0, "k--", lw=1)
        ax.set_title(f"(4) pretext vs downstream loss: Pearson r = {corr_loss['pearson']:.2f} (p = {corr_loss['pearson_p']:.2g})", fontsize=9)
    else:
        ax.set_title("(4) pretext vs downstream loss (too few points for a correlation)", fontsize=9)
    ax.set_xlabel("pretext test loss"), ax.set_ylabel(f"downstream {df['task'].iloc[0]} loss"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(rep / "fig_pretext_vs_downstream.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g5 = _slice(df, "out_dim").copy()
    g5["dim"] = [d or _width(exp, t) for d, t in zip(g5["out_dim"], g5["trial"])]
    _lines(ax, g5, "dim", "downstream", "output embedding dimension", metric)
    ax.set_title("(5) downstream vs output dimension")
    figs["out_dim"] = g5
    fig.tight_layout(), fig.savefig(rep / "fig_out_dim.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    g6 = _slice(df, "epochs") if df["epochs"].nunique() > 1 else _slice(df, "max_steps")
    _lines(ax, g6, "epochs_seen", "downstream", "epochs (passes over the training users)", metric)
    ax.set_title("(6) downstream vs epochs per model size")
    figs["epochs"] = g6
    fig.tight_layout(), fig.savefig(rep / "fig_epochs.png", dpi=120), plt.close(fig)

    fits = {"L(C)": fit_c, "L(C)+c": fit_c_off, "L(C) all points": fit_all, "L(N)": fit_n, "L(D)": fit_d}
    info = {
        "trials": {k: int(v) for k, v in table["status"].value_counts().items()},
        "fits": {k: (v.to_dict() if v is not None else None) for k, v in fits.items()},
        "frontier": df.loc[front, ["trial", "pf_days", "test_loss"]].to_dict("records"),
        "correlation_test_loss_vs_downstream_loss": corr_loss,
        "correlation_test_loss_vs_downstream_metric": corr_metric,
        "effects": {k: _effect(g, "epochs_seen" if k == "epochs" else ("dim" if k == "out_dim" else
                                                                       ("train_rows" if k == "data_length" else "global_batch")))
                    for k, g in figs.items()},
        "size_gap_by_batch": size_gaps(g1, "global_batch"),
        "figures": sorted(p.name for p in rep.glob("fig_*.png")),
    }
    (rep / "fits.json").write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    (rep / "summary.md").write_text(format_summary(exp, table, df, info, fits, metric, higher))
    progress(f"[sweep report] {fit_c.describe('C') if fit_c else 'L(C): too few frontier points to fit'}")
    progress(f"[sweep report] wrote {len(info['figures'])} figures, summary.md, fits.json -> {rep}")
    return info


def _cfg(exp: Path) -> dict:
    p = exp / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _width(exp: Path, trial: str) -> int:
    p = exp / "trials" / trial / "pretrain" / "model" / "config.json"
    return int(json.loads(p.read_text())["d_model"]) if p.exists() else 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _fmt_fit(f, x: str, y: str = "L") -> str:
    return f.describe(x, y) if f is not None else "not fitted (too few distinct points: 3 needed, 4 with the offset)"


def format_summary(exp: Path, table, df, info: dict, fits: dict, metric: str, higher: bool) -> str:
    """The Markdown summary: every sentence is computed from the results, none is canned."""
    better = "higher" if higher else "lower"
    c = df["pf_days"]
    lines = [
        f"# Scaling sweep: {exp.name}", "",
        f"{len(df)} of {len(table)} trials finished ({', '.join(f'{k}: {v}' for k, v in info['trials'].items())}). "
        f"Compute spans {c.min():.3g} to {c.max():.3g} PF-days ({math.log10(c.max() / c.min()):.2f} decades); "
        f"test loss {df['test_loss'].min():.4f} to {df['test_loss'].max():.4f}; downstream {metric} "
        f"{df['downstream'].min():.4f} to {df['downstream'].max():.4f} ({better} is better). "
        f"Trial wall time: median {df['wall_s'].median():.0f}s, total {df['wall_s'].sum() / 60:.1f} min.", "",
        "## Power laws", "",
        f"- Test loss vs compute, on the {len(info['frontier'])} frontier points: {_fmt_fit(fits['L(C)'], 'C')}",
        f"- With an irreducible term: {_fmt_fit(fits['L(C)+c'], 'C')}",
        f"- All {len(df)} points (not only the frontier): {_fmt_fit(fits['L(C) all points'], 'C')}",
        f"- Best test loss vs non-embedding parameters: {_fmt_fit(fits['L(N)'], 'N')}",
        f"- Test loss vs training users (the data-length slice, largest model with 3 lengths): {_fmt_fit(fits['L(D)'], 'D')}",
        "", "## What the sweep shows", "",
    ]
    f = fits["L(C)"]
    if f is not None:
        verdict = ("falls with compute" if f.b - 2 * f.b_err > 0 else "does not fall significantly with compute")
        lines.append(f"- **Loss vs compute**: test loss {verdict} along the frontier (b = {f.b:.4f} ± {f.b_err:.4f}, "
                     f"R² = {f.r2:.3f}); one decade more compute multiplies it by {10 ** -f.b:.3f}.")
    front = sorted(info["frontier"], key=lambda r: r["pf_days"])
    if front:
        seq = [r["trial"].split("-")[0] for r in front]
        runs = [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]
        lines.append(f"- **Frontier**: from low to high compute the best trials are {' -> '.join(runs)} "
                     f"({', '.join(r['trial'] for r in front)}).")
    cl, cm = info["correlation_test_loss_vs_downstream_loss"], info["correlation_test_loss_vs_downstream_metric"]
    if cl["pearson"] is not None:
        lines.append(f"- **Pretext vs downstream**: over {cl['n']} trials, test loss and downstream loss correlate with "
                     f"Pearson r = {cl['pearson']:.2f} (p = {cl['pearson_p']:.2g}), Spearman {cl['spearman']:.2f}; "
                     f"test loss vs {metric}: r = {cm['pearson']:.2f} (p = {cm['pearson_p']:.2g}).")
    eff = info["effects"]
    for e in eff["batch_size"]:
        lines.append(f"- **Batch ({e['size']})**: global batch {e['x_lo']:g} -> {e['x_hi']:g} moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}; median 95% CI half-width {e['ci_half']:.4f}).")
    gaps = info["size_gap_by_batch"]
    if gaps:
        text = "- **Batch x size**: bigger-minus-smaller model " + ", ".join(f"{g:+.4f} at batch {b:g}" for b, g in gaps)
        if len(gaps) > 1:
            change = gaps[-1][1] - gaps[0][1]
            noise = max((e["ci_half"] for e in eff["batch_size"]), default=float("nan"))
            text += (f"; from the smallest to the largest batch the bigger model's advantage changes by {change:+.4f}, "
                     f"{'within' if abs(change) <= noise else 'beyond'} the 95% CI half-width {noise:.4f}")
        lines.append(text + ".")
    for e in eff["data_length"]:
        lines.append(f"- **Data length ({e['size']})**: {e['x_lo']:g} -> {e['x_hi']:g} training users moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}, Spearman {_f(e['spearman'])}).")
    fn, fd = fits["L(N)"], fits["L(D)"]
    if fn is not None and fd is not None:
        lines.append(f"- **Size vs data**: loss exponents b_N = {fn.b:.4f} ± {fn.b_err:.4f}, b_D = {fd.b:.4f} ± {fd.b_err:.4f}: "
                     f"a decade of {'parameters' if fn.b > fd.b else 'data'} buys more.")
    for e in eff["out_dim"]:
        spread = e["hi"] - e["lo"]
        lines.append(f"- **Output dimension ({e['size']})**: {e['x_lo']:g} -> {e['x_hi']:g} dims moves {metric} by {spread:+.4f}, "
                     f"{'within' if abs(spread) <= e['ci_half'] else 'beyond'} the median 95% CI half-width {e['ci_half']:.4f}.")
    for e in eff["epochs"]:
        lines.append(f"- **Epochs ({e['size']})**: {e['x_lo']:.2f} -> {e['x_hi']:.2f} epochs moves {metric} "
                     f"{e['lo']:.4f} -> {e['hi']:.4f} ({e['hi'] - e['lo']:+.4f}, Spearman {_f(e['spearman'])}).")
    lines += ["", "## Figures", ""] + [f"![{p}]({p})" for p in info["figures"]]
    lines += ["", "## Trials", "", "| trial | non-emb. params | steps | epochs | PF-days | test loss | best val loss | "
              f"{metric} | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.sort_values("pf_days").iterrows():
        lines.append(f"| {r['trial']} | {int(r['params_non_embedding']):,} | {int(r['steps'])} | {r['epochs_seen']:.2f} | "
                     f"{r['pf_days']:.3g} | {r['test_loss']:.4f} | {_f(r['best_val_loss'])} | {r['downstream']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def size_gaps(g, x: str) -> list[tuple[float, float]]:
    """``(x, downstream of the largest model - of the smallest)`` for each ``x`` of a slice run at >= 2 sizes."""
    out = []
    for v, h in g.groupby(x):
        if h["size"].nunique() >= 2:
            h = h.sort_values("params_non_embedding")
            out.append((float(v), float(h["downstream"].iloc[-1] - h["downstream"].iloc[0])))
