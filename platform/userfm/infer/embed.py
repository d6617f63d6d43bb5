"""``userfm embed``: frozen user embeddings for every user of a sequence dataset, on Ray Data.

Batch inference with ``map_batches`` over an actor pool: each actor loads the exported encoder once
(``userfm.load_encoder``), then turns batches of sequence rows into embeddings. Output (``out``)::

    embeddings/*.parquet   user_id, split, n_events, embedding (fixed_size_list<float32>[D]),
                           model_id, model_version, config_hash
    skipped.parquet        users without an embedding and the reason (nothing is dropped silently)
    manifest.json          users_in == users_embedded + users_skipped, model identity, timings

``concat`` appends a second embedding table's vector to each user's (the "general feature +
service-specific feature" of the ShopperBERT paper); users missing from it get zeros, counted.

``holdout_last = n`` embeds each user's history without its last ``n`` events: the leave-one-out table
that next-item retrieval and next-genre tasks need (``userfm evaluate`` holds the last event out as the
label, so the embedding must not have seen it). The table's ``holdout_last`` column and the manifest say
how it was made; users with no event left are skipped with reason ``no_events_after_holdout``.

``history_service = s`` (scope "all" only) then keeps only the events of service ``s`` of what is left: the
table a transfer task reads (the Amazon set's Office target predicted from the user's Arts history alone).
Users with no such event are skipped with reason ``no_events_in_service``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userfm.config import to_dict
from userfm.errors import UserfmError
from userfm.data.sequences import cut_lists, drop_last_events, history_rows


SEQUENCE_COLUMNS = ["user_id", "split", "scope", "n_events", "ts", "service", "text", "item_id", "category", "value"]


ANN_CHOICES = ("auto", "on", "off")


class EmbedError(UserfmError):
    """Bad embed input (model folder, dataset, concat table)."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = ""  # exported encoder folder (`userfm pretrain` writes <run>/model)
    data: str = ""  # sequence dataset folder (`userfm ingest`)
    out: str = ""  # output folder
    scope: str = "all"  # "all" (combined history) or one service's sequences
    batch_size: int = 256  # users per inference batch
    actors: int = 1  # inference actors (one model load each)
    cpus_per_actor: float = 1.0  # Ray CPUs reserved per actor
    threads_per_actor: int = 1  # torch threads per actor
    gpus: float = 0.0  # GPUs per actor (> 0: the model runs on CUDA)
    minilm_cache: str = ""  # MiniLM vector cache (minilm encoders); "" = <data>/minilm_cache
    concat: str = ""  # a second embedding table (folder or file) to append per user
    holdout_last: int = 0  # drop each user's last n events before encoding (1 = leave-one-out for retrieval)
    recent: int = 0  # > 0: encode only each user's most recent n events (after holdout_last), a short-term table;
    #                  0 = the model's whole context (its max_events)
    history_service: str = ""  # "" = every event; a service name: after holdout_last, only that service's events
    #                  (scope "all"; a transfer task's table: one service's history predicts the other's next event)
    ann: str = "auto"  # similar-users index beside the table (OUT/ann, userfm.infer.ann): auto = when the table has
    #                  >= ANN_MIN_USERS (50,000) users, on = always, off = never (serve then searches exactly)
    overwrite: bool = False  # replace an existing output folder

    def __post_init__(self):
        for name in ("batch_size", "actors", "threads_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ann not in ANN_CHOICES:
            raise ValueError(f"ann must be one of {ANN_CHOICES}, got {self.ann!r}")
        if self.holdout_last < 0:
            raise ValueError(f"holdout_last must be >= 0, got {self.holdout_last}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, got {self.recent}")
        if self.history_service and self.scope != "all":
            raise ValueError(f"history_service applies to scope 'all' (the combined history), not scope {self.scope!r}")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def model_identity(model_dir: str | Path) -> dict:
    """``model_id`` (the run's name), ``model_version`` (weights digest), ``config_hash``."""
    p = Path(model_dir).resolve()
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise EmbedError(f"{model_dir}: not an exported encoder (needs config.json and model.safetensors)")
    name = p.parent.name if p.name == "model" else p.name
    return {"model_id": name, "model_version": _digest(p / "model.safetensors"), "config_hash": _digest(p / "config.json")}


def read_history(data, columns: list[str], holdout: int = 0, service: str = "") -> pa.Table:
    """``columns`` of a dataset's combined sequences (scope "all"), cut to :func:`history_rows`."""
    from userfm.data.dataset import read_sequences

    extra = ["service"] if service and "service" not in columns else []
    t = history_rows(read_sequences(data, columns=columns + extra), holdout, service)
    return t.drop_columns(extra) if extra else t


def event_windows(rows: pa.Table, ends: np.ndarray, width: int) -> pa.Table:
    """Sequence rows cut to windows: row i keeps events ``[max(0, ends[i] - width), ends[i])`` (oldest first).

    The (window, next event) pairs of a next-item head: ``ends[i]`` is the position of the event the
    window precedes. ``n_events`` becomes the window's length; other scalar columns are kept.

    Args:
        rows: sequence rows (time-sorted lists), one per window (``rows.take`` a user's row once per window).
        ends: (n,) int, 0 <= ends[i] <= row i's length.
        width: events per window, >= 1.
    """
    ends = np.asarray(ends, np.int64)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if len(ends) != rows.num_rows:
        raise ValueError(f"{len(ends)} ends for {rows.num_rows} rows")
    lengths = pc.list_value_length(rows.column("ts")).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if ((ends < 0) | (ends > lengths)).any():
        i = int(np.flatnonzero((ends < 0) | (ends > lengths))[0])
        raise ValueError(f"ends[{i}] = {ends[i]} is outside row {i}'s 0..{lengths[i]} events")
    starts = np.maximum(ends - width, 0)
    return cut_lists(rows, lambda _: (starts, ends), n_events=lambda _: pa.array(ends - starts, pa.int64()))


SUB_BATCH = 32  # users per forward inside an EmbedActor batch, taken in order of length


class EmbedActor:
    """One model load per actor; ``__call__`` maps sequence rows -> embedding rows."""

    def __init__(self, model_dir: str, identity: dict, vectors_dir: str | None = None, threads: int = 1, use_gpu: bool = False,
                 holdout_last: int = 0, recent: int = 0, history_service: str = ""):
        import torch

        import userfm

        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.vocabs, self.tok = userfm.load_encoder(model_dir, device=self.device)
        self.identity = identity
        self.holdout_last = holdout_last
        self.history_service = history_service
        self.max_events = min(recent, self.model.config.max_events) if recent else self.model.config.max_events
        self.vectors = None
        if vectors_dir:
            from userfm.models.minilm import VectorCache

            self.vectors = VectorCache.load(vectors_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from userfm.models.features import make_batch, to_torch
        from userfm.objectives.pretext import add_vectors

        had = pc.greater(batch.column("n_events"), 0).to_numpy(zero_copy_only=False)
        cut = drop_last_events(batch, self.holdout_last)
        left = pc.greater(cut.column("n_events"), 0).to_numpy(zero_copy_only=False)
        rows = history_rows(cut, 0, self.history_service)
        lengths = pc.list_value_length(rows.column("ts")).fill_null(0).to_numpy(zero_copy_only=False)
        has = lengths > 0
        dim = self.model.config.embed_dim
        emb = np.zeros((batch.num_rows, dim), dtype=np.float32)
        # Users in order of length, SUB_BATCH at a time: each forward pads to its own longest user, not the
        # batch's. Unsorted, one heavy user padded the other 255 to 64 events (the demo's data, one actor
        # alone: 329 -> 950 users/s).
        order = np.flatnonzero(has)[np.argsort(lengths[has], kind="stable")]
        for lo in range(0, len(order), SUB_BATCH):
            part = order[lo:lo + SUB_BATCH]
            nb = add_vectors(make_batch(rows.take(part), self.vocabs, self.tok, max_events=self.max_events), self.vectors)
            with torch.no_grad():
                emb[part] = self.model(to_torch(nb, self.device)).float().cpu().numpy()
        n = batch.num_rows
        reason = pa.nulls(n, pa.string()) if has.all() else pa.array(
            [None if h else "no_events_in_service" if c else "no_events_after_holdout" if d else "no_events"
             for h, c, d in zip(has, left, had)], pa.string())
        return pa.table(
            {
                "user_id": batch.column("user_id"),
                "split": batch.column("split"),
                "n_events": batch.column("n_events"),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
                "holdout_last": pa.array(np.full(n, self.holdout_last, np.int64)),
                **({"history_service": pa.array([self.history_service] * n, pa.string())} if self.history_service else {}),
                "reason": reason,
                **{k: pa.array([v] * n, pa.string()) for k, v in self.identity.items()},
            }
        )


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """An embedding table -> (user ids, (N, D) float32).

    ``path``: a Parquet file, a folder of them, or an embed run folder (its ``embeddings/``). The table
    needs ``user_id`` and ``embedding`` (fixed-size or equal-length list of floats); ids must be unique
    and values finite. Raises EmbedError naming the path and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise EmbedError(f"no file or folder {p}")
    src = p / "embeddings" if (p / "embeddings").is_dir() else p
    try:
        t = pq.read_table(str(src), columns=["user_id", "embedding"])
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise EmbedError(f"cannot read {src} as a table with columns user_id, embedding: {exc}") from None
    col = t.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lens) and lens.min() != lens.max():
            raise EmbedError(f"{src}: embedding lengths differ ({lens.min()}..{lens.max()})")
        dim = int(lens[0]) if len(lens) else 0
    else:
        raise EmbedError(f"{src}: column 'embedding' must be a list of floats, got {col.type}")
    if col.null_count:
        raise EmbedError(f"{src}: {col.null_count} null embedding(s)")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim)
    ids = t.column("user_id").combine_chunks().cast(pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        raise EmbedError(f"{src}: user_id is not unique")
    if not np.isfinite(x).all():
        raise EmbedError(f"{src}: non-finite values")
    return ids.to_pylist(), x


def _concat(table: pa.Table, other: str) -> tuple[pa.Table, int]:
    users, vecs = read_embeddings(other)
    index = {u: i for i, u in enumerate(users)}
    rows = np.array([index.get(u, -1) for u in table.column("user_id").to_pylist()])
    extra = np.zeros((table.num_rows, vecs.shape[1]), np.float32)
    extra[rows >= 0] = vecs[rows[rows >= 0]]
    base = table.column("embedding").combine_chunks()
    base_np = base.flatten().to_numpy().reshape(len(base), base.type.list_size)
    joined = np.concatenate([base_np, extra], axis=1).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(joined.reshape(-1)), joined.shape[1])
    return table.set_column(table.column_names.index("embedding"), "embedding", col), int((rows < 0).sum())


def minilm_vectors(model: str, data: str, cache: str = "", progress=print) -> str | None:
    """The MiniLM vector cache an encoder needs (``None`` for other item encoders): ``cache`` or
    ``<data>/minilm_cache``, with every text of ``data`` encoded (only missing ones are)."""
    enc_cfg = json.loads((Path(model) / "config.json").read_text())
    if enc_cfg.get("item_encoder") != "minilm":
        return None
    from userfm.models.minilm import build_minilm_cache

    vectors_dir = cache or str(Path(data) / "minilm_cache")
    build_minilm_cache(data, vectors_dir, progress)
    return vectors_dir


def embed_rows(ds, cfg: EmbedConfig, identity: dict, vectors_dir: str | None) -> pa.Table:
    """A Ray Dataset of sequence rows -> one output row per input row (``EmbedActor`` columns, ``reason``
    null for embedded users), over ``cfg.actors`` actors that each load ``cfg.model`` once."""
    import ray

    from userfm import runtime

    if cfg.actors * cfg.cpus_per_actor >= runtime.cluster_cpus():
        # Actors holding every CPU would leave none for the read tasks, and the pipeline would hang
        # without an error (the Data + actors deadlock in ray-notes.md): read everything first.
        # Small blocks, so every actor gets work.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size).materialize()
    ds = runtime.map_batches_without_restarts(
        ds,
        EmbedActor,
        fn_constructor_kwargs=dict(model_dir=str(Path(cfg.model).resolve()), identity=identity, vectors_dir=vectors_dir,
                                   threads=cfg.threads_per_actor, use_gpu=cfg.gpus > 0,
                                   holdout_last=cfg.holdout_last, recent=cfg.recent,
                                   history_service=cfg.history_service),
        batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.actors,
        num_cpus=cfg.cpus_per_actor, **({"num_gpus": cfg.gpus} if cfg.gpus else {}),
    )
    parts = ray.get(list(ds.to_arrow_refs()))
    parts = [t for t in parts if t.num_rows]
    if not parts:
        raise EmbedError("no sequence rows to embed")
    return pa.concat_tables(parts)


def split_skipped(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """``embed_rows`` output -> (embedding rows without ``reason``, skipped rows: user_id, split, n_events, reason)."""
    ok = pc.is_null(table.column("reason"))
    embedded = table.filter(ok).drop_columns(["reason"])
    skipped = table.filter(pc.invert(ok)).select(["user_id", "split", "n_events", "reason"])
    return embedded, skipped


def skipped_by_reason(skipped: pa.Table) -> dict[str, int]:
    if not skipped.num_rows:
        return {}
    return {r: int(c) for r, c in zip(*np.unique(skipped.column("reason").to_numpy(zero_copy_only=False), return_counts=True))}


def write_table(out: Path, embedded: pa.Table, skipped: pa.Table, manifest: dict) -> None:
    """An embedding table folder: ``embeddings/part-00000.parquet``, ``skipped.parquet``, and
    ``manifest.json`` written last (a folder with a manifest is complete)."""
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    pq.write_table(embedded, out / "embeddings" / "part-00000.parquet")
    pq.write_table(skipped, out / "skipped.parquet")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing non-empty folder is an error unless ``overwrite`` (then it is emptied)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise EmbedError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_embed(cfg: EmbedConfig, progress=print) -> dict:
    """Embed every user of ``cfg.data`` (scope ``cfg.scope``) with ``cfg.model`` into ``cfg.out``."""
    import ray

    from userfm import runtime
    from userfm.data.dataset import load_manifest

    if not (cfg.model and cfg.data and cfg.out):
        raise EmbedError("model, data and out are required")
    identity = model_identity(cfg.model)
    manifest = load_manifest(cfg.data)
    folder = Path(cfg.data) / manifest["files"]["sequences" if cfg.scope == "all" else "service_sequences"]
    for field, svc in (("scope", cfg.scope), ("history_service", cfg.history_service)):
        if svc not in ("all", "") and svc not in manifest["services"]:
            raise EmbedError(f"{cfg.data}: {field} {svc!r}: no such service; services: {sorted(manifest['services'])}")
    out = Path(cfg.out)
    prepare_out(out, cfg.overwrite)
    vectors_dir = minilm_vectors(cfg.model, cfg.data, cfg.minilm_cache, progress)

    runtime.init_ray()
    t0 = time.perf_counter()
    files = sorted(str(f) for f in folder.glob("*.parquet"))  # explicit list: no file-listing pass
    ds = ray.data.read_parquet(files).select_columns(SEQUENCE_COLUMNS)
    if cfg.scope != "all":
        ds = ds.filter(lambda r: r["scope"] == cfg.scope)
    table = embed_rows(ds, cfg, identity, vectors_dir)
    infer_s = time.perf_counter() - t0
    users_in = table.num_rows
    embedded, skipped = split_skipped(table)
    concat_missing = 0
    if cfg.concat:
        embedded, concat_missing = _concat(embedded, cfg.concat)
    if users_in != embedded.num_rows + skipped.num_rows:
        raise EmbedError(f"user accounting failed: {users_in} in, {embedded.num_rows} embedded, {skipped.num_rows} skipped")
    expected = manifest["users"]["total"] if cfg.scope == "all" else None
    if expected is not None and users_in != expected:
        raise EmbedError(f"read {users_in} users but the dataset manifest lists {expected}")
    dim = embedded.column("embedding").type.list_size if embedded.num_rows else 0
    result = {
        "kind": "userfm.embeddings",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        **identity,
        "dim": dim,
        "holdout_last": cfg.holdout_last,
        "history_service": cfg.history_service,
        "users_in": users_in,
        "users_embedded": embedded.num_rows,
        "users_skipped": skipped.num_rows,
        "skipped_by_reason": skipped_by_reason(skipped),
        "concat": {"table": cfg.concat, "users_missing": concat_missing} if cfg.concat else None,
        "timings_s": {"inference": round(infer_s, 3)},
        "users_per_s": round(users_in / infer_s, 1) if infer_s else None,
    }
    write_table(out, embedded, skipped, result)
    progress(f"[embed] {users_in:,} users -> {embedded.num_rows:,} embeddings (dim {dim}), {skipped.num_rows} skipped; "
             f"{result['users_per_s']} users/s with {cfg.actors} actor(s) -> {out}")
    ann = write_ann(out, cfg.ann, progress=progress)
    if ann is not None:
        result["ann"] = ann
        (out / "manifest.json").write_text(json.dumps(result, indent=2))
    return result


def write_ann(table_dir: Path, when: str = "auto", previous_dir: str | Path | None = None, progress=print) -> dict | None:
    """The similar-users index of the table in ``table_dir`` (``ann`` = ``when``: auto / on / off, see EmbedConfig),
    built from the table as ``read_embeddings`` returns it (serve's row order); ``previous_dir``: a parent table
    whose index's centroids are reused. Returns the index metadata, or None when none is built (an old index of
    this folder is removed, so none is left that belongs to another table)."""
    from userfm.infer.ann import ANN_MIN_USERS, INDEX_DIR, write_index

    ids, x = read_embeddings(table_dir)
    if when == "off" or (when == "auto" and len(ids) < ANN_MIN_USERS) or len(ids) < 2:
        shutil.rmtree(Path(table_dir) / INDEX_DIR, ignore_errors=True)
        return None
    meta = write_index(table_dir, ids, x, previous_dir=previous_dir)
    progress(f"[embed] similar-users index: {meta['index']} over {meta['users']:,} users, {meta['nlist']} cells, "
             f"nprobe {meta['nprobe']} ({meta['centroids']}; {meta['build_s']:.1f}s) -> {Path(table_dir) / INDEX_DIR}")
    return meta
