"""The demo's console (userfm.stages): one line per stage by default, each stage's own output in the run's
log, a live progress line while it runs, a failure that says how to resume, and the resume itself."""

from __future__ import annotations

import io
import json
import re

import pytest

from userfm.stages import PLAIN_EVERY_S, LiveLine, StageFailed, Stages


def _stage(msg):
    def fn():
        print(msg)
        return 41 + 1
    return fn


def test_quiet_stages_print_one_line_each_and_log_what_they_print(capsys):
    details = io.StringIO()
    stages = Stages(2, details)
    assert stages.run("ingest with Ray Data", _stage("[ingest] pass 1: 9 rows")) == 42
    assert stages.run("summarize", _stage("[summary] 3 users")) == 42
    printed = capsys.readouterr().out  # not a terminal: only the "done" lines
    assert re.fullmatch(r"\[demo 1/2\] ingest with Ray Data done in \d+\.\ds\n\[demo 2/2\] summarize done in \d+\.\ds\n", printed)
    assert re.fullmatch(r"\[demo 1/2\] ingest with Ray Data \.\.\.\n\[ingest\] pass 1: 9 rows\n"
                        r"\[demo 1/2\] ingest with Ray Data done in \d+\.\ds\n"
                        r"\[demo 2/2\] summarize \.\.\.\n\[summary\] 3 users\n\[demo 2/2\] summarize done in \d+\.\ds\n",
                        details.getvalue())
    assert list(stages.timings) == ["ingest with Ray Data", "summarize"]


def test_verbose_stages_print_both_lines_and_the_stage_output(capsys):
    stages = Stages(1, None)
    stages.run("ingest with Ray Data", _stage("[ingest] pass 1: 9 rows"))
    assert re.fullmatch(r"\[demo 1/1\] ingest with Ray Data \.\.\.\n\[ingest\] pass 1: 9 rows\n"
                        r"\[demo 1/1\] ingest with Ray Data done in \d+\.\ds\n", capsys.readouterr().out)


def test_a_failing_quiet_stage_raises_one_line_and_its_output_and_traceback_stay_in_the_log(capsys):
    details = io.StringIO()

    def fails():
        print("[ingest] reading")
        raise ValueError("bad row 7\nsecond line")

    with pytest.raises(StageFailed, match=r"^stage 'ingest with Ray Data' failed: ValueError: bad row 7$") as exc:
        Stages(3, details).run("ingest with Ray Data", fails)
    assert isinstance(exc.value.__cause__, ValueError)
    assert capsys.readouterr().out == ""
    log = details.getvalue()
    assert log.startswith("[demo 1/3] ingest with Ray Data ...\n[ingest] reading\n[demo 1/3] ingest with Ray Data failed:\n"
                          "Traceback (most recent call last):\n")
    assert log.endswith("ValueError: bad row 7\nsecond line\n")


def test_calendar_fields_auto_drop_dates_for_contrastive_objectives_on_real_data(tmp_path):
    """Auto (time_fields None): synthetic data keeps all five fields; real data drops them for CLUE/SimCLR (a
    time-split pair of a user who rates in sessions shares its dates) and keeps them for MLM's date pretext;
    an explicit value applies to every objective."""
    from userfm.config import load_config
    from userfm.demo import DemoConfig, time_fields_for

    five = ("year", "month", "day", "weekday", "hour")
    synth = DemoConfig()
    real = DemoConfig(data=str(tmp_path), format="movielens")
    assert [time_fields_for(synth, o) for o in ("clue", "simclr", "mlm")] == [five] * 3
    assert [time_fields_for(real, o) for o in ("clue", "simclr", "mlm")] == [(), (), five]
    chosen = load_config(DemoConfig, None, ["time_fields=hour,weekday"], data=str(tmp_path), format="movielens")
    assert [time_fields_for(chosen, o) for o in ("clue", "mlm")] == [("hour", "weekday")] * 2
    assert time_fields_for(load_config(DemoConfig, None, ["time_fields="]), "mlm") == ()


