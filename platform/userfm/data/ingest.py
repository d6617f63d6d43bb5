"""``userfm ingest``: raw event logs -> validated, quarantined, per-user sequence dataset, on Ray Data.

Two Ray Data passes, each a plain ``map_batches`` over independent blocks, so the same code scales
from this laptop to a cluster (with a shared filesystem or object store for ``out``):

1. read (Parquet / CSV / JSON lines, any pyarrow filesystem) -> ``validate.validate_batch`` ->
   quarantined rows to ``quarantine`` files, kept rows hash-partitioned by user and spilled as one
   Parquet file per (block, partition). Each task returns its counts and the files it wrote.
2. one task per partition reads exactly the spill files listed by pass 1 (a retried task's orphan
   files are never read twice) and runs ``sequences.build_partition``: sort, dedupe, group.

The driver adds the counts up, checks ``rows_in == rows_kept + rows_quarantined``, and writes the
manifest last: a dataset folder with a manifest is complete.

Layout of ``out``::

    manifest.json               counts, config, schema version, file list
    events/part-*.parquet       clean events (EVENT_SCHEMA), sorted by user, ts
    sequences/all/part-*.parquet         one row per user (SEQUENCE_SCHEMA, scope "all")
    sequences/by_service/part-*.parquet  one row per (user, service)
    quarantine.parquet          every rejected row: source, reason, detail, raw
    attributes/<name>.parquet   each --attributes table, with a split column
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from userfm import runtime  # sets Ray's env defaults before ray is imported
from userfm.config import to_dict
from userfm.errors import UserfmError
from userfm.data.schema import EVENT_COLUMNS, QUARANTINE_SCHEMA, SCHEMA_VERSION
from userfm.data.sequences import assign_split, build_partition, check_fractions, partition_of
from userfm.data.validate import REASONS, Rules, _clean_string, parse_json_lines, validate_batch

import ray  # noqa: E402  (after runtime: env defaults)

FORMATS = ("parquet", "csv", "jsonl")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
}
# In-memory Arrow size is ~4x the Parquet size for event logs; aim at ~128 MB per partition so one
# partition's sort fits comfortably in a worker.
_PARTITION_BYTES = 128 * 1024**2
_MEMORY_PER_PARQUET_BYTE = 4


class IngestError(UserfmError, RuntimeError):
    """Input that cannot be ingested (names the file or field) or an accounting failure."""


@dataclass(frozen=True)
class IngestConfig:
    inputs: tuple[str, ...] = ()  # files, folders or local globs; local paths or pyarrow URIs (s3://...)
    out: str = ""  # output folder of the sequence dataset (local path or URI)
    format: str = "auto"  # parquet | csv | jsonl | auto (by extension: .parquet .csv .jsonl/.json)
    attributes: tuple[str, ...] = ()  # user tables (user_id + label columns), Parquet or CSV
    services: tuple[str, ...] | None = None  # allowed services; None = any
    ts_min: str = "1980-01-01"  # earliest valid event time (ISO, UTC if no zone), inclusive
    ts_max: str = "2100-01-01"  # latest valid event time, exclusive
    numeric_ts_unit: str = "s"  # unit of numeric timestamps: s | ms | us | ns since the epoch
    max_text_chars: int = 512  # longer text is cut (long_text=truncate) or quarantined (reject)
    long_text: str = "truncate"  # truncate | reject
    category_sep: str = " > "  # separator of category paths given as one string (CSV)
    max_events: int = 256  # most recent events kept per sequence (events)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / val / test fractions of users
    partitions: int = 0  # user hash partitions; 0 = auto (input size, >= 2 x cluster CPUs)
    overwrite: bool = False  # replace an existing dataset at `out`

    def __post_init__(self):
        if self.format not in ("auto",) + FORMATS:
            raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; got {self.format!r}")
        if self.max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {self.max_events}")
        if self.partitions < 0:
            raise ValueError(f"partitions must be >= 0, got {self.partitions}")
        check_fractions(self.split)
        self.rules()  # validates the rule fields

    def rules(self) -> Rules:
        return Rules(
            ts_min=self.ts_min,
            ts_max=self.ts_max,
            numeric_ts_unit=self.numeric_ts_unit,
            max_text_chars=self.max_text_chars,
            long_text=self.long_text,
            services=self.services,
            category_sep=self.category_sep,
        )


# ---------------------------------------------------------------------------------------- files


def _fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        uri = os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise IngestError(f"cannot open {uri!r}: {exc}") from exc


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def expand_inputs(inputs: tuple[str, ...], fmt: str = "auto") -> tuple[pafs.FileSystem, list[tuple[str, str, int]]]:
    """Inputs -> (filesystem, [(path, format, bytes)]), every file checked readable.

    Folders are searched recursively for files with a known extension; local globs are expanded.
    Raises IngestError naming the first input or file that is missing or unreadable.
    """
    if not inputs:
        raise IngestError("no inputs given")
    filesystem, files = None, []
    for item in inputs:
        local_glob = "://" not in item and any(ch in item for ch in "*?[")
        candidates = sorted(glob.glob(item, recursive=True)) if local_glob else [item]
        if local_glob and not candidates:
            raise IngestError(f"input {item!r}: the pattern matches no file")
        for cand in candidates:
            fs, path = _fs_path(cand)
            if filesystem is None:
                filesystem = fs
            elif type(fs) is not type(filesystem):
                raise IngestError(f"input {cand!r}: all inputs must be on one filesystem")
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise IngestError(f"input {cand!r}: no such file or folder")
            if info.type == pafs.FileType.Directory:
                found = [
                    f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if f.type == pafs.FileType.File and not os.path.basename(f.path).startswith((".", "_"))
                ]
                found = [f for f in found if _format_of(f.path, fmt)]
                if not found:
                    raise IngestError(f"input folder {cand!r} holds no .parquet/.csv/.jsonl file")
                files += [(f.path, _format_of(f.path, fmt), f.size) for f in sorted(found, key=lambda f: f.path)]
            else:
                kind = _format_of(path, fmt)
                if kind is None:
                    raise IngestError(f"input {cand!r}: unknown file type; pass format=parquet|csv|jsonl")
                files.append((path, kind, info.size))
    for path, kind, _ in files:
        _check_readable(filesystem, path, kind)
    return filesystem, files


def _check_readable(fs: pafs.FileSystem, path: str, kind: str) -> None:
    """Fail early, naming the file, on anything that cannot be read at all."""
    try:
        if kind == "parquet":
            pq.read_metadata(path, filesystem=fs)
        else:
            with fs.open_input_stream(path, compression="detect") as f:
                head = f.read(1 << 16)
            if kind == "csv":
                pacsv.read_csv(pa.BufferReader(head.split(b"\n", 1)[0] + b"\n"))
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreadable", reported with the file
        raise IngestError(f"cannot read {kind} file {path!r}: {exc}") from exc


# ------------------------------------------------------------------------------ pass 1: validate


def _write(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(os.path.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="lz4")


def _validate_and_spill(batch: pa.Table, *, fmt: str, rules: Rules, num_partitions: int, work_uri: str) -> pa.Table:
    """Pass-1 task: validate one block, spill kept rows by user partition, return counts + files."""
    if fmt == "jsonl":  # read_text gives lines under "text"; parse them here, keep bad ones
        raw = parse_json_lines(batch.column("text"))
        raw = raw.append_column("path", batch.column("path"))
    else:
        raw = batch
    res = validate_batch(raw, rules)
    fs, work = _fs_path(work_uri)
    token = uuid.uuid4().hex
    files, parts = [], []
    kept = res.kept
    if kept.num_rows:
        part = partition_of(kept.column("user_id"), num_partitions)
        order = np.argsort(part, kind="stable")
        kept, part = kept.take(pa.array(order)), part[order]
        bounds = np.flatnonzero(np.diff(part)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(part)]])):
            p = int(part[lo])
            path = f"{work}/spill/p{p:05d}/{token}.parquet"
            _write(kept.slice(int(lo), int(hi - lo)), fs, path)
            files.append(path)
            parts.append(p)
    qfile = None
    if res.quarantined.num_rows:
        qfile = f"{work}/quarantine/validate-{token}.parquet"
        _write(res.quarantined, fs, qfile)
    return pa.table(
        {
            "rows_in": [raw.num_rows],
            "rows_kept": [res.kept.num_rows],
            "truncated": [res.truncated],
            "reasons": [json.dumps(res.reason_counts())],
            "spill_files": pa.array([files], pa.list_(pa.string())),
            "spill_parts": pa.array([parts], pa.list_(pa.int32())),
            "quarantine_file": pa.array([qfile], pa.string()),
        }
    )


def _read_pass1(fs: pafs.FileSystem, files: list[tuple[str, str, int]], kwargs: dict):
    datasets = []
    by_kind: dict[str, list[str]] = {}
    for path, kind, _ in files:
        by_kind.setdefault(kind, []).append(path)
    for kind, paths in by_kind.items():
        if kind == "parquet":
            ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
        elif kind == "csv":
            # Everything as text: validate_batch parses types per column and flags bad rows, instead of
            # Arrow failing a whole block on one bad value. Only "" means missing.
            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in EVENT_COLUMNS},
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            )
            ds = ray.data.read_csv(paths, filesystem=fs, include_paths=True, convert_options=convert)
        else:
            ds = ray.data.read_text(paths, filesystem=fs, include_paths=True, drop_empty_lines=True)
        datasets.append(
            ds.map_batches(_validate_and_spill, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(fmt=kind, **kwargs))
        )
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.union(other)
    return ds


@dataclass
class Pass1:
    """What pass 1 found: counts, and the spill files of kept rows by user partition."""

    rows_in: int  # rows read
    rows_valid: int  # rows that passed validation (duplicates are found in pass 2)
    reasons: dict[str, int]  # quarantined rows by reason
    truncated: int  # over-long texts cut
    spill: dict[int, list[str]]  # partition -> spill files of its kept rows
    quarantine_files: list[str]  # files of rejected rows
    seconds: float


def validate_and_partition(fs: pafs.FileSystem, files: list[tuple[str, str, int]], rules: Rules, num_partitions: int,
                           work_uri: str) -> Pass1:
    """Pass 1 over ``files`` (from ``expand_inputs``) on Ray Data, its per-task counts added up."""
    t0 = time.perf_counter()
    kwargs = dict(rules=rules, num_partitions=num_partitions, work_uri=work_uri)
    rows = _read_pass1(fs, files, kwargs).take_all()
    reasons: dict[str, int] = {}
    for r in rows:
        _merge_counts(reasons, json.loads(r["reasons"]))
    spill: dict[int, list[str]] = {}
    for r in rows:
        for f, p in zip(r["spill_files"], r["spill_parts"]):
            spill.setdefault(int(p), []).append(f)
    return Pass1(
        rows_in=sum(r["rows_in"] for r in rows),
        rows_valid=sum(r["rows_kept"] for r in rows),
        reasons=reasons,
        truncated=sum(r["truncated"] for r in rows),
        spill=spill,
        quarantine_files=[r["quarantine_file"] for r in rows if r["quarantine_file"]],
        seconds=time.perf_counter() - t0,
    )


def write_quarantine(fs: pafs.FileSystem, dest: str, files: list[str]) -> int:
    """Concatenate quarantine files (in order) into ``dest`` (QUARANTINE_SCHEMA); return the rows written."""
    written = 0
    with pq.ParquetWriter(dest, QUARANTINE_SCHEMA, filesystem=fs) as writer:
        for f in files:
            t = pq.read_table(f, filesystem=fs)
            writer.write_table(t.cast(QUARANTINE_SCHEMA))
            written += t.num_rows
    return written


# ------------------------------------------------------------------------------- pass 2: group


def _build_partitions(batch: pa.Table, *, out_uri: str, work_uri: str, max_events: int, fractions: tuple) -> pa.Table:
    """Pass-2 task: for each partition in the batch, read its spill files and build sequences."""
    fs, out = _fs_path(out_uri)
    stats = []
    for part, files in zip(batch.column("part").to_pylist(), batch.column("files").to_pylist()):
        table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
        res = build_partition(table, max_events=max_events, fractions=fractions, source=f"partition {part}")
        name = f"part-{part:05d}.parquet"
        _write(res.events, fs, f"{out}/events/{name}")
        _write(res.sequences, fs, f"{out}/sequences/all/{name}")
        _write(res.service_sequences, fs, f"{out}/sequences/by_service/{name}")
        qfile = None
        if res.duplicates.num_rows:
            _, work = _fs_path(work_uri)
            qfile = f"{work}/quarantine/duplicates-{name}"
            _write(res.duplicates, fs, qfile)
        stats.append(json.dumps({**res.stats, "part": part, "quarantine_file": qfile}))
    return pa.table({"stats": pa.array(stats, pa.string())})


# ----------------------------------------------------------------------------------- the driver


def _auto_partitions(total_bytes: int) -> int:
    by_size = math.ceil(total_bytes * _MEMORY_PER_PARQUET_BYTE / _PARTITION_BYTES)
    return max(2 * runtime.cluster_cpus(), by_size, 1)


def _merge_counts(into: dict, add: dict) -> None:
    for k, v in add.items():
        into[k] = into.get(k, 0) + v


def _prepare_out(fs: pafs.FileSystem, out: str, overwrite: bool) -> None:
    info = fs.get_file_info(out)
    if info.type == pafs.FileType.File:
        raise IngestError(f"out {out!r} is a file, not a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(out)):
        if not overwrite:
            raise IngestError(f"out {out!r} exists and is not empty; pass overwrite=true (--overwrite) to replace it")
        fs.delete_dir_contents(out)
    fs.create_dir(out, recursive=True)


def _ingest_attributes(fs: pafs.FileSystem, path: str, out: str, fractions) -> dict:
    """One user table -> out/attributes/<name>.parquet with a split column; returns its summary."""
    fs_in, p = _fs_path(path)
    try:
        if p.lower().endswith((".csv", ".csv.gz")):
            with fs_in.open_input_stream(p, compression="detect") as f:
                table = pacsv.read_csv(f)
        else:
            table = pq.read_table(p, filesystem=fs_in)
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"cannot read attributes file {path!r}: {exc}") from exc
    if "user_id" not in table.column_names:
        raise IngestError(f"attributes file {path!r}: no user_id column (columns: {table.column_names})")
    uid = _clean_string(table.column("user_id").combine_chunks())
    if uid.null_count:
        raise IngestError(f"attributes file {path!r}: {uid.null_count} row(s) with an empty user_id")
    if len(uid) != len(uid.unique()):
        counts = pc.value_counts(uid).to_pylist()
        dupes = [d["values"] for d in counts if d["counts"] > 1][:5]
        raise IngestError(f"attributes file {path!r}: user_id not unique, e.g. {dupes}")
    table = table.set_column(table.column_names.index("user_id"), "user_id", uid)
    if "split" in table.column_names:
        table = table.drop_columns(["split"])
    table = table.append_column("split", pa.array(assign_split(uid, fractions), pa.string()))
    name = os.path.basename(p).split(".")[0]
    dest = f"{out}/attributes/{name}.parquet"
    _write(table, fs, dest)
    return {"name": name, "source": path, "file": f"attributes/{name}.parquet", "users": table.num_rows,
            "columns": [c for c in table.column_names if c not in ("user_id", "split")]}


TIME_ORDER = ("none", "ordinal", "real")  # what an event's ts means, weakest first (convert manifest "time")


def source_time(paths: list[str]) -> tuple[str, str]:
    """What the inputs' ``ts`` means: (time, note). Each input converted by ``userfm convert`` has a
    ``convert_manifest.json`` beside it that says ("real", or "ordinal" / "none": a clock of positions, order
    only); inputs without one are taken as real time. Mixed inputs get the weakest."""
    seen = {}
    for parent in sorted({Path(p).parent for p in paths if "://" not in p}):  # one manifest per folder
        m = parent / "convert_manifest.json"
        if m.is_file():
            try:
                info = json.loads(m.read_text())
            except (OSError, ValueError):
                continue
            if info.get("time") in TIME_ORDER:
                seen[info["time"]] = info.get("time_note", "")
    if not seen:
        return "real", "ts is taken as when each event happened (no convert manifest says otherwise)"
    time_ = min(seen, key=TIME_ORDER.index)
    return time_, seen[time_]


def run_ingest(cfg: IngestConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the whole ingest on the current Ray instance (``runtime.init_ray`` first); return the manifest."""
    if not cfg.out:
        raise IngestError("out is required")
    t0 = time.perf_counter()
    fs_in, files = expand_inputs(cfg.inputs, cfg.format)
    total_bytes = sum(b for _, _, b in files)
    fs, out = _fs_path(cfg.out)
    _prepare_out(fs, out, cfg.overwrite)
    out_uri = cfg.out if "://" in cfg.out else out
    work = f"{out}/_work"
    work_uri = cfg.out.rstrip("/") + "/_work" if "://" in cfg.out else work
    num_partitions = cfg.partitions or _auto_partitions(total_bytes)
    progress(f"[ingest] {len(files)} file(s), {total_bytes / 1e6:.1f} MB -> {num_partitions} user partitions")
    time_kind, time_note = source_time([p for p, _, _ in files])
    if time_kind != "real":
        progress(f"[ingest] order-only data (time: {time_kind}): {time_note}")

    # pass 1 ------------------------------------------------------------------------------------
    p1 = validate_and_partition(fs_in, files, cfg.rules(), num_partitions, work_uri)
    rows_in, rows_valid, reasons, spill = p1.rows_in, p1.rows_valid, p1.reasons, p1.spill
    quarantine_files = list(p1.quarantine_files)
    t_pass1 = p1.seconds
    progress(f"[ingest] pass 1 (read + validate + partition): {rows_in:,} rows, {rows_in - rows_valid:,} quarantined, {t_pass1:.1f}s")

    # pass 2 ------------------------------------------------------------------------------------
    t2 = time.perf_counter()
    items = [{"part": p, "files": fs_} for p, fs_ in sorted(spill.items())]
    part_stats = []
    if items:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _build_partitions,
            batch_format="pyarrow",
            batch_size=1,
            fn_kwargs=dict(out_uri=out_uri, work_uri=work_uri, max_events=cfg.max_events, fractions=tuple(cfg.split)),
        )
        part_stats = [json.loads(r["stats"]) for r in ds.take_all()]
    t_pass2 = time.perf_counter() - t2

    totals: dict = {}
    by_service: dict[str, int] = {}
    by_split: dict[str, int] = {}
    for s in part_stats:
        for k in ("rows_in", "events_kept", "duplicates", "users", "events_in_sequences", "events_beyond_max_events", "user_service_sequences"):
            totals[k] = totals.get(k, 0) + s[k]
        _merge_counts(by_service, s["events_by_service"])
        _merge_counts(by_split, s["users_by_split"])
        if s["quarantine_file"]:
            quarantine_files.append(s["quarantine_file"])
    if totals.get("rows_in", 0) != rows_valid:
        raise IngestError(f"spill accounting failed: pass 1 kept {rows_valid} rows, pass 2 read {totals.get('rows_in', 0)}")
    if totals.get("duplicates"):
        reasons["duplicate_event"] = reasons.get("duplicate_event", 0) + totals["duplicates"]
    rows_kept = totals.get("events_kept", 0)
    rows_quarantined = sum(reasons.values())
    progress(f"[ingest] pass 2 (dedupe + sort + sequences): {totals.get('users', 0):,} users, {t_pass2:.1f}s")

    # quarantine: one file, written from exactly the files the tasks reported ----------------------
    q_written = write_quarantine(fs, f"{out}/quarantine.parquet", quarantine_files)
    if fs.get_file_info(work).type == pafs.FileType.Directory:
        fs.delete_dir(work)

    attributes = [_ingest_attributes(fs, a, out, tuple(cfg.split)) for a in cfg.attributes]

    if rows_in != rows_kept + rows_quarantined or q_written != rows_quarantined:
        raise IngestError(
            f"row accounting failed: rows_in={rows_in} rows_kept={rows_kept} rows_quarantined={rows_quarantined} "
            f"(quarantine file has {q_written})"
        )
    manifest = {
        "kind": "userfm.sequence_dataset",
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "inputs": [{"path": p, "format": k, "bytes": b} for p, k, b in files],
        "time": time_kind,  # real | ordinal | none (source_time): pretraining drops calendar fields unless real
        "time_note": time_note,
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_quarantined": rows_quarantined,
        "quarantined_by_reason": {r: reasons.get(r, 0) for r in REASONS},
        "texts_truncated": p1.truncated,
        "users": {"total": totals.get("users", 0), **{k: by_split.get(k, 0) for k in ("train", "val", "test")}},
        "services": dict(sorted(by_service.items())),
        "sequences": {
            "max_events": cfg.max_events,
            "users": totals.get("users", 0),
            "user_service_rows": totals.get("user_service_sequences", 0),
            "events_in_sequences": totals.get("events_in_sequences", 0),
            "events_beyond_max_events": totals.get("events_beyond_max_events", 0),
        },
        "partitions": num_partitions,
        "files": {
            "events": "events/",
            "sequences": "sequences/all/",
            "service_sequences": "sequences/by_service/",
            "quarantine": "quarantine.parquet",
        },
        "attributes": attributes,
        "timings_s": {
            "pass1": round(t_pass1, 3),
            "pass2": round(t_pass2, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    with fs.open_output_stream(f"{out}/manifest.json") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    progress(
        f"[ingest] done: {rows_in:,} rows in = {rows_kept:,} kept + {rows_quarantined:,} quarantined; "
        f"{manifest['users']['total']:,} users -> {cfg.out} ({manifest['timings_s']['total']:.1f}s)"
    )
    return manifest
