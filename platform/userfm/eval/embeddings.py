"""Embedding tables as evaluate reads them: load, the held-out events and history they were made from,
side-by-side concatenation, the random floor."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.eval.tasks import EvalError


# --------------------------------------------------------------------------------------------------
# Embedding tables
# --------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingTable:
    """A frozen embedding table in memory: user ids and a (n, D) float32 matrix."""

    name: str
    source: str  # path, or "random"
    ids: pa.Array  # (n,) string
    x: np.ndarray  # (n, D) float32
    holdout_last: int | None = 0  # events held out of each history when embedding (None: unknown)
    history_service: str = ""  # the service whose events alone were embedded ("" = all; EmbedConfig.history_service)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """(m,) user ids -> (m, D); every id must be in the table."""
        idx = pc.index_in(pa.array(user_ids, pa.string()), value_set=self.ids).to_numpy(zero_copy_only=False)
        missing = np.isnan(idx) if idx.dtype.kind == "f" else np.zeros(len(idx), bool)
        if missing.any():
            ex = [str(u) for u in np.asarray(user_ids)[missing][:3]]
            raise EvalError(f"embeddings {self.name!r} ({self.source}): {int(missing.sum())} labelled user(s) have no "
                            f"embedding, e.g. {ex}; embed every user of the dataset")
        return self.x[idx.astype(np.int64)]


def load_embeddings(path: str | Path, name: str = "") -> EmbeddingTable:
    """Read an embedding table (Parquet file, folder, or `userfm embed` run folder): user_id, embedding[D]."""
    from userfm.infer.embed import EmbedError, read_embeddings

    try:
        ids, x = read_embeddings(path)
    except EmbedError as exc:
        raise EvalError(f"embeddings {name!r}: {exc}") from None
    return EmbeddingTable(name, str(path), pa.array(ids, pa.string()), x, embeddings_holdout(path, name),
                          embeddings_history_service(path, name))


def embeddings_holdout(path: str | Path, name: str = "") -> int | None:
    """``holdout_last`` an embedding table was made with: its ``holdout_last`` column (``userfm embed``
    writes one), else the embed ``manifest.json`` next to it (tables from before the column: 0), else None."""
    found, val = _table_constant(path, "holdout_last", name)
    if found:
        return int(val) if val is not None else None
    info = _embed_manifest(path)
    return int(info.get("holdout_last", 0)) if info is not None else None


def embeddings_history_service(path: str | Path, name: str = "") -> str:
    """The service whose events alone an embedding table was made from (``userfm embed --set
    history_service=...``): its ``history_service`` column (written only when set), else the embed
    ``manifest.json`` next to it, else "" (every event)."""
    found, val = _table_constant(path, "history_service", name)
    if found:
        return val or ""
    return (_embed_manifest(path) or {}).get("history_service") or ""


def _table_constant(path: str | Path, column: str, name: str) -> tuple[bool, object]:
    """(whether the table has ``column``, its one value); rows disagreeing on it are an error."""
    import pyarrow.dataset as pads

    p = Path(path)
    src = p / "embeddings" if (p / "embeddings").is_dir() else p
    ds = pads.dataset(str(src), format="parquet")
    if column not in ds.schema.names:
        return False, None
    vals = pc.unique(ds.to_table(columns=[column]).column(0)).to_pylist()
    if len(vals) > 1:
        raise EvalError(f"embeddings {name!r} ({path}): rows made with different {column} values {sorted(vals, key=str)}")
    return True, (vals[0] if vals else None)


def concat_tables(a: EmbeddingTable, b: EmbeddingTable, name: str) -> EmbeddingTable:
    """[a | b] for the users of ``a`` that ``b`` has too (in ``a``'s order): (n, Da + Db). The two tables must
    read the same history (holdout and history service), as every table of one task does."""
    if a.history_service != b.history_service or None not in (a.holdout_last, b.holdout_last) and a.holdout_last != b.holdout_last:
        raise EvalError(f"{name}: tables {a.name!r} and {b.name!r} read different histories: "
                        f"{(a.holdout_last, a.history_service)} vs {(b.holdout_last, b.history_service)}")
    keep = pc.is_in(a.ids, value_set=b.ids).to_numpy(zero_copy_only=False)
    ids = a.ids.filter(pa.array(keep))
    x = np.hstack([a.x[keep], b.lookup(np.asarray(ids.to_pylist(), dtype=object))]).astype(np.float32)
    return EmbeddingTable(name, f"{a.source} + {b.source}", ids, x, a.holdout_last, a.history_service)


def _embed_manifest(path: str | Path) -> dict | None:
    """The ``userfm embed`` manifest of a table given as its run folder, its ``embeddings/`` folder or a
    file in it; None when there is none."""
    p = Path(path)
    for m in (p / "manifest.json", p.parent / "manifest.json", p.parent.parent / "manifest.json"):
        if m.is_file():
            info = json.loads(m.read_text())
            if info.get("kind") == "userfm.embeddings":
                return info
    return None


def embedding_model(path: str | Path) -> tuple[str, str] | None:
    """(model folder, MiniLM cache or "") of the encoder that made an embedding table, from its embed manifest;
    None without a manifest, or when the model folder is gone or its weights changed since (digest)."""
    info = _embed_manifest(path) or {}
    model = (info.get("config") or {}).get("model")
    weights = Path(model) / "model.safetensors" if model else None
    if weights is None or not weights.is_file():
        return None
    from userfm.infer.embed import model_identity

    if model_identity(model)["model_version"] != info.get("model_version"):
        return None
    return model, (info.get("config") or {}).get("minilm_cache") or ""


def pretrain_holdout(path: str | Path) -> int | None:
    """``holdout_last`` the encoder behind an embedding table was pretrained with: the embed manifest's
    ``config.model`` -> the pretraining run's ``config.json`` (``<run>/model`` is its export). None when
    the table has no manifest or its model is not a `userfm pretrain` export."""
    model = ((_embed_manifest(path) or {}).get("config") or {}).get("model")
    run_cfg = Path(model).parent / "config.json" if model else None
    if run_cfg is None or not run_cfg.is_file():
        return None
    return int(json.loads(run_cfg.read_text()).get("pretrain", {}).get("holdout_last", 0))


def random_embeddings(user_ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(n,) ids -> (n, dim) float32 N(0, 1): each user's vector depends only on (user id, seed), not on
    which other users are in the batch, so train and test users see the same vectors in every run."""
    out = np.empty((len(user_ids), dim), np.float32)
    for i, u in enumerate(user_ids):
        h = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{u}".encode(), digest_size=8).digest(), "little")
        out[i] = np.random.default_rng(h).standard_normal(dim, dtype=np.float32)
    return out


