"""``userfm refresh``: a new window of logs -> a new version of a sequence dataset and its embedding table,
touching only the users the window changed (the daily batch job of PinnerFormer-style systems).

Inputs: the window's event files (any format ``userfm ingest`` reads), the current dataset (``userfm
ingest``, or an earlier refresh's ``OUT/dataset``), its embedding table (``userfm embed`` or an earlier
refresh's ``OUT/embeddings``) and the encoder that made that table. Steps, on Ray:

1. ingest's pass 1 (``ingest.validate_and_partition``) over the window only, with the dataset's own
   validation rules and its number of user partitions: bad rows are quarantined with a reason, kept rows
   are spilled by user partition. A user always hashes to the same partition, so only partitions the
   window touched have anything to do.
2. one Ray Data task per touched partition: the old events of the window's users plus the window's rows
   go through ingest's ``sequences.build_partition`` (sort, exact duplicates quarantined, sequences); every
   other user's rows are kept as they were; the result is merged back in user order. Untouched
   partitions are copied. Users whose sequence in the table's scope changed (more events) or is new
   are collected for re-embedding.
3. ``embed.embed_rows`` (the actor pool of ``userfm embed``) over those users only; every other user's
   row of the old table is copied unchanged (the same bytes).

Layout of ``out``::

    dataset/      a complete sequence dataset (same layout and schema as `userfm ingest`), version n + 1
    embeddings/   a complete embedding table (same schema as `userfm embed`), version n + 1
    manifest.json the window's counts (rows in = kept + quarantined), users changed / unchanged / new,
                  partitions rebuilt / copied, timings

Every count is checked before the manifests are written: window rows in == kept + quarantined; users
after == unchanged + changed + new; users before == unchanged + changed; the embedding table's users in ==
embedded + skipped. ``userfm serve``'s ``POST /v1/admin/reload`` switches a running app to the new table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from userfm import runtime  # sets Ray's env defaults before ray is imported
from userfm.config import from_dict, to_dict
from userfm.errors import UserfmError
from userfm.data.schema import ALL_SCOPE, EVENT_SCHEMA, SEQUENCE_SCHEMA, SPLITS

import ray  # noqa: E402  (after runtime: env defaults)


class RefreshError(UserfmError):
    """Inputs that do not belong together (dataset, table, encoder) or a failed count; the message says which."""


@dataclass(frozen=True)
class RefreshConfig:
    inputs: tuple[str, ...] = ()  # the new window's event files, folders or globs (formats as in `userfm ingest`)
    data: str = ""  # current sequence dataset folder (`userfm ingest`, or OUT/dataset of an earlier refresh)
    embeddings: str = ""  # its embedding table folder (`userfm embed`, or OUT/embeddings of an earlier refresh)
    model: str = ""  # exported encoder that made `embeddings` (checked: same weights digest)
    out: str = ""  # output folder: dataset/, embeddings/, manifest.json
    format: str = "auto"  # window file format: parquet | csv | jsonl | auto (by extension)
    batch_size: int = 256  # users per inference batch
    actors: int = 1  # inference actors (one model load each)
    cpus_per_actor: float = 1.0  # Ray CPUs reserved per actor
    threads_per_actor: int = 1  # torch threads per actor
    gpus: float = 0.0  # GPUs per actor (> 0: the model runs on CUDA)
    minilm_cache: str = ""  # MiniLM vector cache (minilm encoders); "" = OUT/dataset/minilm_cache, seeded from the old one
    overwrite: bool = False  # replace an existing `out`

    def __post_init__(self):
        for name in ("batch_size", "actors", "threads_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0 or self.gpus < 0:
            raise ValueError(f"cpus_per_actor must be > 0 and gpus >= 0, got {self.cpus_per_actor}, {self.gpus}")


# ---------------------------------------------------------------------------------- pure helpers


def sequence_stats(seq_all: pa.Table, seq_svc: pa.Table, max_events: int) -> dict:
    """Dataset-manifest counts of a set of users' sequence rows (combined rows, by-service rows).

    The same quantities ``sequences.build_partition`` reports, computed from its output tables, so the
    old rows of the users a window touched can be subtracted and their new rows added.
    """
    n = seq_all.column("n_events").to_numpy(zero_copy_only=False).astype(np.int64)
    split = seq_all.column("split").to_numpy(zero_copy_only=False)
    by_service: dict[str, int] = {}
    if seq_svc.num_rows:
        sums = seq_svc.group_by("scope").aggregate([("n_events", "sum")])
        by_service = {s: int(v) for s, v in zip(sums.column("scope").to_pylist(), sums.column("n_events_sum").to_pylist())}
    return {
        "users": int(seq_all.num_rows),
        "users_by_split": {s: int((split == s).sum()) for s in SPLITS},
        "events": int(n.sum()),
        "events_in_sequences": int(np.minimum(n, max_events).sum()),
        "events_beyond_max_events": int(np.maximum(n - max_events, 0).sum()),
        "user_service_rows": int(seq_svc.num_rows),
        "events_by_service": by_service,
    }


def merge_by_user(kept: pa.Table, rebuilt: pa.Table) -> pa.Table:
    """Two tables sorted by user_id, with disjoint users -> one table sorted by user_id.

    Arrow's sort is stable, so each user's rows keep their order (time order for events, service order
    for by-service rows): the result is what ingest writes for the union of the users.
    """
    both = pa.concat_tables([kept, rebuilt.cast(kept.schema)])
    return both.take(pc.sort_indices(both, sort_keys=[("user_id", "ascending")]))


def scope_rows(seq_all: pa.Table, seq_svc: pa.Table, scope: str) -> pa.Table:
    """The rows an embedding table of ``scope`` embeds: combined rows ("all") or one service's rows."""
    if scope == ALL_SCOPE:
        return seq_all
    return seq_svc.filter(pc.equal(seq_svc.column("scope"), scope))


