"""Connecting to Ray: an embedded local instance by default, an existing cluster with an address.

The console is quiet by default: Ray's own output (its Python loggers' INFO/WARNING lines, Ray Data /
Train / Tune / Serve banners, and everything workers and actors print, forwarded as
``(RayTrainWorker pid=...) ...``) goes to a log file, and the console keeps the stages' own progress
lines, errors (ERROR records, raylet/autoscaler events, exceptions raised by ``ray.get``) and nothing
else. ``set_verbose(True)`` (``--verbose`` on the command line) restores Ray's usual console output.

The log file is ``<Ray session>/logs/userfm.log`` unless the caller names one (``userfm demo`` uses
``<run>/logs/ray.log``); Ray's per-process logs stay in its session folder (``session_logs()``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

# Set before Ray is imported anywhere in this process: no usage reporting from a platform users run
# on their own data, and no hub access for the bundled sentence encoder.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Start-up waits sized for a busy machine. Serve's proxy must answer its readiness check in 5 s, three times,
# or it is killed (and serve.start raises ActorDiedError): on 2 cores with another job using both, it did
# not (issue 28); Train gives its workers 60 s to start. The Ray this process starts (and its actors) inherit
# these; a cluster sets its own.
for _name, _seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"), ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60"),
                        ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")):
    os.environ.setdefault(_name, _seconds)

import ray  # noqa: E402

# A worker line that is one of our own progress lines (rank 0 of pretraining prints "[pretrain] step ..."
# inside a Ray Train worker): it stays on the console in quiet mode, without Ray's "(name pid=...)" prefix.
PROGRESS_LINE = re.compile(r"^\[(?:demo|synth|convert|ingest|pretrain|embed|evaluate|report|sweep|serve|refresh|drift)[\] ]")
# Forwarded "workers" that are the cluster itself: out-of-memory kills, dead workers, unschedulable
# resource requests (the usual sign of a hang). Kept on the console in quiet mode, as Ray prints them.
CLUSTER_PIDS = ("raylet", "autoscaler")
_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray state updates: JSON for Ray's bar renderer
_RAY_PRINTER = "ray_print_logs"  # the name ray.init gives its worker-output printer
_OUR_PRINTER = "userfm_worker_output"
_MAX_PENDING = 10_000  # records kept in memory before the log file is known (ray.init's own lines)


class RayLogFile(logging.Handler):
    """Appends records to a log file; records that arrive before ``open`` are kept and written then
    (``ray.init`` logs before its session folder, the default location, exists)."""

    def __init__(self):
        super().__init__(logging.INFO)
        # its own formatter, not setFormatter's: ray.init re-formats every handler of the "ray" logger
        self._format = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format
        self.path: Path | None = None
        self._stream = None
        self._pending: list[str] = []

    def open(self, path: str | Path) -> None:
        """Write to ``path`` from now on (created with its folder, appended to); the pending records first."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.acquire()
        try:
            if self._stream is not None:
                self._stream.close()
            self._stream = path.open("a", encoding="utf-8")
            self.path = path
            self._stream.writelines(text + "\n" for text in self._pending)
            self._pending.clear()
            self._stream.flush()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler lock held
        try:
            text = self._format(record)
            if self._stream is None:
                if len(self._pending) < _MAX_PENDING:
                    self._pending.append(text)
                return
            self._stream.write(text + "\n")
            self._stream.flush()  # a crash or a Ctrl-C must not lose the lines that explain it
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        finally:
            self.release()
        super().close()


class WorkerOutput:
    """Sorts one batch of worker output (as Ray forwards it to the driver) into console and log-file lines.

    Every line goes to the log file with Ray's ``(name pid=...)`` prefix; our own progress lines
    (``PROGRESS_LINE``) also go to the console, once: Ray Train workers emit each ``print`` twice
    (stdout and its print-to-logger patch), so a line seen from the same process among the last
    ``recent`` progress lines is not shown again.
    """

    def __init__(self, recent: int = 64):
        self._recent: collections.deque = collections.deque(maxlen=recent)

    def split(self, batch: dict) -> tuple[list[str], list[str]]:
        """Returns (console lines, log-file lines) of a batch ``{"pid", "lines", "actor_name"|"task_name", "ip", "localhost"}``."""
        pid = batch.get("pid")
        name = batch.get("actor_name") or batch.get("task_name") or ""
        ip = "" if batch.get("ip") == batch.get("localhost") else f", ip={batch.get('ip')}"
        prefix = f"({name + ' ' if name else ''}pid={pid}{ip})"
        console, logged = [], []
        for line in batch.get("lines", []):
            if _TQDM_MAGIC in line:
                continue  # a progress-bar state update, not text
            logged.append(f"{prefix} {line}")
            if PROGRESS_LINE.match(line) and (pid, line) not in self._recent:
                self._recent.append((pid, line))
                console.append(line)
        return console, logged


