"""The quiet console: worker output and Ray's own logs go to a file, our progress lines and errors stay;
``--verbose`` on every subcommand that starts Ray prints Ray's output as Ray does."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from userfm import runtime
from userfm.cli import build_parser, main
from userfm.runtime import WorkerOutput

RAY_SUBCOMMANDS = ["demo", "ingest", "pretrain", "embed", "refresh", "sweep", "serve"]


def test_worker_output_split_keeps_our_progress_lines_once_and_logs_every_line():
    w = WorkerOutput()
    train = {"pid": 7380, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": False}
    console, logged = w.split({**train, "lines": [
        "[pretrain] step 2/20 loss 5.573 samples_per_s 62.23",
        "Reporting training result 1: TrainingReport(checkpoint=None, ...)",
        '__ray_tqdm_magic_token__{"x": 1}',
        "[2026-12-01 06:16:19,187 E 7268 7329] core_worker.cc:2465: Actor with class name ...",
    ]})
    assert console == ["[pretrain] step 2/20 loss 5.573 samples_per_s 62.23"]
    assert logged == [
        "(RayTrainWorker pid=7380) [pretrain] step 2/20 loss 5.573 samples_per_s 62.23",
        "(RayTrainWorker pid=7380) Reporting training result 1: TrainingReport(checkpoint=None, ...)",
        "(RayTrainWorker pid=7380) [2026-12-01 06:16:19,187 E 7268 7329] core_worker.cc:2465: Actor with class name ...",
    ]
    # Ray Train emits each print twice (stdout and its logger): the console shows it once, the file twice
    console, logged = w.split({**train, "lines": ["[pretrain] step 2/20 loss 5.573 samples_per_s 62.23"]})
    assert console == [] and logged == ["(RayTrainWorker pid=7380) [pretrain] step 2/20 loss 5.573 samples_per_s 62.23"]
    # the same text from another process (another trial of a sweep) is its own line; a task on another node
    console, logged = w.split({"pid": 51, "task_name": "f", "ip": "10.0.0.2", "localhost": "10.0.0.1",
                               "lines": ["[pretrain] step 2/20 loss 5.573 samples_per_s 62.23", "[embedx] not ours"]})
    assert console == ["[pretrain] step 2/20 loss 5.573 samples_per_s 62.23"]
    assert logged == ["(f pid=51, ip=10.0.0.2) [pretrain] step 2/20 loss 5.573 samples_per_s 62.23",
                      "(f pid=51, ip=10.0.0.2) [embedx] not ours"]


def test_verbose_flag_on_every_subcommand_that_starts_ray():
    parser = build_parser()
    with_flag = {name for name, p in parser._subparsers._group_actions[0].choices.items()
                 if any(a.dest == "verbose" for a in p._actions)}
    assert with_flag == set(RAY_SUBCOMMANDS)
    for name in RAY_SUBCOMMANDS:
        assert parser.parse_args([name, "--verbose"]).verbose is True
        assert parser.parse_args([name]).verbose is None
    try:
        # main() applies the flag before the command runs (here the command then fails on its config,
        # before Ray starts), and a later command without it is quiet again
        assert main(["pretrain", "--verbose", "--set", "no_such_key=1"]) == 2
        assert runtime.is_verbose() is True
        assert main(["ingest", "--set", "no_such_key=1"]) == 2
        assert runtime.is_verbose() is False
    finally:
        runtime.set_verbose(False)


# A driver that starts Ray through userfm.runtime, runs a task that prints, waits until Ray has forwarded
# that output to this driver (a second listener on Ray's dispatcher, called after ours), then runs a task
# that raises, uncaught.
PROBE = textwrap.dedent("""
    import sys, threading
    from userfm import runtime

    runtime.set_verbose(sys.argv[2] == "verbose")
    runtime.init_ray(num_cpus=1, log_file=sys.argv[1])

    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    seen = threading.Event()
    global_worker_stdstream_dispatcher.add_handler(
        "probe", lambda batch: seen.set() if "worker says 42" in "".join(batch.get("lines", [])) else None)

    @ray.remote
    def chatty():
        print("worker says 42")
        print("[embed] 3 users -> 3 embeddings")
        return 7

    @ray.remote
    def failing():
        raise ValueError("boom")

    @ray.remote
    def niceness():
        import os
        return os.nice(0)

    print("result", ray.get(chatty.remote()), flush=True)
    print("forwarded", seen.wait(60), flush=True)
    import os
    print("worker nice", ray.get(niceness.remote()) - os.nice(0), flush=True)  # relative to the driver's
    ray.get(failing.remote())
""")


def _probe(tmp_path, mode):
    log = tmp_path / "logs" / "ray.log"
    out = subprocess.run([sys.executable, "-c", PROBE, str(log), mode], capture_output=True, text=True, timeout=240)
    return out, log


@pytest.mark.timeout(300)
def test_quiet_console_keeps_progress_and_errors_and_logs_worker_output(tmp_path):
    out, log = _probe(tmp_path, "quiet")
    console = out.stdout + out.stderr
    assert "result 7\nforwarded True\n" in out.stdout
    assert "worker nice 0\n" in out.stdout  # workers at the driver's priority (even a niced one), not Ray's default 15
    assert "worker says 42" not in console  # a worker's print: log file only
    assert out.stdout.count("[embed] 3 users -> 3 embeddings\n") == 1  # our progress line, bare
    assert "(chatty pid=" not in console
    # the failing task's exception still reaches the console, with its message, and fails the driver
    assert out.returncode == 1
    assert "ValueError: boom" in out.stderr
    text = log.read_text()
    assert "stdout (chatty pid=" in text and ") worker says 42\n" in text
    assert ") [embed] 3 users -> 3 embeddings\n" in text
    assert "Started a local Ray instance" in text and "Started a local Ray instance" not in console  # Ray's INFO
    assert "Ray session logs (every Ray process's own files): /" in text


@pytest.mark.timeout(300)
def test_verbose_console_prints_worker_output_as_ray_does(tmp_path):
    out, log = _probe(tmp_path, "verbose")
    assert "result 7\nforwarded True\n" in out.stdout
    prefix = r"\(chatty pid=\d+\)\S* "  # Ray's prefix (and its colour codes), as before quiet mode
    assert re.search(prefix + r"worker says 42\n", out.stdout)
    assert re.search(prefix + r"\[embed\] 3 users -> 3 embeddings\n", out.stdout)
    assert out.returncode == 1 and "ValueError: boom" in out.stderr
    assert not log.exists()  # verbose writes no log file
