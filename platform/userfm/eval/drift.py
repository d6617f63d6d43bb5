"""``userfm drift OLD NEW``: how far a new embedding table moved from an old one of the same users, and
whether the old table's downstream heads still work on it.

Three measures, on the users both tables hold:

- **aligned cosine**: each user's cosine between its old vector and its new vector mapped into the old
  space by the orthogonal Procrustes rotation ``R = argmin ||B R - A||_F`` over orthogonal ``R``
  (``scipy.linalg.orthogonal_procrustes``; rows L2-normalised for the fit so every user weighs the same;
  a table of another width is zero-padded). Two trainings of one encoder differ at least by a rotation
  that nothing downstream can see in cosines; this is the change beyond it. 1 = the same up to rotation.
- **neighbour overlap@k**: for each (sampled) user, the share of its k nearest cosine neighbours in the
  old table that are also among its k nearest in the new one (``sklearn.neighbors.NearestNeighbors``,
  exact). Rotation-free by construction: it is what similar-user features and retrieval see.
- **old heads on the new table**: each saved head (``userfm evaluate``'s ``heads/<task>/<model>/seed<k>``)
  scored on the dataset's ``split`` users with the old table, the new table as it is (what happens if
  the new table simply replaces the old one) and the new table aligned (``s B R``, with the
  least-squares scale ``s``: what shipping the rotation with the table would give); plus the share of
  users whose predicted class stays the same.

Outputs (``out``): ``drift.json`` (every number), ``drift.md`` (a Markdown section for a report or a PR),
``per_user.parquet`` (user_id, cosine, raw cosine, overlap). ``userfm report`` shows ``<run>/drift/`` as
an HTML section. Thresholds (``min_cosine``, ``min_overlap``, ``max_metric_drop``) turn the command into a
gate: crossing one makes ``userfm drift`` exit with status 1. Nothing here imports ``ray``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from userfm.config import to_dict
from userfm.errors import UserfmError


class DriftError(UserfmError, ValueError):
    """Tables or heads that cannot be compared; the message names which."""


@dataclass(frozen=True)
class DriftConfig:
    old: str = ""  # embedding table the heads were fitted on (embed run folder, folder of Parquet, or a file)
    new: str = ""  # embedding table to compare with it (the same users; any width)
    out: str = ""  # output folder for drift.json, drift.md, per_user.parquet ("" = write nothing, print only)
    data: str = ""  # sequence dataset holding the heads' labels (needed with heads)
    heads: tuple[str, ...] = ()  # saved head folders, or folders searched for them (e.g. <evaluate out>/heads)
    split: str = "test"  # users the heads are scored on: train | val | test
    k: int = 10  # neighbours per user for overlap@k
    overlap_users: int = 5000  # users whose neighbours are compared (uniform sample; 0 = all); neighbours come from all users
    normalize: bool = True  # L2-normalise rows before fitting the rotation (every user weighs the same)
    seed: int = 0  # seed of the overlap sample
    min_cosine: float | None = None  # gate: mean aligned cosine below this -> exit 1
    min_overlap: float | None = None  # gate: mean overlap@k below this -> exit 1
    max_metric_drop: float | None = None  # gate: a head's metric worse on the new table by more than this -> exit 1
    drop_on: str = "raw"  # which new table the metric gate reads: raw (the heads as they are) | aligned

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.overlap_users < 0:
            raise ValueError(f"overlap_users must be >= 0, got {self.overlap_users}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
        if self.drop_on not in ("raw", "aligned"):
            raise ValueError(f"drop_on must be 'raw' or 'aligned', got {self.drop_on!r}")
        if self.heads and not self.data:
            raise ValueError("heads need data: the dataset folder holding the heads' labels")


# --------------------------------------------------------------------------------------------- measures


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _pad(x: np.ndarray, dim: int) -> np.ndarray:
    return x if x.shape[1] == dim else np.hstack([x, np.zeros((len(x), dim - x.shape[1]), x.dtype)])


def procrustes(a: np.ndarray, b: np.ndarray, normalize: bool = True) -> tuple[np.ndarray, float]:
    """The rotation and scale that map ``b`` onto ``a``: ``s * b @ R ~ a``.

    Args:
        a: (n, Da) old vectors; b: (n, Db) new vectors of the same users, same row order.
        normalize: fit ``R`` on L2-normalised rows (each user weighs the same).
    Returns:
        R: (D, D) orthogonal, D = max(Da, Db) (the narrower table is zero-padded);
        s: least-squares scale of the raw vectors, ``<a, b R> / ||b||^2``.
    """
    from scipy.linalg import orthogonal_procrustes

    dim = max(a.shape[1], b.shape[1])
    a64, b64 = _pad(a.astype(np.float64), dim), _pad(b.astype(np.float64), dim)
    fa, fb = (_unit(a64), _unit(b64)) if normalize else (a64, b64)
    rot, _ = orthogonal_procrustes(fb, fa)
    mapped = b64 @ rot
    denom = float(np.sum(b64 * b64))
    return rot, float(np.sum(a64 * mapped) / denom) if denom > 0 else 1.0


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, D), (n, D) -> (n,) cosine of each row pair (0 where a row is all zeros)."""
    return np.sum(_unit(a.astype(np.float64)) * _unit(b.astype(np.float64)), axis=1)