def changed_rows(old: pa.Table, new: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``new`` (sequence rows of one scope) whose user is new, or has more events than in ``old``.

    Events are only ever added, so a user's sequence changed exactly when its ``n_events`` grew.
    Returns boolean masks over ``new``: (changed, new).
    """
    before = dict(zip(old.column("user_id").to_pylist(), old.column("n_events").to_pylist()))
    ids, n = new.column("user_id").to_pylist(), new.column("n_events").to_pylist()
    is_new = np.array([u not in before for u in ids], dtype=bool)
    changed = np.array([u in before and k != before[u] for u, k in zip(ids, n)], dtype=bool)
    return changed, is_new


def _add(into: dict, stats: dict, sign: int = 1) -> None:
    for k, v in stats.items():
        if isinstance(v, dict):
            sub = into.setdefault(k, {})
            for kk, vv in v.items():
                sub[kk] = sub.get(kk, 0) + sign * vv
        else:
            into[k] = into.get(k, 0) + sign * v


# ----------------------------------------------------------------------------- the partition task


def _read_or_empty(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> pa.Table:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return schema.empty_table()
    return pq.read_table(path, filesystem=fs).select(schema.names).cast(schema)


def _refresh_partitions(batch: pa.Table, *, old_uri: str, out_uri: str, work_uri: str, max_events: int,
                        fractions: tuple, scope: str) -> pa.Table:
    """Ray Data task: for each partition in the batch, rebuild the window's users and keep the rest."""
    from userfm.data.ingest import _fs_path, _write
    from userfm.data.sequences import build_partition

    fs, old = _fs_path(old_uri)
    _, out = _fs_path(out_uri)
    _, work = _fs_path(work_uri)
    stats = []
    for part, files in zip(batch.column("part").to_pylist(), batch.column("files").to_pylist()):
        name = f"part-{part:05d}.parquet"
        old_events = _read_or_empty(fs, f"{old}/events/{name}", EVENT_SCHEMA)
        old_all = _read_or_empty(fs, f"{old}/sequences/all/{name}", SEQUENCE_SCHEMA)
        old_svc = _read_or_empty(fs, f"{old}/sequences/by_service/{name}", SEQUENCE_SCHEMA)
        window = pa.concat_tables([pq.read_table(f, filesystem=fs).cast(EVENT_SCHEMA) for f in files])
        touched = pc.unique(window.column("user_id").combine_chunks())

        def of_touched(t: pa.Table) -> np.ndarray:
            return np.asarray(pc.is_in(t.column("user_id"), value_set=touched).to_numpy(zero_copy_only=False), bool)

        ev_mask, all_mask, svc_mask = of_touched(old_events), of_touched(old_all), of_touched(old_svc)
        res = build_partition(pa.concat_tables([old_events.filter(pa.array(ev_mask)), window]),
                              max_events=max_events, fractions=fractions, source=f"refresh window, partition {part}")
        before_all, before_svc = old_all.filter(pa.array(all_mask)), old_svc.filter(pa.array(svc_mask))
        _write(merge_by_user(old_events.filter(pa.array(~ev_mask)), res.events), fs, f"{out}/events/{name}")
        _write(merge_by_user(old_all.filter(pa.array(~all_mask)), res.sequences), fs, f"{out}/sequences/all/{name}")
        _write(merge_by_user(old_svc.filter(pa.array(~svc_mask)), res.service_sequences), fs,
               f"{out}/sequences/by_service/{name}")
        qfile = None
        if res.duplicates.num_rows:
            qfile = f"{work}/quarantine/duplicates-{name}"
            _write(res.duplicates, fs, qfile)
        new_rows = scope_rows(res.sequences, res.service_sequences, scope)
        changed, is_new = changed_rows(scope_rows(before_all, before_svc, scope), new_rows)
        efile = None
        if (changed | is_new).any():
            efile = f"{work}/embed/{name}"
            _write(new_rows.filter(pa.array(changed | is_new)), fs, efile)
        stats.append(json.dumps({
            "part": part,
            "window_rows": window.num_rows,
            "window_kept": res.events.num_rows - int(ev_mask.sum()),
            "duplicates": res.stats["duplicates"],
            "before": sequence_stats(before_all, before_svc, max_events),
            "after": sequence_stats(res.sequences, res.service_sequences, max_events),
            "users_changed": int(changed.sum()),
            "users_new": int(is_new.sum()),
            "quarantine_file": qfile,
            "embed_file": efile,
        }))
    return pa.table({"stats": pa.array(stats, pa.string())})


# ----------------------------------------------------------------------------------- the driver


def _embedding_manifest(path: str) -> dict:
    mf = Path(path) / "manifest.json"
    if not mf.is_file() or not (Path(path) / "embeddings").is_dir():
        raise RefreshError(f"embeddings {path}: not a `userfm embed` table folder (needs embeddings/ and manifest.json)")
    m = json.loads(mf.read_text())
    if m.get("kind") != "userfm.embeddings":
        raise RefreshError(f"embeddings {path}: manifest kind is {m.get('kind')!r}, expected 'userfm.embeddings'")
    if m.get("concat"):
        raise RefreshError(f"embeddings {path}: made with concat={m['concat']['table']!r}; refresh re-embeds with one "
                           f"encoder only, so refresh each table and concatenate with `userfm embed --concat`")
    return m


def _copy_tree_files(fs: pafs.FileSystem, src: str, dest: str) -> int:
    """Copy every file under ``src`` to the same relative path under ``dest``; return how many."""
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        return 0
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            target = dest + info.path[len(src):]
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.copy_file(info.path, target)
            n += 1
    return n


def run_refresh(cfg: RefreshConfig, progress: Callable[[str], None] = print) -> dict:
    """Run a refresh on the current Ray instance (``runtime.init_ray`` first); return ``out/manifest.json``."""
    from userfm.data.dataset import load_manifest
    from userfm.infer.ann import INDEX_DIR as ANN_INDEX_DIR
    from userfm.infer.embed import (EmbedConfig, embed_rows, minilm_vectors, model_identity, prepare_out, skipped_by_reason,
                              split_skipped, write_ann, write_table)
    from userfm.data.ingest import IngestConfig, _fs_path, _prepare_out, expand_inputs, validate_and_partition, write_quarantine
    from userfm.data.validate import REASONS

    for name in ("data", "embeddings", "model", "out"):
        if not getattr(cfg, name):
            raise RefreshError(f"{name} is required")
    t0 = time.perf_counter()
    old_m = load_manifest(cfg.data)
    ingest_cfg = from_dict(IngestConfig, {**old_m["config"], "inputs": [], "out": "", "overwrite": False},
                           where=f"{cfg.data}/manifest.json config")
    emb_m = _embedding_manifest(cfg.embeddings)
    identity = model_identity(cfg.model)
    if emb_m.get("model_version") != identity["model_version"]:
        raise RefreshError(f"model {cfg.model} (version {identity['model_version']}) did not make embeddings "
                           f"{cfg.embeddings} (version {emb_m.get('model_version')}): re-embed everything with "
                           f"`userfm embed` instead")
    scope = emb_m["config"].get("scope", ALL_SCOPE)
    holdout = int(emb_m.get("holdout_last", 0))
    max_events, fractions = ingest_cfg.max_events, tuple(ingest_cfg.split)
    num_partitions = int(old_m["partitions"])

    fs_in, files = expand_inputs(tuple(cfg.inputs), cfg.format)
    out_root = Path(cfg.out)
    prepare_out(out_root, cfg.overwrite)
    fs, data_out = _fs_path(str(out_root / "dataset"))
    _prepare_out(fs, data_out, False)
    _, old = _fs_path(cfg.data)
    work = f"{data_out}/_work"

    # 1. validate + partition the window ---------------------------------------------------------
    runtime.init_ray()
    p1 = validate_and_partition(fs_in, files, ingest_cfg.rules(), num_partitions, work)
    progress(f"[refresh] window: {len(files)} file(s), {p1.rows_in:,} rows, {p1.rows_in - p1.rows_valid:,} quarantined "
             f"by validation, {len(p1.spill)} of {num_partitions} partitions touched ({p1.seconds:.1f}s)")

    # 2. rebuild the touched partitions' window users, copy the rest ---------------------------------
    t2 = time.perf_counter()
    stats = []
    if p1.spill:
        items = [{"part": p, "files": f} for p, f in sorted(p1.spill.items())]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _refresh_partitions, batch_format="pyarrow", batch_size=1,
            fn_kwargs=dict(old_uri=old, out_uri=data_out, work_uri=work, max_events=max_events, fractions=fractions,
                           scope=scope))
        stats = [json.loads(r["stats"]) for r in ds.take_all()]
    copied = 0
    for sub in ("events", "sequences/all", "sequences/by_service"):
        if fs.get_file_info(f"{old}/{sub}").type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(f"{old}/{sub}")):
            part = int(info.base_name.split("-")[1].split(".")[0]) if info.base_name.startswith("part-") else None
            if part is not None and part not in p1.spill:
                fs.copy_file(info.path, f"{data_out}/{sub}/{info.base_name}")
                copied += sub == "events"
    attr_files = _copy_tree_files(fs, f"{old}/attributes", f"{data_out}/attributes")
    t_pass2 = time.perf_counter() - t2

    window_kept = sum(s["window_kept"] for s in stats)
    duplicates = sum(s["duplicates"] for s in stats)
    if sum(s["window_rows"] for s in stats) != p1.rows_valid:
        raise RefreshError(f"spill accounting failed: pass 1 kept {p1.rows_valid} rows, the partitions read "
                           f"{sum(s['window_rows'] for s in stats)}")
    reasons = dict(p1.reasons)
    if duplicates:
        reasons["duplicate_event"] = reasons.get("duplicate_event", 0) + duplicates
    window_q = sum(reasons.values())
    if p1.rows_in != window_kept + window_q:
        raise RefreshError(f"window accounting failed: rows_in={p1.rows_in} != kept {window_kept} + quarantined {window_q}")

    # dataset manifest: the old one, minus the touched users' old rows, plus their new rows
    totals = {"users": old_m["users"]["total"], "users_by_split": {s: old_m["users"][s] for s in SPLITS},
              "events": old_m["rows_kept"], "events_in_sequences": old_m["sequences"]["events_in_sequences"],
              "events_beyond_max_events": old_m["sequences"]["events_beyond_max_events"],
              "user_service_rows": old_m["sequences"]["user_service_rows"], "events_by_service": dict(old_m["services"])}
    for s in stats:
        _add(totals, s["before"], -1)
        _add(totals, s["after"], +1)
    if totals["events"] != old_m["rows_kept"] + window_kept:
        raise RefreshError(f"event accounting failed: {old_m['rows_kept']} old + {window_kept} new events, the "
                           f"sequences hold {totals['events']}")
    q_files = [f"{old}/{old_m['files']['quarantine']}"] + p1.quarantine_files + [s["quarantine_file"] for s in stats if s["quarantine_file"]]
    q_written = write_quarantine(fs, f"{data_out}/quarantine.parquet", q_files)
    if q_written != old_m["rows_quarantined"] + window_q:
        raise RefreshError(f"quarantine accounting failed: {old_m['rows_quarantined']} old + {window_q} new rows, "
                           f"the file has {q_written}")
    embed_files = [s["embed_file"] for s in stats if s["embed_file"]]
    version = int(old_m.get("version", 1)) + 1
    window = {
        "inputs": [{"path": p, "format": k, "bytes": b} for p, k, b in files],
        "rows_in": p1.rows_in, "rows_kept": window_kept, "rows_quarantined": window_q,
        "quarantined_by_reason": {r: reasons.get(r, 0) for r in REASONS}, "texts_truncated": p1.truncated,
    }
    data_manifest = {
        **old_m,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": version,
        "inputs": old_m["inputs"] + window["inputs"],
        "rows_in": old_m["rows_in"] + p1.rows_in,
        "rows_kept": totals["events"],
        "rows_quarantined": old_m["rows_quarantined"] + window_q,
        "quarantined_by_reason": {r: old_m["quarantined_by_reason"].get(r, 0) + reasons.get(r, 0) for r in REASONS},
        "texts_truncated": old_m["texts_truncated"] + p1.truncated,
        "users": {"total": totals["users"], **totals["users_by_split"]},
        "services": dict(sorted((k, v) for k, v in totals["events_by_service"].items() if v)),
        "sequences": {"max_events": max_events, "users": totals["users"], "user_service_rows": totals["user_service_rows"],
                      "events_in_sequences": totals["events_in_sequences"],
                      "events_beyond_max_events": totals["events_beyond_max_events"]},
        "refresh": {"parent": str(cfg.data), "parent_version": int(old_m.get("version", 1)), "window": window},
        "timings_s": {"pass1": round(p1.seconds, 3), "pass2": round(t_pass2, 3)},
    }
    progress(f"[refresh] partitions: {len(stats)} rebuilt, {copied} copied; window {p1.rows_in:,} rows = "
             f"{window_kept:,} kept + {window_q:,} quarantined ({duplicates:,} duplicates); "
             f"{totals['users']:,} users ({t_pass2:.1f}s)")

    # 3. re-embed the changed and new users; copy every other row of the old table ----------------------
    t3 = time.perf_counter()
    emb_cfg = EmbedConfig(model=cfg.model, data=str(out_root / "dataset"), out=str(out_root / "embeddings"), scope=scope,
                          batch_size=cfg.batch_size, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
                          threads_per_actor=cfg.threads_per_actor, gpus=cfg.gpus, holdout_last=holdout,
                          minilm_cache=cfg.minilm_cache or str(out_root / "dataset" / "minilm_cache"))
    old_emb_dir = Path(cfg.embeddings)
    old_emb = pq.read_table(old_emb_dir / "embeddings")
    old_skip = pq.read_table(old_emb_dir / "skipped.parquet") if (old_emb_dir / "skipped.parquet").is_file() else None
    if old_emb.num_rows + (old_skip.num_rows if old_skip is not None else 0) != emb_m["users_in"]:
        raise RefreshError(f"embeddings {cfg.embeddings}: the files hold {old_emb.num_rows} embedded + "
                           f"{old_skip.num_rows if old_skip is not None else 0} skipped users, the manifest says users_in={emb_m['users_in']}")
    n_changed = sum(s["users_changed"] for s in stats)
    n_new = sum(s["users_new"] for s in stats)
    if embed_files:
        # the manifest goes in first: minilm_vectors and embed read the dataset through it
        with fs.open_output_stream(f"{data_out}/manifest.json") as f:
            f.write(json.dumps(data_manifest, indent=2).encode())
        if not cfg.minilm_cache:  # seed this version's MiniLM cache with the old one: only new texts get encoded
            old_cache = emb_m["config"].get("minilm_cache") or str(Path(cfg.data) / "minilm_cache")
            _copy_tree_files(fs, _fs_path(old_cache)[1], _fs_path(emb_cfg.minilm_cache)[1])
        vectors_dir = minilm_vectors(cfg.model, emb_cfg.data, emb_cfg.minilm_cache, progress)
        fresh = embed_rows(ray.data.read_parquet(embed_files), emb_cfg, identity, vectors_dir)
    else:
        fresh = None
    t_embed = time.perf_counter() - t3
    if fs.get_file_info(work).type == pafs.FileType.Directory:  # (an empty window writes nothing there)
        fs.delete_dir(work)
    with fs.open_output_stream(f"{data_out}/manifest.json") as f:  # the dataset is complete now
        f.write(json.dumps({**data_manifest, "timings_s": {**data_manifest["timings_s"],
                                                            "total": round(time.perf_counter() - t0, 3)}}, indent=2).encode())

    redone = fresh.column("user_id").combine_chunks() if fresh is not None else pa.array([], pa.string())
    if len(redone) != n_changed + n_new:
        raise RefreshError(f"re-embedded {len(redone)} users, expected {n_changed} changed + {n_new} new")

    def others(t: pa.Table | None) -> pa.Table | None:
        return None if t is None else t.filter(pc.invert(pc.is_in(t.column("user_id"), value_set=redone)))

    kept_emb, kept_skip = others(old_emb), others(old_skip)
    old_had = old_emb.num_rows - kept_emb.num_rows + ((old_skip.num_rows - kept_skip.num_rows) if old_skip is not None else 0)
    if old_had != n_changed:
        raise RefreshError(f"embeddings {cfg.embeddings} hold {old_had} of the {n_changed} changed users: the table was "
                           f"not made from dataset {cfg.data}")
    if fresh is not None:
        new_emb, new_skip = split_skipped(fresh)
        # the old table's schema (same columns, same order): rows from either source are alike
        embedded = pa.concat_tables([kept_emb, new_emb.select(kept_emb.column_names).cast(kept_emb.schema)])
        skipped = new_skip if kept_skip is None else pa.concat_tables(
            [kept_skip, new_skip.select(kept_skip.column_names).cast(kept_skip.schema)])
    else:
        embedded = kept_emb
        skipped = kept_skip if kept_skip is not None else pa.table({"user_id": pa.array([], pa.string()),
                                                                    "split": pa.array([], pa.string()),
                                                                    "n_events": pa.array([], pa.int64()),
                                                                    "reason": pa.array([], pa.string())})
    users_in = embedded.num_rows + skipped.num_rows
    unchanged = emb_m["users_in"] - n_changed
    if users_in != unchanged + n_changed + n_new:
        raise RefreshError(f"user accounting failed: {users_in} users in the new table != {unchanged} unchanged + "
                           f"{n_changed} changed + {n_new} new")
    if scope == ALL_SCOPE and users_in != totals["users"]:
        raise RefreshError(f"the new table has {users_in} users, the new dataset {totals['users']}")
    emb_version = int(emb_m.get("version", 1)) + 1
    users = {"before": emb_m["users_in"], "after": users_in, "unchanged": unchanged, "changed": n_changed, "new": n_new}
    emb_manifest = {
        "kind": "userfm.embeddings",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(emb_cfg),
        **identity,
        "dim": emb_m["dim"],
        "holdout_last": holdout,
        "users_in": users_in,
        "users_embedded": embedded.num_rows,
        "users_skipped": skipped.num_rows,
        "skipped_by_reason": skipped_by_reason(skipped),
        "concat": None,
        "version": emb_version,
        "refresh": {"parent": str(cfg.embeddings), "parent_version": int(emb_m.get("version", 1)), "users": users},
        "timings_s": {"inference": round(t_embed, 3)},
    }
    write_table(out_root / "embeddings", embedded, skipped, emb_manifest)
    # the parent's similar-users index, updated: its centroids reused, every row of the new table added again
    had_index = (Path(cfg.embeddings) / ANN_INDEX_DIR / "index.json").is_file()
    ann = write_ann(out_root / "embeddings", "on" if had_index else "auto", previous_dir=cfg.embeddings, progress=progress)
    if ann is not None:
        emb_manifest["ann"] = ann
        (out_root / "embeddings" / "manifest.json").write_text(json.dumps(emb_manifest, indent=2))

    manifest = {
        "kind": "userfm.refresh",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "version": emb_version,
        "dataset": {"path": str(out_root / "dataset"), "parent": str(cfg.data), "version": version},
        "embeddings": {"path": str(out_root / "embeddings"), "parent": str(cfg.embeddings), "version": emb_version,
                       **identity, "scope": scope, "holdout_last": holdout},
        "window": window,
        "users": users,
        "partitions": {"total": num_partitions, "rebuilt": len(stats), "copied": copied},
        "attribute_files_copied": attr_files,
        "timings_s": {"validate": round(p1.seconds, 3), "rebuild": round(t_pass2, 3), "embed": round(t_embed, 3),
                      "total": round(time.perf_counter() - t0, 3)},
    }
    (out_root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    progress(f"[refresh] {users_in:,} users = {unchanged:,} unchanged + {n_changed:,} changed + {n_new:,} new; "
             f"{n_changed + n_new:,} re-embedded in {t_embed:.1f}s -> {out_root} (version {emb_version}, "
             f"{manifest['timings_s']['total']:.1f}s)")
    return manifest