def test_finished_stages_are_recorded_and_reused_on_resume_and_a_rerun_stage_clears_its_outputs(tmp_path, capsys):
    record, details = tmp_path / "stages.json", io.StringIO()
    stages = Stages(3, details, record, {"n_users": 5})
    part = tmp_path / "part"

    def writes():
        part.mkdir()
        (part / "half.txt").write_text("half")  # what a failed attempt leaves
        raise RuntimeError("proxy not ready")

    assert stages.run("ingest", lambda: {"rows": 7}, (tmp_path / "ds",)) == {"rows": 7}
    assert stages.run("start Ray", lambda: object(), reusable=False) is not None
    with pytest.raises(StageFailed, match="stage 'serve' failed: RuntimeError: proxy not ready"):
        stages.run("serve", writes, (part,))
    saved = json.loads(record.read_text())
    assert saved["config"] == {"n_users": 5} and list(saved["stages"]) == ["ingest"]
    assert saved["stages"]["ingest"]["result"] == {"rows": 7} and saved["stages"]["ingest"]["outputs"] == [str(tmp_path / "ds")]
    capsys.readouterr()

    again = Stages(3, io.StringIO(), record, saved["config"], saved["stages"])
    assert again.run("ingest", lambda: pytest.fail("a finished stage ran again"), (tmp_path / "ds",)) == {"rows": 7}
    assert again.run("start Ray", lambda: "started", reusable=False) == "started"  # never reused

    def clean():
        assert not part.exists()  # cleared before the stage ran again
        return {"served": True}

    assert again.run("serve", clean, (part,)) == {"served": True}
    printed = capsys.readouterr().out
    assert printed.startswith(f"[demo 1/3] ingest: reused from the earlier run ({saved['stages']['ingest']['seconds']:.1f}s then)\n")
    assert list(json.loads(record.read_text())["stages"]) == ["ingest", "serve"]
    assert again.timings["ingest"] == saved["stages"]["ingest"]["seconds"]


def test_live_line_not_a_terminal_prints_the_latest_progress_line_periodically(monkeypatch):
    details, console = io.StringIO(), io.StringIO()
    clock = [100.0]
    monkeypatch.setattr("userfm.stages.time.monotonic", lambda: clock[0])
    live = LiveLine(details, console, "[demo 5/9] pretrain clue ...", tty=False)
    live.write("[pretrain] step 10/400 loss 4.1\nRay says hello\n[pretrain] step 20/")
    assert console.getvalue() == ""  # nothing before PLAIN_EVERY_S
    clock[0] += PLAIN_EVERY_S
    live.write("400 loss 3.9\nnot progress\n")
    assert console.getvalue() == "[demo 5/9] pretrain clue ... [pretrain] step 20/400 loss 3.9\n"
    live.write("[pretrain] step 30/400 loss 3.8\n")  # too soon after the last
    assert console.getvalue().count("\n") == 1
    assert details.getvalue() == ("[pretrain] step 10/400 loss 4.1\nRay says hello\n[pretrain] step 20/400 loss 3.9\n"
                                  "not progress\n[pretrain] step 30/400 loss 3.8\n")


def test_live_line_on_a_terminal_redraws_a_bar_from_the_count_in_the_progress_line():
    console = io.StringIO()
    live = LiveLine(io.StringIO(), console, "[demo 7/9] evaluate downstream tasks ...", tty=True)
    live.write("[evaluate] task 2/5 next_genre: clue/mlp\n")
    assert (live.bar.n, live.bar.total) == (2, 5)
    live.write("[evaluate] task 3/5 age: clue/logreg\n")
    assert (live.bar.n, live.bar.total) == (3, 5)
    drawn = console.getvalue()
    assert "\r" in drawn and "3/5" in drawn and "[evaluate] task 3/5 age: clue/logreg" in drawn
    live.close()