def neighbours(x: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """(len(query), k) row indices of each query row's k nearest other rows of ``x`` by cosine, nearest first."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x[query])
    out = np.empty((len(query), k), np.int64)
    for r, (q, row) in enumerate(zip(query, idx)):
        own = np.flatnonzero(row == q)  # a user is its own nearest neighbour, unless a duplicate vector ties it
        out[r] = np.delete(row, own[0]) if len(own) else row[:k]
    return out


def overlap_at_k(a: np.ndarray, b: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """(len(query),) share of each query user's k nearest neighbours in ``a`` that are among its k nearest in ``b``."""
    na, nb = neighbours(a, query, k), neighbours(b, query, k)
    return np.array([len(np.intersect1d(x, y)) / na.shape[1] for x, y in zip(na, nb)])


def _summary(v: np.ndarray) -> dict:
    if not len(v):
        return {"mean": None}
    q = np.percentile(v, [5, 50, 95])
    return {"mean": float(v.mean()), "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "min": float(v.min())}


# --------------------------------------------------------------------------------------------- heads


def find_heads(paths: tuple[str, ...]) -> dict[str, Path]:
    """Head name (its path relative to the folder given) -> folder, for every saved head under ``paths``."""
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if (p / "head.json").is_file():  # one head: named like evaluate's folders, <task>/<model>/seed<k>
            found["/".join(p.parts[-3:])] = p
            continue
        if not p.is_dir():
            raise DriftError(f"heads: no folder {p}")
        hits = sorted(h.parent for h in p.rglob("head.json"))
        if not hits:
            raise DriftError(f"heads: no saved head (head.json) under {p}")
        for h in hits:
            found[h.relative_to(p).as_posix()] = h
    return found


def score_head(head, metric: str, y: np.ndarray, tables: dict[str, np.ndarray | None]) -> dict:
    """One head's ``metric`` on each table's rows of the same users.

    Args:
        head: ``evaluate.load_head`` result; y: (n,) labels (class indices in ``head.classes`` order, or values);
        tables: name -> (n, D) embeddings of those users, row for row (None: the head cannot read that table).
    Returns: ``{"metric", "higher_is_better", "values": {name: value}, "agreement": {name: share of users whose
    predicted class is the one the first table gives}}`` (agreement: classification heads only).
    """
    from userfm.eval import metrics as M

    classes = head.classes
    values, preds = {}, {}
    for name, x in tables.items():
        if x is None:
            values[name] = None
            continue
        scores = head.scores(x)
        values[name] = float(M.compute(metric, y, scores))
        if classes is not None:
            preds[name] = np.asarray(scores).argmax(axis=1)
    first = next(iter(preds.values()), None)
    agreement = {n: float(np.mean(p == first)) for n, p in preds.items()} if first is not None else {}
    return {"metric": metric, "higher_is_better": M.HIGHER_IS_BETTER[metric], "values": values, "agreement": agreement}


def _table_path(path: str | Path) -> Path:
    """An embedding table's files folder: a run folder and its embeddings/ are the same table."""
    p = Path(path).resolve()
    return p / "embeddings" if (p / "embeddings").is_dir() else p


def _heads_section(cfg: DriftConfig, ids: list[str], tables: dict[str, np.ndarray], progress) -> list[dict]:
    from userfm.eval.heads import load_head
    from userfm.eval.task_data import task_data, user_table
    from userfm.eval.tasks import EvalError, TaskConfig

    if not cfg.heads:
        return []
    users = user_table(cfg.data)
    row_of = {u: i for i, u in enumerate(ids)}
    rows = []
    for name, path in find_heads(cfg.heads).items():
        head = load_head(path)
        task = TaskConfig(**head.meta["task"])
        entry = {"head": name, "path": str(path), "task": task.name, "kind": head.meta.get("kind"),
                 "embedding_source": head.meta.get("embedding_source")}
        src = head.meta.get("embedding_source")
        if src == "random" or (src and Path(src).exists() and _table_path(src) != _table_path(cfg.old)):
            # `userfm evaluate` saves heads of every table it compared (random floor included) side by side
            rows.append({**entry, "skipped": f"fitted on {src}, not on the old table {cfg.old}"})
            continue
        if task.type == "retrieval":
            rows.append({**entry, "skipped": "retrieval heads rank the catalog per user; drift scores classification and regression heads"})
            continue
        try:
            td = task_data(cfg.data, task, users)
        except EvalError as exc:
            rows.append({**entry, "skipped": str(exc)})
            continue
        if td.classes is not None and list(td.classes) != list(head.classes or []):
            rows.append({**entry, "skipped": f"the dataset's classes {td.classes} are not the head's {head.classes}"})
            continue
        sel = [(row_of[u], y) for u, y in zip(td.ids[cfg.split], td.y[cfg.split]) if u in row_of]
        if not sel:
            rows.append({**entry, "skipped": f"no {cfg.split} user of task {task.name!r} is in both tables"})
            continue
        idx, y = np.array([s[0] for s in sel]), np.array([s[1] for s in sel])
        dim = int(head.meta["input_dim"])
        if tables["old"].shape[1] != dim:
            rows.append({**entry, "skipped": f"the head takes {dim}-d embeddings, the old table has {tables['old'].shape[1]}"})
            continue
        # the aligned table lives in the old space (old width); the raw one only fits a head of its own width
        xs = {n: x[idx] if x.shape[1] == dim else None for n, x in tables.items()}
        s = score_head(head, task.metric, y, xs)
        sign = 1.0 if s["higher_is_better"] else -1.0
        drop = {n: (sign * (s["values"]["old"] - v) if v is not None else None) for n, v in s["values"].items() if n != "old"}
        rows.append({**entry, "users": len(idx), **s, "drop": drop})
        progress(f"[drift] head {name}: {s['metric']} old {s['values']['old']:.4f}, new "
                 + ", ".join(f"{n} {v:.4f}" for n, v in s["values"].items() if n != "old" and v is not None))
    return rows


# --------------------------------------------------------------------------------------------- driver


def _load(path: str, which: str) -> tuple[list[str], np.ndarray]:
    from userfm.infer.embed import EmbedError, read_embeddings

    try:
        return read_embeddings(path)
    except EmbedError as exc:
        raise DriftError(f"{which}: {exc}") from None


def compare(old_ids: list[str], old_x: np.ndarray, new_ids: list[str], new_x: np.ndarray, cfg: DriftConfig) -> dict:
    """The drift measures between two tables (pure numpy/scipy/sklearn); see the module docstring.

    Returns ``{"users": counts, "ids": common ids, "cosine": (n,), "cosine_raw": (n,) or None,
    "overlap": (n,) with NaN for users not sampled, "tables": {"old", "raw", "aligned"} (n, D) arrays,
    "rotation": {...}}``.
    """
    new_row = {u: i for i, u in enumerate(new_ids)}
    common = [(i, new_row[u]) for i, u in enumerate(old_ids) if u in new_row]
    if len(common) < 2:
        raise DriftError(f"the tables share {len(common)} user(s); drift needs at least 2")
    ia, ib = np.array([c[0] for c in common]), np.array([c[1] for c in common])
    a, b = old_x[ia], new_x[ib]
    rot, scale = procrustes(a, b, cfg.normalize)
    aligned = scale * (_pad(b.astype(np.float64), rot.shape[0]) @ rot)
    cos = row_cosine(_pad(a, rot.shape[0]), aligned)
    raw = row_cosine(a, b) if a.shape[1] == b.shape[1] else None
    n = len(common)
    query = np.arange(n)
    if cfg.overlap_users and cfg.overlap_users < n:
        query = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.overlap_users, replace=False))
    overlap = np.full(n, np.nan)
    overlap[query] = overlap_at_k(a, b, query, cfg.k)
    return {
        "users": {"old": len(old_ids), "new": len(new_ids), "common": n, "only_old": len(old_ids) - n,
                  "only_new": len(new_ids) - n, "overlap_sampled": int(len(query))},
        "ids": [old_ids[i] for i in ia],
        "cosine": cos, "cosine_raw": raw, "overlap": overlap,
        "tables": {"old": a, "raw": b, "aligned": aligned[:, :a.shape[1]].astype(np.float32)},
        "rotation": {"dim_old": int(a.shape[1]), "dim_new": int(b.shape[1]), "scale": scale,
                     "distance_from_identity": float(np.linalg.norm(rot - np.eye(rot.shape[0])))},
    }


