"""Training throughput: plain PyTorch vs Ray Train (1 worker) vs Ray Train (2 workers, weak scaling), and CPU MFU.

Same model, data and per-worker batch in the three setups, every worker on 1 torch thread:

  (a) plain:  one process, ``torch.set_num_threads(1)``, the pieces ``worker.train_loop`` uses
              (``pretrain.featurize`` on the train split, ``features.bucket_by_length`` over
              ``bucket_batches`` batches, ``step_inputs``, ``features.trim_events``,
              ``loss_and_backward``, gradient clipping, AdamW with ``lr_at``), no Ray in the loop;
  (b) ray x1: ``run_pretrain(num_workers=1, threads_per_worker=1)`` (Ray Train v2, materialized
              Ray Datasets, ``iter_batches`` on the worker's shard);
  (c) ray x2: the same with ``num_workers=2`` (DDP over gloo): the global batch doubles (weak scaling);
  (a') reference: (a) without bucketing or trimming, every view padded to ``max_events`` (what the
              loop did before): shows what bucketing + trimming gain;
  (c') reference: (a) as DDP over 2 spawned processes (gloo, 1 thread each), no Ray: separates
              what 2-core DDP costs from what Ray costs.
  (a") with ``--ref-dropout P``: (a) at dropout P, in the same repeats (what dropout's masks cost).
  (a*) with ``--ref-compile``: (a) with the encoder under ``torch.compile(dynamic=True)``
              (``PretrainConfig.compile``), in the same repeats (what the compiler buys on this CPU).

Samples/s are read after warm-up: the first log interval (``--log-every`` steps) is dropped, and the
rest is total samples / total time of the remaining intervals (for (b)/(c) from the run's
``metrics.jsonl``; (a) times its intervals the same way). With ``--repeats`` > 1 the median is shown.

MFU = achieved model FLOP/s per worker / the fp32 matmul peak of one thread, measured in this script
(``pretrain.measure_peak_flops(1)``, 1024^3 matmuls). Model FLOPs are ``encoders.flops_per_sample``
(6 x non-embedding parameters per token + attention) over the real events of each sample and view;
the "padded" column counts the events the model actually computes (every view is padded to
``max_events``), i.e. hardware FLOPs. The peak with both cores busy (two 1-thread processes at once)
is reported too: on a 2-vCPU VM it tells whether the second core is a full core. The "others" column
is the CPU (in cores) that processes outside this benchmark's process tree used during each setup
(on a shared machine: someone else's tests); numbers taken while it is well above 0 are not clean.

    .venv/bin/python experiments/benchmarks/train_throughput.py                  # small, clue, category
    .venv/bin/python experiments/benchmarks/train_throughput.py --size tiny --steps 40
    .venv/bin/python experiments/benchmarks/train_throughput.py --repeats 5 --steps 100 --no-reference

Targets (issue): b/a >= 0.95, c/b >= 1.6, MFU >= 40 % for ``small``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

TARGETS = {"b/a": 0.95, "c/b": 1.6, "mfu": 0.40}
PADDED = "a'"  # the plain loop without bucketing or trimming (views padded to max_events)
PLAIN_DDP = "c'"  # the plain loop as DDP over 2 processes, no Ray
DROPOUT_REF = 'a"'  # the plain loop at --ref-dropout (side by side with (a) at the run's dropout)
COMPILED = "a*"  # the plain loop with the encoder under torch.compile (--ref-compile)


# ------------------------------------------------------------------------------------------- data


def make_dataset(work: Path, n_users: int, events_per_user: float, seed: int) -> str:
    """Synthetic logs -> ingested sequence dataset (on the already-started Ray)."""
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig

    quiet = lambda _msg: None  # noqa: E731
    generate(SynthConfig(n_users=n_users, events_per_user=events_per_user, seed=seed), work / "synth", quiet)
    run_ingest(IngestConfig(inputs=(str(work / "synth" / "events"),), out=str(work / "data")), progress=quiet)
    return str(work / "data")


def featurized_train(cfg):
    """What ``run_pretrain`` feeds the workers, built in-process: (vocabs, tokenizer, enc_cfg, rows)."""
    from userfm.data.dataset import read_sequences
    from userfm.models.encoders import config_for
    from userfm.train.pretrain import _fit_resources
    from userfm.train.steps import featurize

    train = read_sequences(cfg.data, split="train")
    vocabs, tok = _fit_resources(cfg, train)
    enc_cfg = config_for(cfg.size, vocabs, tok, item_encoder=cfg.item_encoder, out_dim=cfg.out_dim,
                         pooling=cfg.pooling, dropout=cfg.dropout, max_events=cfg.max_events)
    kwargs = dict(split="train", objective=cfg.objective, vocabs_json=vocabs.to_json(),
                  tokenizer_json=tok.to_json() if tok else None, vectors_dir=None, max_events=cfg.max_events,
                  single_service=cfg.single_service, seed=cfg.seed)
    parts = [featurize(train.slice(i, 512), **kwargs) for i in range(0, train.num_rows, 512)]  # as map_batches(512)
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return vocabs, tok, enc_cfg, rows


def flops_per_row(cfg, enc_cfg, rows) -> tuple[float, float]:
    """(model FLOPs per sample over real events, FLOPs per sample as computed: views padded to max_events)."""
    from userfm.models.encoders import flops_per_sample

    keys = ["length"] if cfg.objective == "mlm" else ["a.length", "b.length"]
    cache: dict[int, float] = {}

    def f(n: int) -> float:
        if n not in cache:
            cache[n] = flops_per_sample(enc_cfg, n_events=max(1, int(n)), n_tokens=cfg.max_text_tokens)
        return cache[n]

    useful = sum(float(np.mean([f(n) for n in rows[k]])) for k in keys)
    padded = len(keys) * f(cfg.max_events)
    return useful, padded


def _batches(cfg, rows, epoch: int, bucketed: bool):
    """One epoch of index batches as the worker sees them: a seeded shuffle (the local-shuffle
    stand-in), then (``bucketed``) ``bucket_by_length`` over ``cfg.bucket_batches`` batches."""
    from userfm.models.features import batch_lengths, bucket_by_length
    from userfm.train.steps import step_seed

    n = len(next(iter(rows.values())))
    order = np.random.default_rng(cfg.seed + epoch).permutation(n)
    plain = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n // cfg.batch_size)]
    if not bucketed:
        return plain
    lengths = batch_lengths(rows)
    tagged = ({"idx": b, "length": lengths[b]} for b in plain)
    return [b["idx"] for b in bucket_by_length(tagged, cfg.bucket_batches, seed=step_seed(cfg.seed, epoch, 0))]  # as train_loop


def padding_stats(cfg, rows) -> dict[str, float]:
    """Real events / computed events: padded to max_events; random batches trimmed to their longest
    view; length-bucketed batches (as the training loop makes them), trimmed."""
    from userfm.models.features import batch_lengths

    keys = ["length"] if cfg.objective == "mlm" else ["a.length", "b.length"]
    real = float(np.mean([np.mean(rows[k]) for k in keys]))
    longest = batch_lengths(rows)
    random_w = [longest[b].max() for b in _batches(cfg, rows, 0, bucketed=False)]
    bucket_w = [longest[b].max() for b in _batches(cfg, rows, 0, bucketed=True)]
    return {"padded": real / cfg.max_events, "trimmed": real / float(np.mean(random_w)),
            "bucketed": real / float(np.mean(bucket_w))}


class CpuMeter:
    """CPU (in cores) over a span: this benchmark's Train workers, the rest of its process tree (driver,
    embedded Ray's GCS, raylet, actors, idle workers), and everything else on the machine ("others":
    on a shared box, someone else's tests). Sampled every 0.5 s per process, so processes that exit
    (Ray workers at the end of a run) keep the CPU time last seen."""

    def __init__(self, interval: float = 0.5):
        import threading

        import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
        import psutil

        self.psutil, self.interval = psutil, interval
        self.first: dict[tuple, float] = {}
        self.last: dict[tuple, float] = {}
        self.label: dict[tuple, str] = {}
        self.timeline: list[tuple[float, float, bool]] = []  # (time, CPU s of "ray" so far, a Train worker alive)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def _sample(self, initial: bool = False) -> None:
        me = self.psutil.Process()
        worker_alive = False
        for p in [me, *me.children(recursive=True)]:  # embedded Ray: GCS, raylet, workers are descendants
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                cpu = t.user + t.system
                if key not in self.label:
                    self.label[key] = "ray"
                    self.first[key] = cpu if initial else 0.0
                if self.label[key] == "ray" and p.pid != me.pid and (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                    self.label[key] = "worker"  # a pooled ray::IDLE process that became a Train worker
                self.last[key] = cpu
                worker_alive |= self.label[key] == "worker"
            except self.psutil.Error:
                pass
        ray_cpu = sum(c - self.first[k] for k, c in self.last.items() if self.label[k] == "ray")
        self.timeline.append((time.perf_counter(), ray_cpu, worker_alive))

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self.t0, self.busy0 = time.perf_counter(), self._busy()
        self._sample(initial=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()
        dt = time.perf_counter() - self.t0
        used = {"worker": 0.0, "ray": 0.0}
        for key, cpu in self.last.items():
            used[self.label[key]] += cpu - self.first[key]
        self.workers = used["worker"] / dt
        self.ray = used["ray"] / dt  # includes the driver: for (a) that is the training loop itself
        alive = [(t, c) for t, c, w in self.timeline if w]
        # driver + Ray processes while the Train workers lived (start-up, training, report, shutdown)
        self.ray_train = (alive[-1][1] - alive[0][1]) / (alive[-1][0] - alive[0][0]) if len(alive) > 1 else 0.0
        self.others = max(0.0, self._busy() - self.busy0 - used["worker"] - used["ray"]) / dt


def settle(timeout: float = 20.0) -> None:
    """Wait until this process tree is idle (the previous run's Ray workers have exited)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with CpuMeter() as m:
            time.sleep(1.0)
        if m.workers + m.ray < 0.15:
            return


# ------------------------------------------------------------------------------------------ peaks


def _peak_worker(q, seconds: float) -> None:
    from userfm.train.steps import measure_peak_flops

    q.put(measure_peak_flops(1, seconds=seconds))


def measure_peaks(seconds: float = 2.0) -> tuple[float, float]:
    """(1-thread fp32 matmul FLOP/s alone, mean per-process FLOP/s with two 1-thread processes at once)."""
    from userfm.train.steps import measure_peak_flops

    alone = max(measure_peak_flops(1, seconds=seconds) for _ in range(2))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_peak_worker, args=(q, seconds)) for _ in range(2)]
    for p in procs:
        p.start()
    both = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return alone, float(np.mean(both))


