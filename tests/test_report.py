"""userfm report: the page references every figure, the figures are real pictures, the numbers equal
results.json and the manifest, and a run with pieces missing gets notes instead of a crash."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.report.analysis import cluster_keywords, knn_agreement, mode_by_row, read_metrics
from userfm.report.common import ReportConfig, ReportError
from userfm.report.page import run_report

pytestmark = pytest.mark.timeout(240)

TASKS = Path(__file__).resolve().parents[1] / "experiments" / "tasks" / "synthetic.yaml"


def _write_embeddings(path: Path, ids: list[str], x: np.ndarray) -> None:
    path.mkdir(parents=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])
    pq.write_table(pa.table({"user_id": ids, "embedding": emb}), path / "part-0.parquet")


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """A small demo-like run: 300 synthetic users + 3 bad rows, hand-written metrics, 2 embedding tables,
    an evaluation of 2 tasks, and one sweep figure."""
    from userfm.data.dataset import read_attributes
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.tasks import EvalConfig
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    raw = run / "raw"
    generate(SynthConfig(n_users=300, events_per_user=15, seed=3), raw)
    bad = raw / "bad.jsonl"  # 2 missing_field (no text / no user), 1 bad_type (timestamp)
    bad.write_text("\n".join(json.dumps(r) for r in [
        {"user_id": "x1", "ts": "2024-01-01T00:00:00", "service": "news"},
        {"ts": "2024-01-01T00:00:00", "service": "news", "text": "a headline"},
        {"user_id": "x2", "ts": "not a time", "service": "news", "text": "another headline"},
    ]) + "\n")
    run_ingest(IngestConfig(inputs=(str(raw / "events"), str(bad)), out=str(run / "dataset"),
                            attributes=(str(raw / "attributes.parquet"), str(raw / "future_labels.parquet"))),
               progress=lambda s: None)

    # pretraining log of a resumed run: step 30 logged twice, the second row wins
    rows = [{"step": s, "loss": 5.0 - 0.02 * s, "lr": 1e-3, "samples_per_s": 100.0 + s, "clue/top1": 0.01 * s / 5}
            for s in (10, 20, 30, 30, 40, 50)]
    rows[3]["loss"] = 4.2
    rows[2]["val_loss"], rows[5]["val_loss"] = 4.9, 4.3
    (run / "pretrain" / "clue").mkdir(parents=True)
    (run / "pretrain" / "clue" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # embeddings: "clue" carries the user's segment (one direction per segment + noise), "simclr" is noise
    attrs = read_attributes(run / "dataset", "attributes")
    ids, segment = attrs.column("user_id").to_pylist(), np.array(attrs.column("segment").to_pylist())
    rng = np.random.default_rng(0)
    names = sorted(set(segment))
    centres = rng.normal(size=(len(names), 16)) * 3
    x = centres[[names.index(s) for s in segment]] + rng.normal(size=(len(ids), 16))
    _write_embeddings(run / "embeddings" / "clue", ids, x)
    _write_embeddings(run / "embeddings" / "simclr", ids, rng.normal(size=(len(ids), 16)))

    results = run_evaluate(EvalConfig(data=str(run / "dataset"), out=str(run / "evaluate"), tasks=str(TASKS),
                                      only_tasks=("segment", "is_parent"), embeddings={"clue": str(run / "embeddings" / "clue"), "random": "random"},
                                      heads=("logreg",), baselines=(), seeds=1, bootstrap_samples=100, save_heads=False),
                           progress=lambda s: None)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_report = run / "sweeps" / "asha" / "report"  # what a sweep writes: <sweep>/report/fig_*.png
    sweep_report.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(20), np.exp(-np.arange(20) / 5), marker="o")
    fig.savefig(sweep_report / "fig_loss_vs_flops.png", dpi=100)
    plt.close(fig)
    (sweep_report / "summary.md").write_text("# sweep asha\n")

    report = run_report(ReportConfig(run=str(run), map_users=200, tsne_iters=250, clusters=4, keywords=6),
                        progress=lambda s: None)
    return run, report, results


def _html(run: Path) -> str:
    return (run / "report" / "report.html").read_text()


def test_html_references_every_figure_and_each_is_a_real_picture(run):
    import matplotlib.image as mpimg

    root, report, _ = run
    html = _html(root)
    srcs = re.findall(r'<img src="([^"]+)"', html)
    expected = {"data.png", "pretrain_clue.png", "chart_segment.png", "chart_is_parent.png", "map_clue.png",
                "map_simclr.png", "clusters_clue.png", "clusters_simclr.png", "sweeps/sweeps__asha__report__fig_loss_vs_flops.png"}
    assert set(srcs) == expected == set(report["figures"])
    assert len(srcs) == len(set(srcs))
    for src in srcs:
        path = root / "report" / src
        assert path.stat().st_size > 5_000, src
        img = mpimg.imread(path)[..., :3]
        assert img.std() > 0.02, f"{src} is (nearly) a single colour"
    assert report["sections"] == {"run": "missing: no demo_summary.json", "data": "ok", "pretrain": "ok",
                                  "evaluation": "ok", "maps": "ok", "clusters": "ok", "sweeps": "ok"}
    assert 'href="sweeps/sweeps__asha__report__summary.md"' in html
    assert (root / "report" / "sweeps" / "sweeps__asha__report__summary.md").read_text() == "# sweep asha\n"
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained


def test_evaluation_numbers_equal_results_json(run):
    root, _, results = run
    html = _html(root)
    cells = {(m["task"], m["model"], m["key"]): m for m in (
        mm.groupdict() for mm in re.finditer(
            r'<td class="num[^"]*" data-task="(?P<task>[^"]+)" data-model="(?P<model>[^"]+)" data-key="(?P<key>[^"]+)" '
            r'data-value="(?P<value>[^"]+)"(?: data-lo="(?P<lo>[^"]+)" data-hi="(?P<hi>[^"]+)")?>(?P<text>[^<]+)', html))}
    checked = 0
    for row in results["rows"]:
        for key in ("test", "cold", "heavy", "vs_random"):
            d = row.get(key)
            if not d or d["value"] is None:
                continue
            cell = cells[(row["task"], row["model"], key)]
            assert float(cell["value"]) == d["value"]
            assert cell["text"].strip() == f"{d['value']:.3f}"
            assert [float(cell["lo"]), float(cell["hi"])] == d["ci"]
            checked += 1
    assert checked >= 2 * 2 * 3  # 2 tasks x (clue, random) x (test, cold, heavy) at least
    assert {r["task"] for r in results["rows"]} == {"segment", "is_parent"}


def test_data_section_shows_the_manifest_counts(run):
    from userfm.data.dataset import load_manifest

    root, _, _ = run
    html = _html(root)
    manifest = load_manifest(root / "dataset")
    shown = {k: int(v.replace(",", "")) for k, v in re.findall(r'data-reason="([^"]+)">([\d,]+)<', html)}
    assert shown == manifest["quarantined_by_reason"]
    assert shown["missing_field"] == 2 and shown["bad_type"] == 1
    assert f"<td>{manifest['rows_quarantined']:,}</td>" in html and f"<td>{manifest['rows_in']:,}</td>" in html


def test_maps_show_the_planted_structure_and_clusters_have_keywords(run):
    root, _, _ = run
    html = _html(root)
    maps = html[html.index('id="maps"'):html.index('id="clusters"')]
    # agreement table per objective: segment was planted in clue's embeddings only
    agree = {}
    for obj in ("clue", "simclr"):
        part = maps[maps.index(f"<h3>{obj}</h3>"):]
        m = re.search(r"<td>segment</td><td class=\"num\">([\d.]+)</td><td class=\"num\">([\d.]+)</td>", part)
        agree[obj] = (float(m.group(1)), float(m.group(2)))
    assert agree["clue"][0] > 0.9 and agree["simclr"][0] < agree["simclr"][1] + 0.1
    for name in ("age_bracket", "is_parent", "top service", "top category (level 1)", "k-means cluster"):
        assert f"<td>{name}</td>" in maps
    clusters = html[html.index('id="clusters"'):html.index('id="sweeps"')]
    assert clusters.count("<summary>keywords as text</summary>") == 2
    assert "pretrain/simclr/metrics.jsonl" in html  # simclr has embeddings but no pretraining log: noted


def test_read_metrics_keeps_the_last_row_of_a_repeated_step(run):
    root, _, _ = run
    rows = read_metrics(root / "pretrain" / "clue" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
    assert rows[2]["loss"] == 4.2 and "val_loss" not in rows[2]


def test_missing_pieces_become_notes_and_attributes_fall_back_to_behaviour(run, tmp_path):
    from userfm.cli import main

    root, _, _ = run
    part = tmp_path / "part"
    shutil.copytree(root / "dataset", part / "dataset")
    mf = part / "dataset" / "manifest.json"  # logs without label tables (like MovieLens latest)
    manifest = json.loads(mf.read_text())
    manifest["attributes"] = []
    mf.write_text(json.dumps(manifest))
    assert main(["report", str(part), "--set", "map_users=120", "--set", "tsne_iters=250", "--set", "clusters=3"]) == 0
    html = (part / "report" / "report.html").read_text()
    assert html.count('class="missing"') == 6  # run summary, pretraining, evaluation, maps, clusters, sweeps
    assert "No evaluate/results.json in this run" in html and "No sweep figures" in html
    maps = html[html.index('id="maps"'):html.index('id="clusters"')]
    assert "No embeddings" in maps
    shutil.copytree(root / "embeddings" / "clue", part / "embeddings" / "<b>clue&")  # a hostile name
    r = run_report(ReportConfig(run=str(part), map_users=120, tsne_iters=250, clusters=3), progress=lambda s: None)
    assert r["sections"]["maps"] == "ok" and r["sections"]["evaluation"] == "missing: no results.json"
    maps = Path(r["html"]).read_text()
    maps = maps[maps.index('id="maps"'):maps.index('id="clusters"')]
    assert "<td>top service</td>" in maps and "<td>segment</td>" not in maps
    assert "<h3>&lt;b&gt;clue&amp;</h3>" in maps and "<b>clue" not in maps  # escaped, never markup
    assert (part / "report" / "map__b_clue_.png").stat().st_size > 5_000

    with pytest.raises(ReportError, match="not a run folder"):
        run_report(ReportConfig(run=str(tmp_path / "part" / "dataset" / "sequences")), progress=lambda s: None)
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_mode_by_row_breaks_ties_by_value_and_leaves_empty_rows_none():
    got = mode_by_row(np.array([0, 0, 0, 2, 2, 3]), pa.array(["b", "a", "b", "y", "x", None]), 4)
    assert got.tolist() == ["b", None, "x", None]


def test_knn_agreement_by_hand():
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], np.float32)  # two tight pairs, far apart
    assert knn_agreement(x, np.array(["a", "a", "b", "b"], dtype=object), 1) == (1.0, 0.5)
    assert knn_agreement(x, np.array(["a", "b", "a", "b"], dtype=object), 1) == (0.0, 0.5)
    agree, chance = knn_agreement(x, np.array(["a", "a", "b", None], dtype=object), 1)  # unknown left out
    assert (agree, chance) == (2 / 3, (2 / 3) ** 2 + (1 / 3) ** 2)


def test_cluster_keywords_rank_a_clusters_own_words_over_shared_ones():
    docs = ["news running shoes trail", "news running shoes", "news trail running",
            "news stocks dividend", "news dividend bank stocks", "news stocks bank"]
    kw = cluster_keywords(docs, np.array([0, 0, 0, 1, 1, 1]), 2, 3)
    assert {w for w, _ in kw[0]} == {"running", "shoes", "trail"}
    assert {w for w, _ in kw[1]} == {"stocks", "dividend", "bank"}
    assert kw[0][0][0] == "running" and kw[1][0][0] == "stocks"  # used by all 3 users of the cluster
    assert all(w != "news" for c in kw for w, _ in c) and all(v > 0 for c in kw for _, v in c)