def gate(result: dict, cfg: DriftConfig) -> list[str]:
    """The thresholds a drift result crosses, one sentence each ([] = within every threshold)."""
    fails = []
    mean_cos, mean_ov = result["cosine"]["mean"], result["overlap"]["mean"]
    if cfg.min_cosine is not None and mean_cos < cfg.min_cosine:
        fails.append(f"mean aligned cosine {mean_cos:.4f} < min_cosine {cfg.min_cosine}")
    if cfg.min_overlap is not None and mean_ov < cfg.min_overlap:
        fails.append(f"mean overlap@{cfg.k} {mean_ov:.4f} < min_overlap {cfg.min_overlap}")
    if cfg.max_metric_drop is not None:
        for h in result["heads"]:
            d = (h.get("drop") or {}).get(cfg.drop_on)
            if d is not None and d > cfg.max_metric_drop:
                fails.append(f"head {h['head']}: {h['metric']} worse by {d:.4f} on the {cfg.drop_on} new table "
                             f"> max_metric_drop {cfg.max_metric_drop}")
    return fails


def run_drift(cfg: DriftConfig, progress: Callable[[str], None] = print) -> dict:
    """Compare ``cfg.old`` and ``cfg.new``; write the outputs to ``cfg.out``; return the result dict.

    ``result["failures"]`` lists the thresholds crossed (the CLI exits 1 when it is not empty).
    """
    if not (cfg.old and cfg.new):
        raise DriftError("old and new embedding tables are required")
    t0 = time.perf_counter()
    old_ids, old_x = _load(cfg.old, "old")
    new_ids, new_x = _load(cfg.new, "new")
    c = compare(old_ids, old_x, new_ids, new_x, cfg)
    progress(f"[drift] {c['users']['common']:,} common users; aligned cosine mean {c['cosine'].mean():.4f}, "
             f"overlap@{cfg.k} mean {np.nanmean(c['overlap']):.4f}")
    tables = {"old": c["tables"]["old"], "raw": c["tables"]["raw"], "aligned": c["tables"]["aligned"]}
    result = {
        "kind": "userfm.drift",
        "config": to_dict(cfg),
        "old": cfg.old, "new": cfg.new,
        "users": c["users"],
        "rotation": c["rotation"],
        "cosine": _summary(c["cosine"]),
        "cosine_raw": _summary(c["cosine_raw"]) if c["cosine_raw"] is not None else None,
        "overlap": {"k": min(cfg.k, c["users"]["common"] - 1), **_summary(c["overlap"][~np.isnan(c["overlap"])])},
        "heads": _heads_section(cfg, c["ids"], tables, progress),
    }
    result["failures"] = gate(result, cfg)
    result["timings_s"] = {"total": round(time.perf_counter() - t0, 3)}
    if cfg.out:
        import pyarrow.parquet as pq

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "drift.md").write_text(format_markdown(result))
        raw = c["cosine_raw"]
        pq.write_table(pa.table({"user_id": pa.array(c["ids"], pa.string()), "cosine": c["cosine"],
                                 "cosine_raw": raw if raw is not None else pa.nulls(len(c["ids"]), pa.float64()),
                                 "overlap": c["overlap"]}), out / "per_user.parquet")
        progress(f"[drift] wrote {out / 'drift.md'}, drift.json, per_user.parquet")
    return result


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_markdown(r: dict) -> str:
    """The drift result as a Markdown section."""
    u, rot = r["users"], r["rotation"]
    lines = [
        f"## Embedding drift: `{r['old']}` -> `{r['new']}`",
        "",
        f"{u['common']:,} users in both tables ({u['only_old']:,} only in the old one, {u['only_new']:,} only in the new one); "
        f"width {rot['dim_old']} -> {rot['dim_new']}; Procrustes scale {rot['scale']:.4g}, "
        f"||R - I|| = {rot['distance_from_identity']:.3f}.",
        "",
        "| measure | mean | p05 | median | p95 | min |",
        "|---|---|---|---|---|---|",
        "| per-user cosine, aligned (orthogonal Procrustes) | " + " | ".join(_f(r["cosine"].get(k)) for k in ("mean", "p05", "median", "p95", "min")) + " |",
    ]
    if r.get("cosine_raw"):
        lines.append("| per-user cosine, as is (no alignment) | " + " | ".join(_f(r["cosine_raw"].get(k)) for k in ("mean", "p05", "median", "p95", "min")) + " |")
    ov = r["overlap"]
    lines.append(f"| neighbour overlap@{ov['k']} ({u['overlap_sampled']:,} users) | " + " | ".join(_f(ov.get(k)) for k in ("mean", "p05", "median", "p95", "min")) + " |")
    heads = [h for h in r["heads"] if "values" in h]
    if heads:
        lines += ["", f"Old heads on the new table ({r['config']['split']} users):", "",
                  "| head | task | metric | old table | new, as is | new, aligned | drop (as is) | same prediction (as is) |",
                  "|---|---|---|---|---|---|---|---|"]
        for h in heads:
            v, d, a = h["values"], h["drop"], h["agreement"]
            lines.append(f"| {h['head']} | {h['task']} | {h['metric']} | {_f(v['old'])} | {_f(v['raw'])} | {_f(v['aligned'])} | "
                         f"{_f(d.get('raw'))} | {_f(a.get('raw'), 3) if a else '-'} |")
    for h in r["heads"]:
        if "skipped" in h:
            lines.append(f"\n- head {h['head']} skipped: {h['skipped']}")
    lines += ["", ("**Over threshold**: " + "; ".join(r["failures"])) if r["failures"] else "Within every configured threshold.", ""]
    return "\n".join(lines)
