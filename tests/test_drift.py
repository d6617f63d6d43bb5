"""userfm drift: values derived by hand for tables built to have them (a copy, a rotated copy, a rotated
copy with noise orthogonal to the data, points on an arc with two users swapped), old heads scored on a
rotated table, the CLI's exit status at a threshold, and the report's HTML section."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import ortho_group

from userfm.eval.drift import DriftConfig, DriftError, compare, overlap_at_k, procrustes, run_drift

pytestmark = pytest.mark.timeout(300)
QUIET = dict(progress=lambda s: None)


def _ids(n: int) -> list[str]:
    return [f"u{i:03d}" for i in range(n)]


def _write(path, ids, x) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(x, np.float32)
    pq.write_table(pa.table({"user_id": pa.array(ids, pa.string()),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])}), path)
    return str(path)


def _noised(n: int = 40, eps: float = 0.5, seed: int = 0):
    """(x, b, Q): x spans dims 0-3 of 6 in antipodal pairs; b = (x + eps |x| e4) Q.

    The noise is orthogonal to every x and sums against x to zero (pairs x, -x carry the same noise),
    so the Procrustes fit still recovers Q on the data's span and each user's aligned cosine is
    x.x / (|x| |x| sqrt(1 + eps^2)) = 1 / sqrt(1 + eps^2). Pairwise cosines become
    (cos_ij + eps^2) / (1 + eps^2), increasing in cos_ij: every neighbour ranking, so overlap@k, is unchanged.
    """
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((n // 2, 6)) * rng.uniform(0.5, 3.0, (n // 2, 1))
    half[:, 4:] = 0.0
    x = np.empty((n, 6))
    x[0::2], x[1::2] = half, -half
    q = ortho_group.rvs(6, random_state=seed)
    noise = np.zeros_like(x)
    noise[:, 4] = eps * np.linalg.norm(x, axis=1)
    return x, (x + noise) @ q, q


def test_a_table_against_itself_has_no_drift():
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    c = compare(_ids(50), x, _ids(50), x, DriftConfig(k=5))
    np.testing.assert_allclose(c["cosine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(c["cosine_raw"], 1.0, atol=1e-6)
    assert (c["overlap"] == 1.0).all()
    assert c["rotation"]["distance_from_identity"] < 1e-5 and abs(c["rotation"]["scale"] - 1.0) < 1e-6


def test_procrustes_recovers_a_rotation_whatever_the_row_order_and_scale():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 8))
    q = ortho_group.rvs(8, random_state=3)
    r, s = procrustes(x, 3.0 * x @ q)
    np.testing.assert_allclose(r, q.T, atol=1e-8)  # (x Q) Q^T = x
    assert s == pytest.approx(1 / 3.0, rel=1e-9)
    # tables in different user order, each with users the other lacks: joined by user id
    ids = _ids(60)
    perm = rng.permutation(60)
    new_ids = [ids[i] for i in perm[:55]] + ["extra1", "extra2"]
    new_x = np.vstack([(3.0 * x @ q)[perm[:55]], rng.standard_normal((2, 8))])
    c = compare(ids, x.astype(np.float32), new_ids, new_x.astype(np.float32), DriftConfig(k=5))
    assert c["users"] == {"old": 60, "new": 57, "common": 55, "only_old": 5, "only_new": 2, "overlap_sampled": 55}
    np.testing.assert_allclose(c["cosine"], 1.0, atol=1e-5)
    assert (c["overlap"] == 1.0).all()  # neighbours do not see a rotation
    xc = x[[ids.index(u) for u in c["ids"]]]
    by_hand = np.einsum("ij,ij->i", xc, xc @ q) / np.einsum("ij,ij->i", xc, xc)  # cos(x, xQ): what "as is" reads
    np.testing.assert_allclose(c["cosine_raw"], by_hand, atol=1e-5)
    assert c["cosine_raw"].mean() < 0.9


def test_a_rotated_copy_with_orthogonal_noise_has_the_cosine_derived_by_hand():
    x, b, q = _noised(eps=0.5)
    c = compare(_ids(40), x.astype(np.float32), _ids(40), b.astype(np.float32), DriftConfig(k=4))
    np.testing.assert_allclose(c["cosine"], 1 / np.sqrt(1.25), atol=1e-5)  # 0.894427...
    assert c["rotation"]["scale"] == pytest.approx(1 / 1.25, rel=1e-5)
    assert (c["overlap"] == 1.0).all()


def test_overlap_of_points_on_an_arc_with_two_users_swapped():
    """9 users at 0, 10, ..., 80 degrees, k = 2. Swapping users 0 and 8 changes the neighbour sets of
    users 0 ({1,2} -> {7,6}), 1 ({0,2} -> {8,2}), 7 ({6,8} -> {6,0}) and 8 ({6,7} -> {1,2}):
    overlaps 0, 1/2, 1/2, 0, the other five keep theirs: mean (0 + .5 + .5 + 0 + 5) / 9 = 2/3."""
    ang = np.deg2rad(np.arange(9) * 10.0)
    a = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    b = a.copy()
    b[[0, 8]] = a[[8, 0]]
    ov = overlap_at_k(a, b, np.arange(9), 2)
    np.testing.assert_allclose(ov, [0, 0.5, 1, 1, 1, 1, 1, 0.5, 0])
    assert ov.mean() == pytest.approx(2 / 3)


def test_bad_inputs_are_named(tmp_path):
    a = _write(tmp_path / "a.parquet", ["x", "y", "z"], np.eye(3))
    b = _write(tmp_path / "b.parquet", ["p", "q", "x"], np.eye(3))
    with pytest.raises(DriftError, match="share 1 user"):
        run_drift(DriftConfig(old=a, new=b), **QUIET)
    with pytest.raises(DriftError, match="new: no file or folder"):
        run_drift(DriftConfig(old=a, new=str(tmp_path / "nope")), **QUIET)
    with pytest.raises(ValueError, match="heads need data"):
        DriftConfig(old=a, new=a, heads=("h",))


# ---------------------------------------------------------------------------------- CLI and report


def test_cli_exits_1_over_a_threshold_and_writes_the_markdown_and_the_report_section(tmp_path, capsys):
    from userfm.cli import main
    from userfm.report.common import ReportConfig
    from userfm.report.page import run_report

    x, b, _ = _noised(eps=0.5)
    old, new = _write(tmp_path / "old.parquet", _ids(40), x), _write(tmp_path / "new.parquet", _ids(40), b)
    run = tmp_path / "run"
    assert main(["drift", old, new, "--out", str(run / "drift"), "--min-cosine", "0.85", "--k", "4"]) == 0
    assert "| per-user cosine, aligned (orthogonal Procrustes) | 0.8944 |" in capsys.readouterr().out
    assert main(["drift", old, new, "--out", str(run / "drift"), "--min-cosine", "0.9", "--k", "4"]) == 1
    err = capsys.readouterr().err
    assert "over threshold: mean aligned cosine 0.8944 < min_cosine 0.9" in err
    assert main(["drift", old, old, "--min-overlap", "1.0", "--set", "min_cosine=0.999999"]) == 0
    assert main(["drift", old, str(tmp_path / "missing")]) == 2
    saved = json.loads((run / "drift" / "drift.json").read_text())
    assert saved["failures"] == ["mean aligned cosine 0.8944 < min_cosine 0.9"]
    assert saved["cosine"]["mean"] == pytest.approx(1 / np.sqrt(1.25), abs=1e-5) and saved["overlap"]["mean"] == 1.0
    per_user = pq.read_table(run / "drift" / "per_user.parquet")
    assert per_user.num_rows == 40 and per_user.column("user_id").to_pylist() == _ids(40)
    assert (run / "drift" / "drift.md").read_text().startswith("## Embedding drift:")
    r = run_report(ReportConfig(run=str(run)), **QUIET)
    assert r["sections"]["drift"] == "ok"
    html = (run / "report" / "report.html").read_text()
    assert 'id="drift"' in html and "0.8944" in html and "Over threshold" in html


# ---------------------------------------------------------------------------------- old heads on the new table


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local):
    """A 300-user dataset with attributes, an old table whose vectors carry the segment label, a logistic head."""
    from userfm.eval.heads import fit_logreg, save_head
    from userfm.eval.task_data import task_data, user_table
    from userfm.eval.tasks import EvalConfig, TaskConfig
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    root = tmp_path_factory.mktemp("drift")
    generate(SynthConfig(n_users=300, events_per_user=5, seed=4), root / "raw")
    run_ingest(IngestConfig(inputs=(str(root / "raw" / "events"),), out=str(root / "ds"),
                            attributes=(str(root / "raw" / "attributes.parquet"),)), **QUIET)
    task = TaskConfig(name="segment", table="attributes", target="segment", type="multiclass")
    td = task_data(root / "ds", task, user_table(root / "ds"))
    ids = [u for s in ("train", "val", "test") for u in td.ids[s]]
    y = np.concatenate([td.y[s] for s in ("train", "val", "test")])
    rng = np.random.default_rng(0)
    x = np.zeros((len(ids), 16))
    x[np.arange(len(ids)), y] = 2.0
    x += rng.standard_normal(x.shape)
    n_tr, n_va = len(td.ids["train"]), len(td.ids["val"])
    head = fit_logreg(x[:n_tr], y[:n_tr], x[n_tr:n_tr + n_va], y[n_tr:n_tr + n_va], task=task, classes=td.classes,
                      cfg=EvalConfig(logreg_c=(1.0,)), seed=0)
    save_head(root / "heads" / "segment" / "t-logreg" / "seed0", head)
    head.meta.update(embedding="random", embedding_source="random")  # evaluate's random floor, saved beside it
    save_head(root / "heads" / "segment" / "random-logreg" / "seed0", head)
    q = ortho_group.rvs(16, random_state=5)
    old = _write(root / "old" / "t.parquet", ids, x)
    new = _write(root / "new" / "t.parquet", ids, x @ q)
    test = slice(n_tr + n_va, None)
    return {"root": root, "old": old, "new": new, "x": x, "q": q, "y_test": y[test], "x_test": x[test]}


def test_old_heads_on_a_rotated_table_as_is_and_aligned(labelled):
    from userfm.eval.heads import load_head

    root = labelled["root"]
    r = run_drift(DriftConfig(old=labelled["old"], new=labelled["new"], data=str(root / "ds"), heads=(str(root / "heads"),),
                              max_metric_drop=0.05), **QUIET)
    skipped, h = r["heads"]
    assert skipped == {"head": "segment/random-logreg/seed0", "path": str(root / "heads" / "segment" / "random-logreg" / "seed0"),
                       "task": "segment", "kind": "logreg", "embedding_source": "random",
                       "skipped": f"fitted on random, not on the old table {labelled['old']}"}
    assert h["head"] == "segment/t-logreg/seed0" and h["metric"] == "accuracy" and h["users"] == len(labelled["y_test"])
    head = load_head(root / "heads" / "segment" / "t-logreg" / "seed0")
    y, xt = labelled["y_test"], labelled["x_test"]
    p_old = head.predict_proba(xt).argmax(1)
    p_raw = head.predict_proba((xt @ labelled["q"]).astype(np.float32)).argmax(1)
    assert h["values"]["old"] == pytest.approx(np.mean(p_old == y))
    assert h["values"]["raw"] == pytest.approx(np.mean(p_raw == y))
    assert h["values"]["aligned"] == pytest.approx(h["values"]["old"])  # the rotation undone: same predictions
    assert h["agreement"] == {"old": 1.0, "raw": pytest.approx(np.mean(p_raw == p_old)), "aligned": 1.0}
    assert h["values"]["old"] > 0.5 and h["drop"]["raw"] == pytest.approx(h["values"]["old"] - h["values"]["raw"])
    assert h["drop"]["raw"] > 0.05 and r["failures"] == [
        f"head segment/t-logreg/seed0: accuracy worse by {h['drop']['raw']:.4f} on the raw new table > max_metric_drop 0.05"]
    aligned_gate = run_drift(DriftConfig(old=labelled["old"], new=labelled["new"], data=str(root / "ds"),
                                         heads=(str(root / "heads"),), max_metric_drop=0.05, drop_on="aligned"), **QUIET)
    assert aligned_gate["failures"] == []
