"""The command line: every subcommand has --help, errors are one line with exit 2, the demo runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from userfm.cli import build_parser, main

SUBCOMMANDS = ["demo", "synth", "convert", "ingest", "pretrain", "embed", "evaluate", "report", "sweep", "serve", "summary"]
SUBCOMMANDS += ["refresh", "drift"]  # incremental refresh and embedding drift


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "userfm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in out.stdout
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: userfm {name}")


def test_errors_are_one_line_and_exit_2(tmp_path):
    out = run_cli("summary", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"userfm summary: error: {tmp_path}: no manifest.json (not a userfm sequence dataset, or ingest did not finish)"
    out = run_cli("ingest", str(tmp_path / "nothing.parquet"), "--out", str(tmp_path / "o"), "--set", "max_events=0")
    assert out.returncode == 2 and "max_events must be >= 1, got 0" in out.stderr
    out = run_cli("synth", "--out", str(tmp_path / "s"), "--set", "n_userz=3")
    assert out.returncode == 2 and "unknown key(s) ['n_userz']" in out.stderr
    out = run_cli("convert", "movielens", str(tmp_path / "missing"), str(tmp_path / "o"))
    assert out.returncode == 2 and "no such file or folder" in out.stderr
    assert run_cli().returncode == 2  # no subcommand: help, exit 2


@pytest.mark.timeout(900)  # measured 4 min at load average ~20 and > 7 min at ~40 on the 2-core box: a hang guard, not a budget
def test_demo_end_to_end(tmp_path, ray_local, capsys, monkeypatch):
    """The README's main job (small): synth -> ingest -> summary -> pretrain -> embed -> evaluate ->
    report -> serve; counts line up with the generator, every served route answers 200. Its last stage
    fails first (on purpose): one error naming the stage, what is intact and the command that resumes;
    that command finishes the run without redoing the finished stages."""
    import userfm.demo

    out = tmp_path / "demo"
    real_serve = userfm.demo._serve_stage

    def proxy_dies(*args, **kwargs):
        raise RuntimeError("ProxyActor failed its readiness check\n(40 more lines)")

    monkeypatch.setattr(userfm.demo, "_serve_stage", proxy_dies)
    assert main(["demo", "--out", str(out), "--users", "400", "--set", "pretrain_steps=6", "--set", "eval_seeds=1"]) == 2
    first = capsys.readouterr()
    assert "[demo 5/9] pretrain clue on Ray Train done" in first.out and "[demo 8/9] write the HTML report done" in first.out
    err = first.err.splitlines()
    assert err[0] == ("userfm demo: error: stage 'serve embeddings and heads over HTTP (Ray Serve)' failed: "
                      "RuntimeError: ProxyActor failed its readiness check")
    assert err[1].startswith("  intact: 7 finished stages (raw/, dataset/, pretrain/clue/, embeddings/clue/, evaluate/, report/)")
    assert err[2:] == [f"  resume: userfm demo --resume --out {out}", f"  traceback: {out / 'logs' / 'demo.log'}"]
    assert "(40 more lines)" in (out / "logs" / "demo.log").read_text()  # the whole traceback is in the log
    monkeypatch.setattr(userfm.demo, "_serve_stage", real_serve)
    assert main(["demo", "--resume", "--out", str(out), "--users", "5"]) == 2  # resume takes the run's own config
    assert "drop --users" in capsys.readouterr().err
    assert main(["demo", "--resume", "--out", str(out)]) == 0
    resumed = capsys.readouterr().out
    assert "[demo 5/9] pretrain clue on Ray Train: reused from the earlier run" in resumed
    assert "[demo 2/9] start Ray done" in resumed and "[demo 9/9] serve embeddings and heads over HTTP (Ray Serve) done" in resumed
    summary = json.loads((out / "demo_summary.json").read_text())
    truth = json.loads((out / "raw" / "ground_truth.json").read_text())
    assert summary["ingest"]["rows_in"] == truth["activity"]["n_events"] == summary["ingest"]["rows_kept"]
    assert summary["ingest"]["rows_quarantined"] == 0
    assert summary["ingest"]["users"]["total"] == 400
    assert summary["ingest"]["services"] == truth["activity"]["events_per_service"]
    seqs = pq.read_table(out / "dataset" / "sequences" / "all")
    assert seqs.num_rows == 400
    printed = resumed  # (the first attempt's lines were read above; its stages' are checked through the resume)
    assert "[demo 3/9] ingest with Ray Data: reused" in printed and "[demo 4/9] summarize: reused" in printed
    assert "[demo 6/9] embed users with clue: reused" in printed
    assert "[demo 7/9] evaluate downstream tasks: reused" in printed and "[demo 8/9] write the HTML report: reused" in printed
    assert "[demo] finished" in printed
    # the report page and every figure it links exist
    html = (out / "report" / "report.html").read_text()
    assert summary["report"] == str(out / "report" / "report.html")
    for src in __import__("re").findall(r'<img src="([^"]+)"', html):
        assert (out / "report" / src).stat().st_size > 1000, src
    # the serve stage called every route once with a real test user and got 200s
    calls = {(c["method"], c["path"].split("?")[0]): c["status"] for c in summary["serve"]["calls"]}
    uid, head = summary["serve"]["user_id"], summary["serve"]["head"]
    assert head == "segment" and calls == {
        ("GET", "/healthz"): 200, ("POST", "/v1/embed"): 200, ("GET", f"/v1/users/{uid}/embedding"): 200,
        ("GET", f"/v1/users/{uid}/similar"): 200, ("GET", "/v1/heads"): 200, ("POST", "/v1/heads/segment/predict"): 200,
        ("GET", "/docs"): 200}
    assert f"GET  /v1/users/{uid}/embedding" in printed
    assert summary["pretrain"]["clue"]["step"] == 6 and summary["pretrain"]["clue"]["users_embedded"] == 400
    assert (out / "pretrain" / "clue" / "model" / "model.safetensors").exists()
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert {r["model"] for r in results["rows"] if r["task"] == "segment"} == {
        "clue/mlp", "clue/logreg", "random/mlp", "random/logreg", "tfidf/logreg", "oracle",
        "minilm-mean/mlp", "minilm-mean/logreg", "bag-of-items/logreg"}
    assert summary["evaluate"]["headline"]["segment"]["oracle"] == pytest.approx(truth["attributes"]["segment"]["oracle_accuracy"], abs=1e-3)
    # a second run replaces the run folder; a foreign folder is refused
    # (the report and serve stages were checked above: off here, they would only add ~30 s)
    assert main(["demo", "--out", str(out), "--users", "50", "--set", "pretrain_steps=0", "--set", "report=false",
                 "--set", "serve=false"]) == 0
    assert json.loads((out / "demo_summary.json").read_text())["ingest"]["users"]["total"] == 50
    assert not (out / "report").exists()  # the folder was replaced, not merged into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--users", "50", "--set", "pretrain_steps=0"]) == 2
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