class _Console:
    """This process's console settings (one per process, like ``logging``'s own)."""

    verbose = False
    file = RayLogFile()
    workers = WorkerOutput()
    announced: Path | None = None
    saved_levels: dict = {}  # the "ray" logger / a console handler of a ray.* logger -> its level before quiet mode


_output_log = logging.getLogger("userfm.workers")  # forwarded worker lines and our notes: to the log file only
_output_log.propagate = False
_output_log.setLevel(logging.INFO)
_output_log.addHandler(_Console.file)


def set_verbose(verbose: bool) -> None:
    """Ray's output on the console (True: Ray's defaults) or in the log file (False, the default).
    Applies to a running Ray at once, and to every later ``init_ray`` of this process."""
    _Console.verbose = bool(verbose)
    if ray.is_initialized():
        _apply()


def is_verbose() -> bool:
    return _Console.verbose


def log_file() -> Path | None:
    """Where quiet mode writes Ray's output (None until ``init_ray`` has chosen)."""
    return _Console.file.path


def session_logs() -> Path | None:
    """Ray's own log folder of this session (``.../session_*/logs``) when this machine runs a Ray node."""
    node = getattr(ray._private.worker, "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_file: str | Path | None = None) -> None:
    """Start or join Ray once per process, with this process's console settings (``set_verbose``).

    Args:
        address: a cluster address (``ray://...``, ``auto``, ``host:port``); falls back to
            ``RAY_ADDRESS``; with neither, an embedded local Ray is started with ``num_cpus``.
        num_cpus: CPUs for the embedded instance (default: all).
        log_file: quiet mode: the file Ray's output goes to (default: ``<session>/logs/userfm.log``,
            whose path is printed once on stderr). Calling again with another file switches to it.
    """
    # Importing ray.data configures its logger (a console handler of its own): import it before
    # routing loggers, so that quiet mode finds it.
    import ray.data

    _apply_loggers()
    if _Console.verbose:
        # Ray Data logs its execution plan and a progress block per dataset at INFO; the stages print
        # their own one-line progress, so keep Ray Data to warnings (the behaviour before quiet mode).
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    else:
        # a progress-bar block per dataset from the driver would drown the stages' one line each
        ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # no dashboard (saves ~1.5 s and ~100 MB). Workers at the driver's priority: Ray starts them at
            # nice 15, so any other job at nice 0 sharing the cores (and the kernel's scheduling group) took
            # ~97 % of them: with two `while True: pass` loops started from the demo's own shell, ingest took
            # 152 s instead of 6 and MiniLM ran at ~3 % of a core (`ray job submit` drivers do the same: 0)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                     logging_level="WARNING" if _Console.verbose else "INFO", _system_config={"worker_niceness": 0})
    if not _Console.verbose:
        if log_file is not None:
            _open(Path(log_file), announce=False)
        elif _Console.file.path is None:
            logs = session_logs()
            default = logs / "userfm.log" if logs else Path(tempfile.gettempdir()) / "userfm" / f"ray-{os.getpid()}.log"
            _open(default, announce=True)
    _apply()


def _open(path: Path, *, announce: bool) -> None:
    _Console.file.open(path)
    _output_log.info(f"Ray session logs (every Ray process's own files): {session_logs() or 'on the cluster head node'}")
    if announce and _Console.announced != path:
        _Console.announced = path
        print(f"userfm: Ray's own output -> {path} (--verbose prints it here)", file=sys.stderr, flush=True)


def _apply() -> None:
    _apply_loggers()
    _apply_worker_output()


def _ray_loggers() -> list[logging.Logger]:
    names = sorted(n for n, lg in logging.Logger.manager.loggerDict.items()
                   if n.startswith("ray.") and isinstance(lg, logging.Logger))
    return [logging.getLogger("ray")] + [logging.getLogger(n) for n in names]


def _apply_loggers() -> None:
    """Quiet: every console handler of a ``ray.*`` logger shows ERROR and above only, and each logger
    that does not pass its records up to ``ray`` (Ray Data, Serve, ... have their own handlers) also
    writes to the log file. Verbose: the handlers' own levels back, no log file. Idempotent; run on
    every ``init_ray``, since importing a Ray library (Serve) installs its handlers then."""
    quiet = not _Console.verbose
    ray_logger = logging.getLogger("ray")
    if quiet and ray_logger.level > logging.INFO:
        _Console.saved_levels.setdefault(ray_logger, ray_logger.level)
        ray_logger.setLevel(logging.INFO)  # the log file gets what --verbose would show
    elif not quiet and ray_logger in _Console.saved_levels:
        ray_logger.setLevel(_Console.saved_levels.pop(ray_logger))
    for lg in _ray_loggers():
        for h in lg.handlers:
            if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
                continue  # files (Ray's session logs) keep what they log
            if quiet and h.level < logging.ERROR:
                _Console.saved_levels.setdefault(h, h.level)
                h.setLevel(logging.ERROR)
            elif not quiet and h in _Console.saved_levels:
                h.setLevel(_Console.saved_levels.pop(h))
        ours = _Console.file in lg.handlers
        if quiet and not ours and (lg.name == "ray" or not lg.propagate):
            lg.addHandler(_Console.file)
        elif not quiet and ours:
            lg.removeHandler(_Console.file)


def _apply_worker_output() -> None:
    """Swap ray.init's worker-output printer for ours (quiet) or back (verbose).

    ``log_to_driver=False`` would silence workers too, but also our own progress lines that rank 0
    prints inside a Ray Train worker; so output is still forwarded, and sorted here. The dispatcher is
    Ray-internal (``ray._private``): ray is pinned to 2.60, and tests/test_runtime.py checks both ways.
    """
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    names = {name for name, _ in dispatcher.handlers}
    if not names & {_RAY_PRINTER, _OUR_PRINTER}:
        return  # Ray does not forward worker output to this driver (log_to_driver=False)
    dispatcher.remove_handler(_RAY_PRINTER)
    dispatcher.remove_handler(_OUR_PRINTER)
    if _Console.verbose:
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.add_handler(_RAY_PRINTER, functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix))
    else:
        dispatcher.add_handler(_OUR_PRINTER, _print_quietly)


