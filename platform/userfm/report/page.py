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

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from userfm.config import to_dict
from userfm.report.analysis import read_metrics
from userfm.report.common import ReportConfig, ReportError, _e, _img, _missing, _num, _plt, _save, _slug, _table
from userfm.report.maps import _maps_section


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
