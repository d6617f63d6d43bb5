"""``userfm sweep``: the grid, the data-length axis, and the smoke sweep end to end on Ray Tune (stop after
one trial, resume without rerunning it, report with every figure)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from userfm.config import load_config
from userfm.train.pretrain import first_users
from userfm.data.sequences import split_fraction
from userfm.train.sweep import COLUMNS, SweepConfig, SweepError, grid_points, trial_key

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "scaling" / "smoke.yaml"
FIGURES = ["fig_batch_size.png", "fig_data_length.png", "fig_epochs.png", "fig_loss_vs_compute.png",
           "fig_out_dim.png", "fig_pretext_vs_downstream.png"]


def test_grid_is_the_union_of_products_with_shared_points_once():
    cfg = SweepConfig(grids=({"size": ["tiny", "small"], "max_steps": [10, 20]},
                             {"size": "tiny", "global_batch": [32, 64], "max_steps": 10},
                             {"epochs": [1, 2], "train_users": 100}), global_batch=32)
    keys = [trial_key(p) for p in grid_points(cfg)]
    assert keys == ["tiny-b32-uall-s10-dw", "tiny-b32-uall-s20-dw", "small-b32-uall-s10-dw", "small-b32-uall-s20-dw",
                    "tiny-b64-uall-s10-dw", "tiny-b32-u100-e1-dw", "tiny-b32-u100-e2-dw"]


@pytest.mark.parametrize("grid,message", [
    ({"width": [1]}, "grids[0]: unknown axis ['width']"),
    ({"size": ["huge"]}, "size must be one of"),
    ({"global_batch": [3]}, "multiple of num_workers=2"),
    ({"max_steps": ["many"]}, "grids[0].max_steps: expected int"),
])
def test_grid_errors_name_the_grid_and_axis(grid, message):
    with pytest.raises(SweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
        grid_points(SweepConfig(grids=(grid,), num_workers=2))


def test_cli_rejects_a_bad_grid_with_one_line(tmp_path, capsys):
    from userfm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"out: {tmp_path / 'exp'}\ngrids:\n  - {{size: [tiny], depth: [2]}}\n")
    assert main(["sweep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "userfm sweep: error: grids[0]: unknown axis ['depth']" in err
    assert not (tmp_path / "exp").exists()


def test_first_users_is_a_nested_subset_by_hash():
    ids = [f"u{i}" for i in range(50)]
    rows = pa.table({"user_id": ids, "n_events": list(range(50))})
    by_hash = sorted(ids, key=split_fraction)
    ten, twenty = first_users(rows, 10), first_users(rows, 20)
    assert sorted(ten.column("user_id").to_pylist()) == sorted(by_hash[:10])
    assert set(ten.column("user_id").to_pylist()) < set(twenty.column("user_id").to_pylist())
    assert first_users(rows, 0).num_rows == 50 and first_users(rows, 500).num_rows == 50


@pytest.mark.timeout(600)
def test_smoke_sweep_stops_resumes_without_rerun_and_reports(ray_local, tmp_path):
    from userfm.cli import main
    from userfm.models.encoders import EncoderConfig, expected_num_params
    from userfm.train.scaling import PF_DAY
    from userfm.train.sweep import run_sweep

    import pandas as pd

    out = tmp_path / "smoke"
    cfg = load_config(SweepConfig, SMOKE, ["max_concurrent_trials=1", "stop_after_trials=1"], out=str(out))
    keys = [trial_key(p) for p in grid_points(cfg)]
    assert keys == ["tiny-b8-uall-s6-dw", "tiny-b16-uall-s6-dw"]

    first = run_sweep(cfg)
    assert first["done"] == 1 and first["trials"] == 2
    table = pd.read_parquet(out / "results.parquet")
    done = table[table["status"] == "done"]
    assert list(table.columns) == list(COLUMNS)
    finished = done["trial"].iloc[0]
    row_file = out / "trials" / finished / "row.json"
    metrics_file = out / "trials" / finished / "pretrain" / "metrics.jsonl"
    before = (row_file.stat().st_mtime_ns, metrics_file.read_text())
    assert not (out / "trials" / (set(keys) - {finished}).pop() / "row.json").exists()

    with pytest.raises(SweepError, match="--resume"):
        run_sweep(replace(cfg, stop_after_trials=0))
    second = run_sweep(replace(cfg, stop_after_trials=0), resume=True)
    assert second["done"] == 2
    # the finished trial was not rerun: its row and its pretraining log are untouched
    assert (row_file.stat().st_mtime_ns, metrics_file.read_text()) == before

    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["trial"]) == sorted(keys) and (table["status"] == "done").all()
    assert pd.read_csv(out / "results.csv")["trial"].tolist() == table["trial"].tolist()
    assert not table.isna().any().any(), table.isna().sum()[lambda s: s > 0]
    for _, r in table.iterrows():
        assert r["steps"] == r["max_steps"] == 6
        assert r["samples_seen"] == 6 * r["global_batch"]
        assert r["pf_days"] == pytest.approx(r["flops"] / PF_DAY)
        assert r["epochs_seen"] == pytest.approx(6 / (r["train_rows"] // r["global_batch"]))
        enc = EncoderConfig.from_json((out / "trials" / r["trial"] / "pretrain" / "model" / "config.json").read_text())
        assert (enc.d_model, enc.n_layers) == (32, 2)  # tiny
        assert r["params_non_embedding"] == expected_num_params(enc, non_embedding=True) < r["params"]
        assert 0 < r["test_loss"] < 10 and r["best_val_loss"] <= r["final_val_loss"]
        assert 0 <= r["downstream_lo"] <= r["downstream"] <= r["downstream_hi"] <= 1
        assert r["events_seen"] > r["samples_seen"]  # a CLUE pair holds >= 2 events
    # same data, model and steps: the bigger batch sees twice the samples, so about twice the FLOPs
    # (pretraining prices a sample at the mean history length of a sample of its featurized rows)
    b8, b16 = (table.set_index("global_batch").loc[b] for b in (8, 16))
    assert b16["flops"] == pytest.approx(2 * b8["flops"], rel=0.15)
    assert b16["samples_seen"] == 2 * b8["samples_seen"] == 96

    assert main(["sweep", "report", str(out)]) == 0
    rep = out / "report"
    assert sorted(p.name for p in rep.glob("fig_*.png")) == FIGURES
    assert all((rep / f).stat().st_size > 5000 for f in FIGURES)
    summary = (rep / "summary.md").read_text()
    for key in keys:
        assert f"| {key} |" in summary
    assert "Batch (tiny)**: global batch 8 -> 16" in summary
    fits = json.loads((rep / "fits.json").read_text())
    assert fits["trials"] == {"done": 2}
    assert fits["fits"]["L(C)"] is None  # two points: too few to fit, and the report says so
    assert "not fitted" in summary
