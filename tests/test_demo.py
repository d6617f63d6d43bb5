"""The demo's console: one line per stage by default, each stage's own output in the run's log."""

from __future__ import annotations

import io
import re

import pytest

from userfm.demo import _Stages


def _stage(msg):
    def fn():
        print(msg)
        return 41 + 1
    return fn


def test_quiet_stages_print_one_line_each_and_log_what_they_print(capsys):
    details = io.StringIO()
    stages = _Stages(2, details)
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
    stages = _Stages(1, None)
    stages.run("ingest with Ray Data", _stage("[ingest] pass 1: 9 rows"))
    assert re.fullmatch(r"\[demo 1/1\] ingest with Ray Data \.\.\.\n\[ingest\] pass 1: 9 rows\n"
                        r"\[demo 1/1\] ingest with Ray Data done in \d+\.\ds\n", capsys.readouterr().out)


def test_a_failing_quiet_stage_raises_and_its_output_stays_in_the_log(capsys):
    details = io.StringIO()

    def fails():
        print("[ingest] reading")
        raise ValueError("bad row 7")

    with pytest.raises(ValueError, match="bad row 7"):
        _Stages(3, details).run("ingest with Ray Data", fails)
    assert capsys.readouterr().out == ""
    assert details.getvalue() == "[demo 1/3] ingest with Ray Data ...\n[ingest] reading\n"


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
