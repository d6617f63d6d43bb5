"""``userfm report RUN_DIR``: one self-contained HTML page (plus the PNGs beside it) per run.

Sections, each read from what its stage wrote into the run folder (the layout of ``userfm demo``):

- data summary: events per service, history-length histogram, quarantine counts by reason (``dataset/``);
- pretraining curves per objective: loss and val loss, contrastive in-batch top-1 (or MLM accuracies),
  throughput, learning rate (``pretrain/<objective>/metrics.jsonl``);
- the evaluation table with bootstrap intervals and the cold/heavy breakdown (``evaluate/results.json``);
- a 2-D map (t-SNE; UMAP when installed) of each objective's embeddings (``embeddings/<objective>/``)
  coloured by k-means cluster and by each attribute, with each colouring's 10-NN agreement in the
  full embedding space next to its chance level, so a reader can tell a real pattern from a pretty one;
- the k-means clusters' top keywords (TF-IDF over each cluster's event text vs all users') as ranked bars;
- embedding drift between two tables (``drift/drift.json`` or ``drift/<name>/drift.json``, ``userfm drift``);
- sweep figures (``fig_*.png`` under ``**/report/`` of the run, or ``--sweep DIR``), copied beside the page.

A missing piece turns its section into a note saying what is missing; it is never an error. Nothing
here imports ``ray``: numpy, pyarrow, scikit-learn and headless matplotlib only.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.config import to_dict
from userfm.errors import UserfmError

_NA = "n/a"


class ReportError(UserfmError, ValueError):
    """The run folder cannot be reported on; the message names the folder or option."""


@dataclass(frozen=True)
class ReportConfig:
    run: str = ""  # run folder: dataset/, pretrain/<objective>/, embeddings/<objective>/, evaluate/ (any may be missing)
    out: str | None = None  # report folder (default <run>/report); report.html and the PNGs go there
    sweeps: tuple[str, ...] = ()  # more folders searched recursively for sweep figures (fig_*.png)
    color_by: tuple[str, ...] = ()  # attribute columns to colour maps by ("" = auto: first attribute table + top service/category)
    max_colorings: int = 6  # attribute panels per map at most (auto mode)
    map_method: str = "auto"  # tsne | umap | auto (umap when importable, else tsne)
    map_users: int = 2000  # users per 2-D map at most (uniform subsample, same users for every objective)
    perplexity: float = 30.0  # t-SNE perplexity (capped at (users - 1) / 3)
    tsne_iters: int = 500  # t-SNE optimisation iterations (>= 250; 1000 is sharper and twice as slow)
    cluster_users: int = 20000  # users for k-means and keywords at most (uniform subsample)
    clusters: int = 8  # k-means clusters per embedding table
    keywords: int = 10  # keywords shown per cluster
    neighbours: int = 10  # k of the k-NN agreement printed above each map panel
    max_categories: int = 10  # colours per categorical attribute; rarer values are drawn grey as "other"
    seed: int = 0  # subsample, t-SNE / UMAP and k-means seed

    def __post_init__(self):
        if not self.run:
            raise ValueError("run: the run folder is required")
        if self.map_method not in ("auto", "tsne", "umap"):
            raise ValueError(f"map_method must be auto, tsne or umap, got {self.map_method!r}")
        for name in ("map_users", "cluster_users", "clusters", "keywords", "neighbours", "max_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tsne_iters < 250:
            raise ValueError(f"tsne_iters must be >= 250 (scikit-learn's minimum), got {self.tsne_iters}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be >= 2, got {self.clusters}")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path.name


def _img(name: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{_e(name)}" alt="{_e(alt)}">{cap}</figure>'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (callers escape text with ``_e``)."""
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(v)
    return f"{v:.{digits}g}" if (a and (a < 1e-3 or a >= 1e5)) else f"{v:,.{digits}f}"


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` by step; a step logged twice (a resumed run) keeps its last row."""
    rows: dict[int, dict] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}: line {i} is not JSON") from None
        if "step" in row:
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def mode_by_row(parents: np.ndarray, values: pa.Array, n_rows: int) -> np.ndarray:
    """The most frequent value per row (ties: smallest value), None for rows with no value.

    Args:
        parents: (M,) row index of each value; values: (M,) strings (nulls ignored).
    Returns:
        (n_rows,) object array.
    """
    out = np.full(n_rows, None, dtype=object)
    t = pa.table({"p": pa.array(np.asarray(parents, np.int64)), "v": values}).filter(pc.is_valid(values))
    if not t.num_rows:
        return out
    g = t.group_by(["p", "v"]).aggregate([([], "count_all")]).sort_by([("p", "ascending"), ("count_all", "descending"), ("v", "ascending")])
    p = g.column("p").to_numpy()
    first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    out[p[first]] = np.array(g.column("v").to_pylist(), dtype=object)[first]
    return out


def cluster_keywords(docs: list[str], labels: np.ndarray, k: int, top: int) -> list[list[tuple[str, float]]]:
    """Top keywords of each cluster: mean TF-IDF vector of the cluster's users minus that of all users.

    Each user's event text is one document (sublinear tf, l2-normalised rows); a word ranks high when the
    cluster's users use it much more than users overall, so words that every template repeats ("new",
    "size") sink while a cluster's theme ("dividend", "stocks") rises.

    Args:
        docs: (N,) one text per user; labels: (N,) cluster index in [0, k).
    Returns:
        k lists of (word, weight > 0), highest first, at most ``top`` each.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:  # words of 3+ letters used by 2+ users; English stop words out
        tv = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b", min_df=min(2, len(docs)), sublinear_tf=True)
        x = tv.fit_transform(docs)  # (N, terms) sparse
    except ValueError:  # empty vocabulary
        return [[] for _ in range(k)]
    vocab = tv.get_feature_names_out()
    overall = np.asarray(x.mean(0)).ravel()
    out = []
    for c in range(k):
        m = labels == c
        lift = (np.asarray(x[m].mean(0)).ravel() - overall) if m.any() else np.zeros_like(overall)
        idx = [i for i in np.argsort(-lift, kind="stable")[:top] if lift[i] > 0]
        out.append([(str(vocab[i]), float(lift[i])) for i in idx])
    return out


def knn_agreement(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Mean share of each point's k nearest neighbours (cosine) sharing its label, and the chance level.

    Args:
        x: (N, D) embeddings; labels: (N,) hashable labels, None = unknown (left out).
    Returns:
        (agreement, chance = sum over labels of share^2); NaN when fewer than k + 1 labelled points.
    """
    from sklearn.neighbors import NearestNeighbors

    keep = np.array([v is not None for v in labels])
    x, labels = x[keep], labels[keep]
    if len(x) <= k:
        return float("nan"), float("nan")
    _, share = np.unique(labels.astype(str), return_counts=True)
    chance = float(((share / share.sum()) ** 2).sum())
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(xn).kneighbors(xn, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean()), chance


def project_2d(x: np.ndarray, method: str, perplexity: float, seed: int, iters: int = 500) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) with UMAP (``method`` umap, or auto when installed) or t-SNE; returns the method used."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine geometry, as the losses use
    if method in ("auto", "umap"):
        try:
            import umap  # optional
        except ImportError:
            if method == "umap":
                raise ReportError("map_method=umap but the umap-learn package is not installed") from None
        else:
            return umap.UMAP(n_components=2, random_state=seed).fit_transform(xn), "UMAP"
    if len(xn) < 5:
        return np.c_[xn[:, 0], xn[:, 1] if xn.shape[1] > 1 else np.zeros(len(xn))], "raw"
    from sklearn.manifold import TSNE

    p = float(min(perplexity, (len(xn) - 1) / 3))
    return TSNE(n_components=2, perplexity=p, init="pca", learning_rate="auto", max_iter=iters,
                random_state=seed).fit_transform(xn), "t-SNE"


# --------------------------------------------------------------------------------------------------
# sections: each returns (HTML body, status: "ok" or "missing: why")
# --------------------------------------------------------------------------------------------------


def _data_section(ds: Path | None, out: Path) -> tuple[str, str]:
    from userfm.data.dataset import read_sequences, summarize

    if ds is None:
        return _missing("No dataset/ in this run (ingest did not run or did not finish): no data summary."), "missing: no dataset"
    s = summarize(ds)
    from userfm.data.dataset import load_manifest

    manifest = load_manifest(ds)
    reasons = manifest.get("quarantined_by_reason", {})
    lengths = read_sequences(ds, columns=["n_events"]).column("n_events").to_numpy()
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    svc = sorted(s["services"].items(), key=lambda kv: -kv[1])
    a1.barh([k for k, _ in svc][::-1], [v for _, v in svc][::-1], color="#4c72b0")
    for i, (_, v) in enumerate(svc[::-1]):
        a1.text(v, i, f" {v:,}", va="center", fontsize=8)
    a1.set_title("events per service")
    a1.set_xlabel("events kept")
    a1.margins(x=0.2)
    if len(lengths):
        bins = np.unique(np.round(np.logspace(0, np.log10(max(lengths.max(), 2)) + 1e-9, 30)))
        a2.hist(np.maximum(lengths, 1), bins=bins, color="#55a868")
        a2.set_xscale("log")
        a2.axvline(np.median(lengths), color="k", ls="--", lw=1, label=f"median {np.median(lengths):g}")
        a2.legend(fontsize=8)
    a2.set_title("history length (events per user)")
    a2.set_xlabel("events (log scale)")
    a2.set_ylabel("users")
    names = list(reasons) or ["(none)"]
    vals = [reasons.get(n, 0) for n in names]
    a3.barh(names[::-1], vals[::-1], color="#c44e52")
    a3.set_title(f"quarantined rows by reason ({s['rows_quarantined']:,} of {s['rows_in']:,})")
    a3.set_xlabel("rows")
    if not any(vals):
        a3.text(0.5, 0.5, "no rows quarantined", transform=a3.transAxes, ha="center", va="center", fontsize=11, color="#555")
        a3.set_xlim(0, 1)
    fig.tight_layout()
    fig_name = _save(fig, out / "data.png")

    u, h = s["users"], s["history_length"]
    facts = [
        ["events read", _num(s["rows_in"])],
        ["events kept", _num(s["rows_kept"])],
        ["events quarantined", _num(s["rows_quarantined"])],
        ["over-long texts truncated", _num(s["texts_truncated"])],
        ["users (train / val / test)", f"{u['total']:,} ({u['train']:,} / {u['val']:,} / {u['test']:,})"],
        ["users active in 2+ services", _num(s["users_in_several_services"])],
        ["services", _e(", ".join(f"{k}: {v:,}" for k, v in s["services"].items()))],
        ["label tables", _e(", ".join(s["attributes"]) or "none")],
    ]
    if h:
        facts.append(["events per user", _e(f"min {h['min']}, median {h['median']}, p90 {h['p90']}, p99 {h['p99']}, max {h['max']}; "
                                             f"{h['users_le_5']:,} users with <= 5, {h['users_ge_100']:,} with >= 100")])
    q_rows = [[_e(k), f'<td class="num" data-reason="{_e(k)}">{v:,}</td>'] for k, v in reasons.items()]
    body = (f'<div class="row"><div>{_table([], facts, "facts")}</div>'
            f'<div><h3>Quarantine by reason</h3>{_table(["reason", "rows"], q_rows)}</div></div>'
            + _img(fig_name, "events per service, history-length histogram, quarantine by reason"))
    examples = _quarantine_examples(ds)
    if examples:
        body += "<h3>First quarantined rows</h3>" + _table(["reason", "detail", "source"], examples)
    return body, "ok"


def _quarantine_examples(ds: Path, n: int = 5) -> list[list[str]]:
    import pyarrow.parquet as pq

    path = ds / "quarantine.parquet"
    if not path.is_file():
        return []
    t = pq.read_table(path, columns=["reason", "detail", "source"]).slice(0, n)
    return [[_e(r["reason"]), _e(r["detail"]), _e(Path(str(r["source"])).name)] for r in t.to_pylist()]


_ACC_KEYS = ("/top1", "mlm/acc/")


def _pretrain_section(run: Path, objectives: list[str], out: Path) -> tuple[str, str, list[str]]:
    plt = _plt()
    parts, figs, final_rows = [], [], []
    for obj in objectives:
        path = run / "pretrain" / obj / "metrics.jsonl"
        if not path.is_file():
            parts.append(f"<h3>{_e(obj)}</h3>" + _missing(f"no pretrain/{obj}/metrics.jsonl"))
            continue
        rows = read_metrics(path)
        if not rows:
            parts.append(f"<h3>{_e(obj)}</h3>" + _missing(f"pretrain/{obj}/metrics.jsonl has no rows"))
            continue

        def series(key):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else None

        keys = sorted({k for r in rows for k in r})
        acc_keys = [k for k in keys if any(a in k for a in _ACC_KEYS)]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
        panels = [
            (axes[0], ["loss", "val_loss"], "loss", "loss (train) and val loss (held-out users)"),
            (axes[1], acc_keys, "accuracy", "contrastive in-batch top-1" if any("/top1" in k for k in acc_keys) else "MLM accuracy"),
            (axes[2], ["samples_per_s"], "samples / s", "throughput"),
            (axes[3], ["lr"], "learning rate", "learning rate"),
        ]
        for ax, ks, ylabel, title in panels:
            drawn = False
            for k in ks:
                s = series(k)
                if s is not None:
                    ax.plot(*s, marker="o" if len(s[0]) < 12 else None, ms=3, label=k)
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="#777")
            elif len(ks) > 1:
                ax.legend(fontsize=7)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fig.suptitle(f"pretraining: {obj}", fontsize=11)
        fig.tight_layout()
        name = _save(fig, out / f"pretrain_{_slug(obj)}.png")
        figs.append(name)
        last = rows[-1]
        vals = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
        final_rows.append([_e(obj), _num(last["step"]), _num(last.get("loss")), _num(vals[-1] if vals else None),
                           _e(", ".join(f"{k} {_num(last[k])}" for k in acc_keys if k in last) or "-"),
                           _num(last.get("samples_per_s"), 1), _num(last.get("pf_days")), _num(last.get("mfu"))])
        parts.append(_img(name, f"pretraining curves of {obj}"))
    if not final_rows and not parts:
        return _missing("No pretrain/<objective>/metrics.jsonl in this run: no pretraining curves."), "missing: no metrics", figs
    table = _table(["objective", "last step", "loss", "val loss", "accuracy (last)", "samples/s", "PF-days", "MFU"], final_rows) if final_rows else ""
    return table + "".join(parts), "ok" if final_rows else "missing: no metrics", figs


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s) or "_"


def _cell(row: dict, key: str) -> str:
    """A result cell: value [lo, hi] with the exact numbers in data- attributes (tests and scripts read them)."""
    d = row.get(key)
    if not d or d.get("value") is None:
        return '<td class="num">-</td>'
    lo, hi = (d.get("ci") or [None, None])[:2]
    ci = f' <span class="ci">[{lo:.3f}, {hi:.3f}]</span>' if lo is not None and hi is not None else ""
    attrs = f'data-task="{_e(row["task"])}" data-model="{_e(row["model"])}" data-key="{_e(key)}" data-value="{d["value"]!r}"'
    if lo is not None and hi is not None:
        attrs += f' data-lo="{lo!r}" data-hi="{hi!r}"'
    return f'<td class="num" {attrs}>{d["value"]:.3f}{ci}</td>'


def _eval_section(results_path: Path | None, out: Path) -> tuple[str, str, list[str]]:
    from userfm.eval.render import write_charts

    if results_path is None:
        return _missing("No evaluate/results.json in this run (no evaluation, e.g. logs without label tables)."), "missing: no results.json", []
    results = json.loads(results_path.read_text())
    rows, tasks = results.get("rows", []), results.get("tasks", [])
    if not rows:
        return _missing(f"{results_path} has no result rows."), "missing: no rows", []
    cfg = results.get("config", {})
    level = round(100 * cfg.get("confidence", 0.95))
    charts = write_charts(results, out)
    models = list(dict.fromkeys(r["model"] for r in rows))
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["model"]): r for r in rows}
    head_rows = []
    for t in task_names:
        row_t = [r for r in rows if r["task"] == t]
        hib = row_t[0].get("higher_is_better", True)
        vals = [r["test"]["value"] for r in row_t if r["model"] != "oracle" and r["test"]["value"] is not None]
        best = (max(vals) if hib else min(vals)) if vals else None
        cells = [_e(t), _e(f"{row_t[0]['metric']} ({'higher' if hib else 'lower'} is better)")]
        for m in models:
            r = by.get((t, m))
            if r is None or r["test"]["value"] is None:
                cells.append('<td class="num">-</td>')
                continue
            c = _cell(r, "test")
            cells.append(c.replace('class="num"', 'class="num best"') if r["test"]["value"] == best and m != "oracle" else c)
        head_rows.append(cells)
    body = (f"<p>Test-split metric averaged over seeds {_e(results.get('seeds', ''))}, with {level} % bootstrap intervals over "
            f"test users ({_e(cfg.get('bootstrap_samples', '?'))} resamples); bold: best non-oracle model. Cold / heavy: bottom / top "
            f"{round(100 * cfg.get('quantile', 0.25))} % of test users by history length.</p>"
            + _table(["task", "metric"] + [_e(m) for m in models], head_rows, "wide"))
    info = {t["name"]: t for t in tasks}
    charts_set = set(charts)
    for t in task_names:
        ti = info.get(t, {})
        c = ti.get("config", {})
        desc = ""
        if ti:
            desc = (f"<p><code>{_e(c.get('table'))}.{_e(c.get('target'))}</code> ({_e(c.get('type'))}, users: {_e(c.get('users'))}); "
                    f"users train {_e(ti['users']['train'])} / val {_e(ti['users']['val'])} / test {_e(ti['users']['test'])}; "
                    f"cold &lt;= {_e(format(ti['cold_max_events'], 'g'))} events ({_e(ti['n_cold'])} users), "
                    f"heavy &gt;= {_e(format(ti['heavy_min_events'], 'g'))} ({_e(ti['n_heavy'])} users).</p>")
        trs = [[_e(r["model"] + ("" if r["metric"] == c.get("metric", r["metric"]) else f" ({r['metric']})")),
                _cell(r, "test"), _cell(r, "cold"), _cell(r, "heavy"), _cell(r, "vs_random"),
                f'<td class="num">{_e(r.get("train_s", "-"))}</td>', f'<td class="num">{_e(r.get("infer_s", "-"))}</td>']
               for r in rows if r["task"] == t]
        metric = rows[[r["task"] for r in rows].index(t)]["metric"]
        chart = f"chart_{t}.png"
        body += (f'<h3 id="task-{_e(_slug(t))}">{_e(t)}</h3>{desc}'
                 + _table(["model", f"{_e(metric)} (test)", "cold users", "heavy users", "vs random (paired)", "train s", "infer s"], trs)
                 + (f'<div class="chart">{_img(chart, f"{t}: metric by model with intervals; cold vs heavy users")}</div>'
                    if chart in charts_set else ""))
    return body, "ok", charts


# ---- maps and clusters


@dataclass(eq=False)  # compared by identity (labels are arrays)
class _Coloring:
    name: str
    labels: np.ndarray  # (N,) object: str, or None when unknown (categorical); float (continuous)
    continuous: bool


def _user_colorings(ds: Path | None, ids: np.ndarray, cfg: ReportConfig) -> tuple[list[_Coloring], list[str]]:
    """Colourings for the users ``ids`` (N,): attribute columns, the user's top service and top category."""
    from userfm.data.dataset import load_manifest, read_attributes, read_sequences

    if ds is None:
        return [], ["no dataset: maps are coloured by cluster only"]
    notes = []
    manifest = load_manifest(ds)
    candidates: list[_Coloring] = []
    pos = {u: i for i, u in enumerate(ids)}
    tables = [a["name"] for a in manifest.get("attributes", [])]
    for ti, tname in enumerate(tables):
        t = read_attributes(ds, tname)
        rows = np.array([pos.get(u, -1) for u in t.column("user_id").to_pylist()])
        hit = rows >= 0
        for col in t.column_names:
            if col in ("user_id", "split"):
                continue
            if cfg.color_by and col not in cfg.color_by and f"{tname}.{col}" not in cfg.color_by:
                continue
            if not cfg.color_by and ti > 0:  # auto: the first table only (later ones are mostly future-window labels)
                continue
            arr = t.column(col)
            typ = arr.type
            vals = arr.to_pylist()
            n_distinct = len({v for v in vals if v is not None})
            numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
            if numeric and n_distinct > cfg.max_categories:
                lab = np.full(len(ids), np.nan)
                lab[rows[hit]] = np.array([np.nan if v is None else float(v) for v, h in zip(vals, hit) if h])
                candidates.append(_Coloring(col, lab, True))
            elif n_distinct < 2:
                notes.append(f"{col}: one value only, not drawn")
            elif n_distinct > 50 and not cfg.color_by:
                notes.append(f"{col}: {n_distinct} distinct values, not drawn (name it in color_by to draw it)")
            else:
                lab = np.full(len(ids), None, dtype=object)
                lab[rows[hit]] = np.array([None if v is None else str(v) for v, h in zip(vals, hit) if h], dtype=object)
                candidates.append(_Coloring(col, lab, False))
    seqs = read_sequences(ds, columns=["user_id", "service", "category"])
    rows = np.array([pos.get(u, -1) for u in seqs.column("user_id").to_pylist()])
    hit = np.flatnonzero(rows >= 0)
    seqs = seqs.take(pa.array(hit))
    derived = []
    if len(manifest.get("services", {})) > 1:
        svc = seqs.column("service").combine_chunks()
        lab = np.full(len(ids), None, dtype=object)
        lab[rows[hit]] = mode_by_row(pc.list_parent_indices(svc).to_numpy(), pc.list_flatten(svc), seqs.num_rows)
        derived.append(_Coloring("top service", lab, False))
    cat = seqs.column("category").combine_chunks()
    event_user = pc.list_parent_indices(cat).to_numpy()
    paths = pc.list_flatten(cat)  # one category path (root first) per event
    for level in range(3):  # the shallowest level that tells users apart (MovieLens: level 1 = genre, under "Movie")
        at = pc.list_slice(paths, level, level + 1)
        top = mode_by_row(event_user[pc.list_parent_indices(at).to_numpy()], pc.list_flatten(at), seqs.num_rows)
        if len({v for v in top if v is not None}) >= 2:
            lab = np.full(len(ids), None, dtype=object)
            lab[rows[hit]] = top
            derived.append(_Coloring(f"top category (level {level + 1})", lab, False))
            break
    kept = []
    for c in candidates + derived:  # a colouring where one value covers 95 %+ of users shows nothing
        known = [v for v in c.labels if v is not None] if not c.continuous else []
        if known and np.unique(np.array(known, dtype=str), return_counts=True)[1].max() > 0.95 * len(known):
            notes.append(f"{c.name}: one value covers over 95 % of users, not drawn")
        else:
            kept.append(c)
    candidates, derived = [c for c in candidates if c in kept], [c for c in derived if c in kept]
    if cfg.color_by:
        wanted = [c for c in candidates + derived if c.name in cfg.color_by or any(w.endswith("." + c.name) for w in cfg.color_by)]
        known = {c.name for c in candidates + derived}
        unknown = [w for w in cfg.color_by if w.split(".")[-1] not in known]
        if unknown:
            raise ReportError(f"color_by: no attribute column {unknown}; available: {sorted(known)}")
        return wanted, notes
    out = (candidates[: max(0, cfg.max_colorings - len(derived))] + derived)[: cfg.max_colorings]
    dropped = [c.name for c in candidates + derived if c not in out]
    if dropped:
        notes.append(f"more attributes than max_colorings={cfg.max_colorings}; not drawn: {', '.join(dropped)}")
    return out, notes


def _categorical(labels: np.ndarray, max_categories: int) -> tuple[np.ndarray, list[str]]:
    """(N,) labels -> (N,) codes into the returned names: the most common values, then "other", then n/a."""
    keys, counts = np.unique(np.array([_NA if v is None else v for v in labels], dtype=object).astype(str), return_counts=True)
    numeric = all(k.isdigit() for k in keys)  # cluster ids: keep their order
    order = [k for k, _ in sorted(zip(keys, counts), key=lambda kc: (int(kc[0]),) if numeric else (-kc[1], kc[0])) if k != _NA]
    names = order[:max_categories]
    tail = order[max_categories:]
    names += (["other"] if tail else []) + ([_NA] if _NA in keys else [])
    idx = {n: i for i, n in enumerate(names)}
    other = idx.get("other")
    codes = np.array([idx[_NA] if v is None else idx.get(str(v), other) for v in labels])
    return codes, names


def _scatter(ax, xy, col: _Coloring, max_categories: int, title: str):
    plt = _plt()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if col.continuous:
        v = col.labels.astype(float)
        m = np.isfinite(v)
        ax.scatter(xy[~m, 0], xy[~m, 1], s=4, c="#dddddd", lw=0)
        sc = ax.scatter(xy[m, 0], xy[m, 1], s=5, c=v[m], cmap="viridis", lw=0, alpha=0.8)
        plt.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        return
    codes, names = _categorical(col.labels, max_categories)
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    for i, n in enumerate(names):
        m = codes == i
        colour = "#bbbbbb" if n in ("other", _NA) else palette[i % len(palette)]
        ax.scatter(xy[m, 0], xy[m, 1], s=5, color=colour, lw=0, alpha=0.75, label=f"{n} ({m.sum()})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3 if len(names) > 4 else 2, fontsize=6.5,
              markerscale=2.5, frameon=False, handletextpad=0.2, columnspacing=0.8)


def _cluster_summary(labels: np.ndarray, k: int, colorings: list[_Coloring], n_events: np.ndarray | None) -> list[list[str]]:
    """Per cluster: users, median history length, and each categorical attribute's most over-represented value."""
    rows = []
    for c in range(k):
        m = labels == c
        cells = [f"{c}", f"{m.sum():,} ({100 * m.mean():.0f} %)",
                 "-" if n_events is None else f"{np.median(n_events[m]):g}" if m.any() else "-"]
        notes = []
        for col in colorings:
            if col.continuous or not m.any():
                continue
            known = np.array([v is not None for v in col.labels])
            if not (known & m).any():
                continue
            vals, counts = np.unique(col.labels[known & m].astype(str), return_counts=True)
            allv, allc = np.unique(col.labels[known].astype(str), return_counts=True)
            overall = dict(zip(allv, allc / allc.sum()))
            share = counts / counts.sum()
            lift = np.array([s / overall[v] for v, s in zip(vals, share)])
            j = int(np.argmax(lift * (counts >= max(3, 0.05 * m.sum()))))  # most over-represented, among values of 5 %+ of the cluster
            notes.append(f"{col.name} = {vals[j]}: {100 * share[j]:.0f} % (vs {100 * overall[vals[j]]:.0f} %)")
        cells.append(_e("; ".join(notes) or "-"))
        rows.append([_e(x) if i < 3 else x for i, x in enumerate(cells)])
    return rows


def _maps_section(run: Path, ds: Path | None, objectives: list[str], out: Path, cfg: ReportConfig, progress) -> tuple[str, str, str, str, list[str]]:
    """The 2-D maps and the clusters sections (they share embeddings, subsample and k-means)."""
    from sklearn.cluster import KMeans

    from userfm.infer.embed import read_embeddings

    tables = [(o, run / "embeddings" / o) for o in objectives if (run / "embeddings" / o).exists()]
    if not tables:
        msg = "No embeddings/<objective>/ tables in this run: no map and no clusters."
        return _missing(msg), "missing: no embeddings", _missing(msg), "missing: no embeddings", []
    texts = None
    n_events_of: dict[str, int] = {}
    if ds is not None:
        from userfm.data.dataset import read_sequences
        from userfm.eval.baselines import user_texts

        texts = user_texts(ds)
        t = read_sequences(ds, columns=["user_id", "n_events"])
        n_events_of = dict(zip(t.column("user_id").to_pylist(), t.column("n_events").to_pylist()))
    map_parts, cl_parts, figs, notes_all = [], [], [], []
    for obj, path in tables:
        ids, x = read_embeddings(path)
        ids = np.array(ids, dtype=object)
        if len(ids) < max(cfg.clusters, 5):
            map_parts.append(f"<h3>{_e(obj)}</h3>" + _missing(f"{len(ids)} users embedded: too few for a map"))
            cl_parts.append(f"<h3>{_e(obj)}</h3>" + _missing(f"{len(ids)} users embedded: too few for {cfg.clusters} clusters"))
            continue
        # one permutation by sorted user id: the same users appear on every objective's map
        order = np.argsort(ids, kind="stable")
        perm = order[np.random.default_rng(cfg.seed).permutation(len(ids))]
        sub = perm[: cfg.cluster_users]
        ids_s, x_s = ids[sub], x[sub]
        xn = x_s / np.maximum(np.linalg.norm(x_s, axis=1, keepdims=True), 1e-12)
        progress(f"[report] {obj}: k-means ({cfg.clusters} clusters) on {len(sub):,} users")
        km = KMeans(n_clusters=cfg.clusters, n_init=4, random_state=cfg.seed).fit(xn)
        labels = km.labels_
        colorings, notes = _user_colorings(ds, ids_s, cfg)
        if obj == tables[0][0]:
            notes_all += notes
        nm = min(cfg.map_users, len(sub))
        progress(f"[report] {obj}: 2-D map of {nm:,} users ({cfg.map_method})")
        t0 = time.perf_counter()
        xy, method = project_2d(x_s[:nm], cfg.map_method, cfg.perplexity, cfg.seed, cfg.tsne_iters)
        dt = time.perf_counter() - t0
        panels = [_Coloring("k-means cluster", labels[:nm].astype(str).astype(object), False)] + [
            _Coloring(c.name, c.labels[:nm], c.continuous) for c in colorings]
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        plt = _plt()
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.6 * nrows), squeeze=False)
        agreement_rows = []
        for ax, col in zip(axes.flat, panels):
            title = col.name
            if not col.continuous:
                agree, chance = knn_agreement(x_s[:nm], col.labels, cfg.neighbours)
                if math.isfinite(agree):
                    title += f"\n{cfg.neighbours}-NN agreement {agree:.2f} (chance {chance:.2f})"
                    agreement_rows.append([_e(col.name), f'<td class="num">{agree:.3f}</td>', f'<td class="num">{chance:.3f}</td>',
                                           f'<td class="num">{agree / chance if chance else float("nan"):.2f}</td>'])
            _scatter(ax, xy, col, cfg.max_categories if col.name != "k-means cluster" else 20, title)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{obj}: {method} map of {nm:,} users", fontsize=11)
        fig.tight_layout()
        name = _save(fig, out / f"map_{_slug(obj)}.png")
        figs.append(name)
        map_parts.append(
            f"<h3>{_e(obj)}</h3>"
            + _table(["coloured by", f"{cfg.neighbours}-NN agreement", "chance", "ratio"], agreement_rows)
            + _img(name, f"{method} map of {obj} embeddings", _e(f"{method} of L2-normalised embeddings ({x.shape[1]}-d), "
                                                                 f"{nm:,} of {len(ids):,} users, {dt:.1f}s. Agreement: share of each user's "
                                                                 f"{cfg.neighbours} nearest neighbours (cosine, full dimension) with the same value.")))
        # clusters: keywords from the users' event texts
        ne = np.array([n_events_of.get(u, 0) for u in ids_s]) if n_events_of else None
        summary = _table(["cluster", "users", "median events", "most over-represented attribute values"],
                         _cluster_summary(labels, cfg.clusters, colorings, ne))
        if texts is None:
            cl_parts.append(f"<h3>{_e(obj)}</h3>" + summary + _missing("no dataset: no event text for keywords"))
            continue
        kw = cluster_keywords([texts.get(u, "") for u in ids_s], labels, cfg.clusters, cfg.keywords)
        ncols = 4
        nrows = math.ceil(cfg.clusters / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 0.28 * cfg.keywords * nrows + 1.2 * nrows), squeeze=False)
        palette = plt.get_cmap("tab10" if cfg.clusters <= 10 else "tab20").colors
        for c, ax in enumerate(axes.flat):
            if c >= cfg.clusters:
                ax.axis("off")
                continue
            words = kw[c][::-1]
            ax.barh([w for w, _ in words], [v for _, v in words], color=palette[c % len(palette)])
            ax.set_title(f"cluster {c} ({(labels == c).sum():,} users)", fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.xaxis.set_major_locator(plt.MaxNLocator(3))
            if not words:
                ax.text(0.5, 0.5, "no words", transform=ax.transAxes, ha="center", va="center", color="#777")
        fig.suptitle(f"{obj}: top keywords per k-means cluster (mean TF-IDF in cluster minus overall)", fontsize=11)
        fig.tight_layout()
        kname = _save(fig, out / f"clusters_{_slug(obj)}.png")
        figs.append(kname)
        kw_rows = [[f"{c}", _e(", ".join(w for w, _ in kw[c]) or "-")] for c in range(cfg.clusters)]
        cl_parts.append(f"<h3>{_e(obj)}</h3>" + summary + _img(kname, f"top keywords per cluster of {obj}")
                        + "<details><summary>keywords as text</summary>" + _table(["cluster", "keywords"], kw_rows) + "</details>")
    note = "".join(f'<p class="note">{_e(n)}</p>' for n in notes_all)
    intro = (f"<p>k-means (k = {cfg.clusters}) on L2-normalised embeddings (at most {cfg.cluster_users:,} users); "
             "keywords: the words whose mean TF-IDF weight over the cluster's users (one document per user's event text) "
             "exceeds the mean over all users the most (words of 3+ letters used by 2+ users, English stop words removed).</p>")
    return (note + "".join(map_parts), "ok" if figs else "missing: too few users",
            intro + "".join(cl_parts), "ok" if figs else "missing: too few users", figs)


def _sweep_section(run: Path, out: Path, sweeps: tuple[str, ...]) -> tuple[str, str, list[str]]:
    found: list[tuple[Path, Path]] = []  # (figure, root it was found under)
    for p in sorted(run.glob("**/report/fig_*.png")):
        if out.resolve() not in p.resolve().parents:
            found.append((p, run))
    for s in sweeps:
        root = Path(s)
        if not root.exists():
            raise ReportError(f"--sweep {s}: no such folder")
        found += [(p, root) for p in sorted(root.glob("**/fig_*.png")) if (p, root) not in found]
    if not found:
        return _missing("No sweep figures (fig_*.png under <run>/**/report/ or a --sweep folder)."), "missing: no sweep figures", []
    dest = out / "sweeps"
    dest.mkdir(exist_ok=True)
    parts, figs = [], []
    seen: set[str] = set()
    for folder, root in dict.fromkeys((p.parent, r) for p, r in found):  # a sweep report's summary.md, if any
        if (folder / "summary.md").is_file():
            name = _slug("__".join(folder.relative_to(root).parts + ("summary.md",)))
            shutil.copyfile(folder / "summary.md", dest / name)
            parts.append(f'<p><a href="sweeps/{_e(name)}">{_e(root.name)}/{_e(folder.relative_to(root).as_posix())}/summary.md</a></p>')
    for p, root in found:
        rel = p.relative_to(root)
        name = _slug("__".join(rel.parts))
        if name in seen:
            continue
        seen.add(name)
        shutil.copyfile(p, dest / name)
        figs.append(f"sweeps/{name}")
        parts.append(_img(f"sweeps/{name}", str(rel), _e(f"{root.name}/{rel.as_posix()}")))
    return "<p>Sweep figures, copied beside this page.</p>" + "".join(parts), "ok", figs


def _drift_section(run: Path) -> str | None:
    """``userfm drift --out <run>/drift[/NAME]`` results, one block per drift.json; None when the run has none
    (drift is an optional comparison, so no "missing" note)."""
    found = sorted(run.glob("drift/drift.json")) + sorted(run.glob("drift/*/drift.json"))
    if not found:
        return None
    parts = []
    for path in found:
        r = json.loads(path.read_text())
        u, rot, ov = r["users"], r["rotation"], r["overlap"]
        stats = ("mean", "p05", "median", "p95", "min")
        rows = [["per-user cosine, aligned (orthogonal Procrustes)"] + [f'<td class="num">{_num(r["cosine"].get(k), 4)}</td>' for k in stats]]
        if r.get("cosine_raw"):
            rows.append(["per-user cosine, as is"] + [f'<td class="num">{_num(r["cosine_raw"].get(k), 4)}</td>' for k in stats])
        rows.append([f"neighbour overlap@{_e(ov['k'])} ({u['overlap_sampled']:,} users)"]
                    + [f'<td class="num">{_num(ov.get(k), 4)}</td>' for k in stats])
        heads = [[_e(h["head"]), _e(h["task"]), _e(h["metric"])]
                 + [f'<td class="num">{_num(h["values"].get(k), 4)}</td>' for k in ("old", "raw", "aligned")]
                 + [f'<td class="num">{_num(h["drop"].get("raw"), 4)}</td>', f'<td class="num">{_num(h["agreement"].get("raw"), 3)}</td>']
                 for h in r.get("heads", []) if "values" in h]
        verdict = ("<p><b>Over threshold</b>: " + _e("; ".join(r["failures"])) + "</p>") if r.get("failures") else \
            '<p class="note">Within every configured threshold.</p>'
        parts.append(
            f"<h3>{_e(r['old'])} &rarr; {_e(r['new'])}</h3>"
            f"<p>{u['common']:,} users in both tables ({u['only_old']:,} only old, {u['only_new']:,} only new); width "
            f"{rot['dim_old']} &rarr; {rot['dim_new']}; Procrustes scale {_num(rot['scale'], 4)}.</p>"
            + _table(["measure"] + list(stats), rows)
            + (_table(["head", "task", "metric", "old table", "new, as is", "new, aligned", "drop (as is)", "same prediction"], heads)
               if heads else "")
            + verdict)
    return "".join(parts)


def _run_section(run: Path) -> str:
    path = run / "demo_summary.json"
    if not path.is_file():
        return _missing("No demo_summary.json (not written by userfm demo): stage timings unknown.")
    s = json.loads(path.read_text())
    conf = ", ".join(f"{k}={v}" for k, v in s.get("config", {}).items())
    rows = [[_e(k), f'<td class="num">{float(v):.1f}</td>'] for k, v in s.get("timings_s", {}).items()]
    total = sum(float(v) for v in s.get("timings_s", {}).values())
    return (f"<p><b>demo config</b>: <code>{_e(conf)}</code></p>"
            + _table(["stage", "seconds"], rows + [["<b>total</b>", f'<td class="num"><b>{total:.1f}</b></td>']]))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:16px 28px 48px}
h1{font-size:24px;margin:12px 0 4px}h2{font-size:19px;margin:30px 0 8px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
nav{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px 12px;margin:12px 0}
nav a{margin-right:14px;text-decoration:none;color:#0b5cad}nav .st{color:#888;font-size:12px;margin:0 14px 0 -10px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f3f7}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.best{font-weight:700}
.ci{color:#777;font-size:11px}table.wide td.num .ci{display:block}
figure{margin:8px 0 16px}figure img{max-width:100%;border:1px solid #e6e6e6;background:#fff}
figcaption{color:#555;font-size:12px}
.missing{background:#fff6e0;border-left:4px solid #e0a800;padding:6px 10px}.note{color:#666;font-size:12px}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.row>div{min-width:0}.chart img{max-width:820px}
td{white-space:nowrap}td:last-child{white-space:normal}code{background:#eef;padding:0 3px;border-radius:3px}
"""


def run_report(cfg: ReportConfig, progress: Callable[[str], None] = print) -> dict:
    """Write ``<out>/report.html`` and its PNGs for the run folder ``cfg.run``.

    Returns:
        {"html": path, "figures": [PNG names relative to out], "sections": {id: "ok" | "missing: why"}}.
    """
    from userfm.data.dataset import DatasetError, load_manifest

    run = Path(cfg.run)
    if not run.is_dir():
        raise ReportError(f"run folder {run}: no such folder")
    out = Path(cfg.out) if cfg.out else run / "report"
    ds: Path | None = run / "dataset"
    try:
        load_manifest(ds)
    except DatasetError:
        ds = None
    names = {p.parent.name for p in (run / "pretrain").glob("*/metrics.jsonl")} | {p.name for p in (run / "embeddings").glob("*") if p.is_dir()}
    objectives = sorted(names)
    results = run / "evaluate" / "results.json"
    results_path = results if results.is_file() else None
    sweep_figs = [p for p in run.glob("**/report/fig_*.png") if out.resolve() not in p.resolve().parents]
    has_drift = any(run.glob("drift/drift.json")) or any(run.glob("drift/*/drift.json"))
    if ds is None and not objectives and results_path is None and not sweep_figs and not cfg.sweeps and not has_drift:
        raise ReportError(f"{run}: not a run folder (no dataset/, pretrain/<objective>/, embeddings/<objective>/, "
                          "evaluate/results.json, drift/drift.json or sweep figures)")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + [out / "report.html"]:  # stale figures of an earlier report
        old.unlink(missing_ok=True)
    shutil.rmtree(out / "sweeps", ignore_errors=True)

    t0 = time.perf_counter()
    sections, status, figures = [], {}, []
    sections.append(("run", "Run", _run_section(run)))
    status["run"] = "ok" if (run / "demo_summary.json").is_file() else "missing: no demo_summary.json"
    progress("[report] data summary")
    body, status["data"] = _data_section(ds, out)
    figures += ["data.png"] if status["data"] == "ok" else []
    sections.append(("data", "Data", body))
    progress(f"[report] pretraining curves ({', '.join(objectives) or 'none'})")
    body, status["pretrain"], f = _pretrain_section(run, objectives, out)
    figures += f
    sections.append(("pretrain", "Pretraining", body))
    progress("[report] evaluation")
    body, status["evaluation"], f = _eval_section(results_path, out)
    figures += f
    sections.append(("evaluation", "Evaluation", body))
    maps, status["maps"], clusters, status["clusters"], f = _maps_section(run, ds, objectives, out, cfg, progress)
    figures += f
    sections.append(("maps", "Embedding maps", maps))
    sections.append(("clusters", "Clusters and keywords", clusters))
    drift = _drift_section(run)
    if drift is not None:
        status["drift"] = "ok"
        sections.append(("drift", "Embedding drift", drift))
    progress("[report] sweep figures")
    body, status["sweeps"], f = _sweep_section(run, out, cfg.sweeps)
    figures += f
    sections.append(("sweeps", "Sweeps", body))

    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' + ("" if status[sid] == "ok" else '<span class="st">(missing)</span>')
                  for sid, title, _ in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>userfm report: {_e(run.name)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body><main>'
            f"<h1>userfm run report: {_e(run.name)}</h1>"
            f'<p class="note">{_e(run.resolve())} &middot; written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))} by <code>userfm report</code></p>'
            f"<nav>{nav}</nav>"
            + "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>' for sid, title, body in sections)
            + f'<p class="note">report config: <code>{_e(json.dumps(to_dict(cfg)))}</code></p></main></body></html>')
    (out / "report.html").write_text(page)
    progress(f"[report] wrote {out / 'report.html'} ({len(figures)} figures) in {time.perf_counter() - t0:.1f}s")
    return {"html": str(out / "report.html"), "figures": figures, "sections": status}