def _print_quietly(batch: dict) -> None:
    """The quiet printer: cluster events on stderr as Ray prints them, our progress lines bare, the rest to the file."""
    from ray._private.worker import filter_autoscaler_events, print_to_stdstream

    pid = batch.get("pid")
    if pid in CLUSTER_PIDS:
        # stderr: not hidden by a caller that sends a stage's stdout to its log (userfm demo)
        print_to_stdstream({**batch, "is_err": True}, ignore_prefix=False)
        # the autoscaler also forwards its whole status table every few seconds; Ray prints only its events
        lines = filter_autoscaler_events(batch.get("lines", [])) if pid == "autoscaler" else batch.get("lines", [])
        for line in lines:
            _output_log.warning(f"({pid}) {line}")
        return
    console, logged = _Console.workers.split(batch)
    stream = "stderr" if batch.get("is_err") else "stdout"
    for line in logged:
        _output_log.info(f"{stream} {line}")
    for line in console:
        print(line, flush=True)


def map_batches_without_restarts(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` for our actor pools (MiniLM, embed), with actor restarts off.

    Ray Data's default restarts a dead actor forever, which cannot work for an actor whose constructor
    arguments live in the object store, and Ray's core worker says so in a raw error line on the console
    (issue 28); here a dead actor fails the job with its error. Ray 2.60 (pinned) takes ``max_restarts``
    only as an extra keyword (``**ray_remote_args``) or through ``ray_remote_args_fn``, both marked
    deprecated (removal in 2.64, no named parameter for it yet): that warning is silenced here, the one
    place that uses it.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_restarts=0, **kwargs)  # (**ray_remote_args in 2.60)


def cluster_cpus() -> int:
    """CPUs Ray can schedule on (the whole cluster)."""
    return int(ray.cluster_resources().get("CPU", 1))