# ----------------------------------------------------------------------------------------- setups


def plain_loop(cfg, enc_cfg, rows, steps: int, log_every: int, bucketed: bool = True, compiled: bool = False) -> float:
    """(a) train_loop's step, in this process, 1 thread, no Ray. Returns samples/s after the first interval.

    ``bucketed=False``: (a') every batch padded to ``max_events``, no bucketing or trimming.
    ``compiled``: (a*) the encoder under ``torch.compile(dynamic=True)``, as ``PretrainConfig.compile``
    (compilation falls in the first, warm-up interval; later recompiles count).
    With torch.distributed initialized (:func:`plain_ddp`): DDP over the ranks, each on its own rows.
    """
    import torch

    from userfm.models.encoders import UserEncoder
    from userfm.models.features import to_torch, trim_events
    from userfm.objectives.pretext import build_head, loss_and_backward
    from userfm.train.steps import _objective_config, lr_at, step_inputs, step_seed
    from userfm.train.worker import make_optimizer

    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:
        rows = {k: v[rank::world] for k, v in rows.items()}  # a shard per rank, as Ray Train's split
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    ocfg = _objective_config(cfg)
    model = UserEncoder(enc_cfg)
    head = build_head(ocfg, enc_cfg)
    params = list(model.parameters()) + list(head.parameters())
    opt = make_optimizer(params, cfg)  # the same optimizer as worker.train_loop
    no_sync = None
    if world > 1:  # what ray.train.torch.prepare_model does on CPU
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        no_sync = model.no_sync
    if compiled:
        model = torch.compile(model, dynamic=True)
    model.train()
    key = "length" if "length" in rows else "a.length"
    step, epoch, windows = 0, 0, []
    t0, samples = time.perf_counter(), 0
    while step < steps:
        for idx in _batches(cfg, rows, epoch, bucketed):
            if step >= steps:
                break
            nb = {k: v[idx] for k, v in rows.items()}
            seed = step_seed(cfg.seed, step, rank)
            torch.manual_seed(seed)
            nb_step = step_inputs(nb, cfg, np.random.default_rng(seed))
            batch = to_torch(trim_events(nb_step) if bucketed else nb_step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):  # as train_loop
                loss, _metrics = loss_and_backward(model, head, batch, ocfg, no_sync=no_sync)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            float(loss)
            step += 1
            samples += len(nb[key])
            if step % log_every == 0 or step >= steps:
                windows.append((samples, time.perf_counter() - t0))
                t0, samples = time.perf_counter(), 0
        epoch += 1
    torch.set_num_threads(old_threads)
    rest = windows[1:] or windows
    return sum(s for s, _ in rest) / sum(t for _, t in rest)


