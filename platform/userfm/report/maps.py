"""The report's embedding maps: each objective's table projected to 2-D, coloured by k-means cluster and by
each attribute, with each colouring's 10-NN agreement and the clusters' keywords."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.report.analysis import cluster_keywords, knn_agreement, mode_by_row, project_2d
from userfm.report.common import ReportConfig, ReportError, _NA, _e, _img, _missing, _plt, _save, _slug, _table


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


