"""The demo's stage runner: one console line per stage, the stage's live progress line while it runs, its
output and traceback in the run's log, and the record of finished stages that ``userfm demo --resume`` reuses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from userfm.errors import UserfmError

# A stage's own progress line ("[pretrain] step 120/400 ...", "[evaluate] task 2/5 ...") and the count in it
PROGRESS = re.compile(r"^\[(?:synth|convert|ingest|pretrain|embed|evaluate|report|serve)\]")
COUNT = re.compile(r"\b(\d[\d,]*)/(\d[\d,]*)\b")
PLAIN_EVERY_S = 30.0  # not a terminal: the latest progress line at most this often


class StageFailed(UserfmError):
    """A demo stage raised; the message names the stage, the reason, what is intact and how to resume."""


class Stages:
    """Prints ``[k/n] name ... done in Xs`` lines, keeps the timings, and records every finished stage.

    Quiet (the default): what a stage prints itself goes to ``details`` (the run's ``logs/demo.log``),
    so the console gets one line per stage, ``... done in Xs``, and while it runs its latest progress line
    (:class:`LiveLine`: redrawn in place on a terminal, every 30 s otherwise). With ``details=None``
    (``--verbose``): the start and done lines, and each stage's own output between them.

    ``record``: the run's ``stages.json``, rewritten after each stage with its (JSON) result and seconds.
    ``reuse``: the stages of an earlier run of the same config (``--resume``): a stage found there is not
    run again, its recorded result is returned. A stage that does run first clears its ``outputs`` (what a
    failed earlier attempt may have left). A stage that raises is re-raised as :class:`StageFailed`, its
    traceback in ``details``.
    """

    def __init__(self, total: int, details: TextIO | None = None, record: Path | None = None,
                 config: dict | None = None, reuse: dict | None = None):
        self.total, self.k, self.timings, self.details = total, 0, {}, details
        self.record, self.config, self.reuse, self.done = record, config, dict(reuse or {}), {}

    def run(self, name: str, fn, outputs: tuple[Path, ...] = (), reusable: bool = True):
        self.k += 1
        if reusable and name in self.reuse:
            prev = self.reuse.pop(name)
            self.timings[name] = prev["seconds"]
            self._save(name, prev)
            line = f"[demo {self.k}/{self.total}] {name}: reused from the earlier run ({prev['seconds']:.1f}s then)"
            print(line, flush=True)
            if self.details is not None:
                print(line, file=self.details, flush=True)
            return prev["result"]
        for path in outputs:  # left by an attempt that did not finish
            shutil.rmtree(path, ignore_errors=True)
        start = f"[demo {self.k}/{self.total}] {name} ..."
        tty = self.details is not None and sys.stdout.isatty()  # a live line, redrawn in place, then the done line
        if self.details is None:
            print(start, flush=True)
        t0 = time.perf_counter()
        live = None
        try:
            if self.details is None:
                out = fn()
            else:
                print(start, file=self.details, flush=True)
                live = LiveLine(self.details, sys.stdout, start, tty)
                with contextlib.redirect_stdout(live):
                    out = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if self.details is None:
                raise
            print(f"[demo {self.k}/{self.total}] {name} failed:", file=self.details)
            traceback.print_exc(file=self.details)
            self.details.flush()
            raise StageFailed(f"stage '{name}' failed: {_reason(exc)}") from exc
        finally:
            if live is not None:
                live.close()
        self.timings[name] = round(time.perf_counter() - t0, 2)
        if reusable:
            self._save(name, {"result": out, "seconds": self.timings[name], "outputs": [str(p) for p in outputs]})
        done = f"[demo {self.k}/{self.total}] {name} done in {self.timings[name]:.1f}s"
        if self.details is not None:
            print(done, file=self.details, flush=True)
        print(done, flush=True)
        return out

    def _save(self, name: str, entry: dict) -> None:
        if self.record is None:
            return
        try:
            json.dumps(entry)
        except TypeError:  # not JSON: this stage runs again on --resume
            return
        self.done[name] = entry
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps({"config": self.config, "stages": self.done}, indent=2))
        os.replace(tmp, self.record)


class LiveLine:
    """Where a stage's stdout goes in quiet mode: all of it to ``details`` (the run's log), and its latest
    progress line to the console, so a working stage is told from a hung one.

    On a terminal a tqdm line is redrawn in place: the stage, its elapsed time and the latest progress line,
    with a bar, rate and ETA while that line carries a count ``k/n`` (pretraining steps, evaluate's tasks,
    MiniLM texts); it is cleared when the stage ends. Otherwise (CI, a file) the latest progress line is
    printed as a plain line at most every ``PLAIN_EVERY_S`` seconds.
    """

    def __init__(self, details: TextIO, console: TextIO, label: str, tty: bool):
        self.details, self.console, self.label = details, console, label
        self.pending, self.since = "", time.monotonic()
        self.bar = None
        if tty:
            from tqdm import tqdm

            # the terminal's size once, with a fallback: one that reports 0 x 0 (a pty that `script` opens from
            # a pipe) would make tqdm trim every redraw to nothing and hide the bar below row 0
            size = shutil.get_terminal_size((120, 24))
            self.bar = tqdm(total=None, desc=label, file=console, leave=False, ncols=size.columns, nrows=size.lines,
                            bar_format="{desc} {elapsed}{postfix}")

    def write(self, text: str) -> int:
        self.details.write(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            if PROGRESS.match(line):
                self.show(line)
        return len(text)

    def flush(self) -> None:
        self.details.flush()

    def show(self, line: str) -> None:
        count = COUNT.search(line)
        if self.bar is not None:
            if count:
                k, n = (int(g.replace(",", "")) for g in count.groups())
                if self.bar.total != n:
                    self.bar.bar_format = "{desc} {bar:12} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
                    self.bar.reset(total=n)
                self.bar.n = min(k, n)
            self.bar.set_postfix_str(line, refresh=True)
        elif time.monotonic() - self.since >= PLAIN_EVERY_S:
            print(f"{self.label} {line}", file=self.console, flush=True)
            self.since = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message``: the why of a failed stage, on one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