def _ddp_rank(rank: int, world: int, port: int, args: tuple, q) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, plain_loop(*args)))
    finally:
        dist.destroy_process_group()


def plain_ddp(cfg, enc_cfg, rows, steps: int, log_every: int, world: int = 2) -> float:
    """(c') :func:`plain_loop` as DDP over ``world`` processes (gloo), no Ray. Returns samples/s of all ranks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, (cfg, enc_cfg, rows, steps, log_every), q))
             for r in range(world)]
    for p in procs:
        p.start()
    out = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(sps for _, sps in out)


def ray_run(cfg, work: Path, tag: str) -> dict:
    """(b)/(c) ``run_pretrain``; samples/s (all workers) from metrics.jsonl after the first interval."""
    from userfm.train.pretrain import run_pretrain

    out = work / f"run-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = replace(cfg, out=str(out))
    t0 = time.perf_counter()
    summary = run_pretrain(cfg, progress=lambda _msg: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_s" in r]
    samples, seconds, prev = [], [], 0
    for r in rows:
        s = (r["step"] - prev) * cfg.batch_size * cfg.num_workers
        samples.append(s)
        seconds.append(s / r["samples_per_s"])
        prev = r["step"]
    k = 1 if len(rows) > 1 else 0
    sps = sum(samples[k:]) / sum(seconds[k:])
    shutil.rmtree(out, ignore_errors=True)
    return {"samples_per_s": sps, "wall_s": wall, "train_s": summary["train_seconds"]}


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="named encoder size (tiny | small | base | large)")
    ap.add_argument("--objective", default="clue", help="mlm | simclr | clue")
    ap.add_argument("--item-encoder", default="category", help="category | text (minilm: not benchmarked here)")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run (the first --log-every are warm-up)")
    ap.add_argument("--log-every", type=int, default=10, help="steps per timing interval")
    ap.add_argument("--batch-size", type=int, default=32, help="users (clue: user pairs) per worker per step")
    ap.add_argument("--bucket-batches", type=int, default=8, help="length bucketing group in (a), (b), (c) (1 = off)")
    ap.add_argument("--max-events", type=int, default=64, help="events per view (PretrainConfig.max_events)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setup (median reported)")
    ap.add_argument("--users", type=int, default=4000, help="synthetic users in the dataset")
    ap.add_argument("--events-per-user", type=float, default=30.0, help="mean events per synthetic user")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPU reservation per Train worker")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference rows (a') length-bucketed plain loop and (c') plain DDP without Ray")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed after)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: every setup under torch.autocast(bfloat16) (CPUs with AMX / AVX512-BF16); MFU stays "
                         "relative to the fp32 peak (the target's denominator), the bf16 peak is printed next to it")
    ap.add_argument("--dropout", type=float, default=None,
                    help="encoder dropout (default: PretrainConfig's); 0 skips the masks, ~28 %% of a small step")
    ap.add_argument("--ref-dropout", type=float, default=None, metavar="P",
                    help="add (a\"): the plain loop at dropout P, timed in the same repeats as (a)")
    ap.add_argument("--ref-compile", action="store_true",
                    help="add (a*): the plain loop with the encoder under torch.compile(dynamic=True), same repeats")
    ap.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = ap.parse_args()
    if args.item_encoder == "minilm":
        ap.error("--item-encoder minilm needs the MiniLM vector cache; use category or text")

    import ray
    import torch

    from userfm.models.encoders import UserEncoder, expected_num_params
    from userfm.train.pretrain_config import PretrainConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="userfm-tput-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        peaks = [measure_peaks()]  # again before every repeat; the best of them is the machine's
        # log_to_driver off: the workers' per-interval lines would bury the table (--verbose shows them)
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=args.verbose,
                 logging_level="WARNING")
        import logging

        import ray.data  # noqa: F401  (configures its loggers on import: set the levels after)

        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)

        t0 = time.perf_counter()
        data = make_dataset(work, args.users, args.events_per_user, seed=0)
        data_s = time.perf_counter() - t0
        cfg = PretrainConfig(
            data=data, objective=args.objective, item_encoder=args.item_encoder, size=args.size,
            max_events=args.max_events, batch_size=args.batch_size, max_steps=args.steps, bucket_batches=args.bucket_batches,
            warmup_steps=min(10, args.steps), num_workers=1, threads_per_worker=1,
            cpus_per_worker=args.cpus_per_worker, log_every=args.log_every, eval_every=0,
            eval_batches=1, checkpoint_every=10**9, keep_checkpoints=1, max_failures=0,
            peak_flops=peaks[0][0],  # set: the workers skip their own 1 s measurement
            precision=args.precision, **({} if args.dropout is None else {"dropout": args.dropout}),
        )
        prepared = featurized_train(cfg)
        enc_cfg, rows = prepared[2], prepared[3]
        useful_f, padded_f = flops_per_row(cfg, enc_cfg, rows)
        eff = padding_stats(cfg, rows)
        n_rows = len(next(iter(rows.values())))
        n_params = sum(p.numel() for p in UserEncoder(enc_cfg).parameters())
        if n_rows < args.batch_size * 2:
            raise SystemExit(f"{n_rows} training rows < {args.batch_size * 2} (batch x 2 workers): raise --users")

        setups = ["a", "b", "c"] if args.no_reference else ["a", PADDED, "b", "c", PLAIN_DDP]
        if args.ref_dropout is not None:
            setups.insert(1, DROPOUT_REF)
        if args.ref_compile:
            setups.insert(1, COMPILED)
        results: dict[str, list[float]] = {k: [] for k in setups}
        cpu: dict[str, list[CpuMeter]] = {k: [] for k in setups}
        extra: dict[str, list[dict]] = {"b": [], "c": []}
        for r in range(args.repeats):
            if r:
                settle()
                peaks.append(measure_peaks())
            for k in setups:
                settle()  # the previous run's Ray workers are gone
                with CpuMeter() as meter:
                    if k in ("a", PADDED):
                        results[k].append(plain_loop(cfg, enc_cfg, rows, args.steps, args.log_every, bucketed=k != PADDED))
                    elif k == COMPILED:
                        results[k].append(plain_loop(cfg, enc_cfg, rows, args.steps, args.log_every, compiled=True))
                    elif k == DROPOUT_REF:
                        results[k].append(plain_loop(replace(cfg, dropout=args.ref_dropout), replace(enc_cfg, dropout=args.ref_dropout),
                                                     rows, args.steps, args.log_every))
                    elif k == PLAIN_DDP:
                        results[k].append(plain_ddp(cfg, enc_cfg, rows, args.steps, args.log_every))
                    else:
                        res = ray_run(replace(cfg, num_workers=1 if k == "b" else 2), work, f"{k}{r}")
                        results[k].append(res["samples_per_s"])
                        extra[k].append(res)
                cpu[k].append(meter)
            print(f"  repeat {r + 1}/{args.repeats}: " + "  ".join(f"{k} {results[k][-1]:.1f}" for k in setups)
                  + " samples/s; CPU of other processes " + " ".join(f"{cpu[k][-1].others:.2f}" for k in setups)
                  + " cores", flush=True)
        ray.shutdown()
        peak, peak_both = max(p[0] for p in peaks), max(p[1] for p in peaks)

        med = {k: statistics.median(v) for k, v in results.items()}
        workers = {"a": 1, PADDED: 1, "b": 1, "c": 2, PLAIN_DDP: 2, DROPOUT_REF: 1, COMPILED: 1}
        ratio_ba, ratio_cb = med["b"] / med["a"], med["c"] / med["b"]
        mean_ev = eff["padded"] * args.max_events

        views = 1 if args.objective == "mlm" else 2
        print()
        print(f"userfm train throughput: size={args.size} objective={args.objective} item_encoder={args.item_encoder} "
              f"batch={args.batch_size}/worker steps={args.steps} (first {args.log_every} = warm-up) "
              f"repeats={args.repeats} (median) dropout={cfg.dropout} precision={cfg.precision}")
        print(f"torch {torch.__version__}, ray {ray.__version__}, {len(os.sched_getaffinity(0))} CPUs; dataset: {args.users} users, "
              f"{n_rows} training rows, {views} view(s)/sample, mean {mean_ev:.1f} real events/view "
              f"(built in {data_s:.0f} s)")
        print(f"model: d {enc_cfg.d_model}, {enc_cfg.n_layers} layers, {n_params / 1e6:.2f}M params "
              f"({expected_num_params(enc_cfg, non_embedding=True) / 1e6:.2f}M non-embedding; "
              f"{4 * n_params / 1e6:.1f} MB of gradients all-reduced per step in (c))")
        print(f"FLOPs/sample: {useful_f / 1e6:.1f} M on real events (MFU numerator); {padded_f / 1e6:.1f} M as computed "
              f"with views padded to {args.max_events}")
        print(f"real / computed events: {100 * eff['padded']:.0f} % padded to {args.max_events}; "
              f"{100 * eff['trimmed']:.0f} % with random batches trimmed to their longest view (heavy tail: "
              f"most batches hold a long user); {100 * eff['bucketed']:.0f} % with length-bucketed batches, trimmed")
        if args.precision == "bf16":
            from userfm.train.steps import measure_peak_flops

            bf16_peak = measure_peak_flops(1, dtype=torch.bfloat16)
            print(f"precision bf16 (autocast): bf16 matmul peak, 1 thread: {bf16_peak / 1e9:.1f} GFLOP/s "
                  f"({bf16_peak / peak:.1f}x the fp32 peak); MFU below is against the fp32 peak")
        print(f"fp32 matmul peak, 1 thread: {peak / 1e9:.1f} GFLOP/s alone; {peak_both / 1e9:.1f} GFLOP/s per "
              f"process with 2 processes at once ({2 * peak_both / peak:.2f}x of one); best of {len(peaks)} "
              f"measurements [{' '.join(f'{a / 1e9:.0f}/{b / 1e9:.0f}' for a, b in peaks)}]")
        print()
        print(f"{'setup':<40} {'workers':>7} {'samples/s':>10} {'/worker':>8} {'GFLOP/s/w':>9} "
              f"{'MFU':>6} {'MFU pad':>7} {'ray bg':>6} {'others':>6}  runs")
        names = {"a": "(a)  plain PyTorch, 1 thread", "b": "(b)  Ray Train, 1 worker x 1 thread",
                 "c": "(c)  Ray Train, 2 workers x 1 thread", PADDED: "(a') ref: (a), padded to max_events",
                 PLAIN_DDP: "(c') ref: plain DDP, 2 procs, no Ray",
                 DROPOUT_REF: f'(a") ref: (a) at dropout {args.ref_dropout}',
                 COMPILED: "(a*) ref: (a) under torch.compile"}
        mfu = {}
        for k in sorted(setups, key=["a", "b", "c", PADDED, DROPOUT_REF, COMPILED, PLAIN_DDP].index):
            per_w = med[k] / workers[k]
            mfu[k] = per_w * useful_f / peak
            pad = f"{100 * per_w * padded_f / peak:>6.1f}%" if k == PADDED else f"{'-':>7}"
            bg = f"{statistics.median(m.ray_train for m in cpu[k]):>6.2f}" if k in ("b", "c") else f"{'-':>6}"
            runs = " ".join(f"{v:.1f}" for v in results[k])
            print(f"{names[k]:<40} {workers[k]:>7} {med[k]:>10.1f} {per_w:>8.1f} {per_w * useful_f / 1e9:>9.2f} "
                  f"{100 * mfu[k]:>5.1f}% {pad} {bg} {statistics.median(m.others for m in cpu[k]):>6.2f}  [{runs}]")
        print("  MFU: model FLOPs on real events / 1-thread matmul peak, per worker; MFU pad: FLOPs as computed "
              "by (a') (views padded to max_events);\n  ray bg: CPU cores used by the driver + Ray's own processes "
              "(GCS, raylet, Train controller, Data actors) besides the Train workers,\n  while the workers "
              "were alive; others: CPU cores used by processes outside this benchmark (medians)")
        print()
        ok = lambda v, t: "ok" if v >= t else "MISSED"  # noqa: E731
        print(f"b/a = {ratio_ba:.3f}   (target >= {TARGETS['b/a']})  {ok(ratio_ba, TARGETS['b/a'])}")
        print(f"c/b = {ratio_cb:.3f}   (target >= {TARGETS['c/b']})  {ok(ratio_cb, TARGETS['c/b'])}"
              f"   [matmul-only ceiling with both cores busy: {2 * peak_both / peak:.2f}"
              + (f"; plain DDP without Ray c'/a: {med[PLAIN_DDP] / med['a']:.3f}" if PLAIN_DDP in med else "") + "]")
        note = (f"   [without bucketing/trimming (a'): {100 * mfu[PADDED]:.1f} %; bucketing speed-up a/a' "
                f"{med['a'] / med[PADDED]:.2f}x]" if PADDED in mfu else "")
        print(f"MFU (b) = {100 * mfu['b']:.1f} %  (target >= {100 * TARGETS['mfu']:.0f} %)  {ok(mfu['b'], TARGETS['mfu'])}{note}")
        if COMPILED in med:
            print(f"torch.compile(dynamic=True) vs eager: a*/a = {med[COMPILED] / med['a']:.2f}x "
                  f"(per repeat: {' '.join(f'{y / x:.2f}' for x, y in zip(results['a'], results[COMPILED]))})")
        if DROPOUT_REF in med:
            print(f"dropout {cfg.dropout} vs {args.ref_dropout}: a/a\" = {med['a'] / med[DROPOUT_REF]:.2f}x "
                  f"(per repeat: {' '.join(f'{x / y:.2f}' for x, y in zip(results['a'], results[DROPOUT_REF]))})")
        print()
        print("per repeat (the medians above mix clean and disturbed repeats on a shared machine):")
        for r in range(args.repeats):
            others = max(cpu[k][r].others for k in setups)
            flag = "clean" if others < 0.25 else "disturbed"
            print(f"  repeat {r + 1}: b/a {results['b'][r] / results['a'][r]:.3f}  c/b {results['c'][r] / results['b'][r]:.3f}"
                  f"  MFU(b) {100 * results['b'][r] * useful_f / peak:.1f} %  max CPU of other processes {others:.2f} cores: {flag}")
        for k in ("b", "c"):
            e = extra[k]
            print(f"{names[k].strip()}: run_pretrain wall {statistics.median(x['wall_s'] for x in e):.1f} s "
                  f"(trainer.fit {statistics.median(x['train_s'] for x in e):.1f} s) for {args.steps} steps")
        print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
