"""Reading a sequence dataset written by ``userfm ingest`` (pure Arrow, no Ray) and summarizing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from userfm.errors import UserfmError
from userfm.data.schema import ALL_SCOPE, SCHEMA_VERSION, SEQUENCE_SCHEMA, SPLITS


class DatasetError(UserfmError, ValueError):
    """Not a (complete, compatible) sequence dataset; the message names the folder."""


def load_manifest(path: str | Path) -> dict:
    """The manifest of a complete dataset folder; raises DatasetError otherwise."""
    mf = Path(path) / "manifest.json"
    if not mf.is_file():
        raise DatasetError(f"{path}: no manifest.json (not a userfm sequence dataset, or ingest did not finish)")
    manifest = json.loads(mf.read_text())
    major = str(manifest.get("schema_version", "0")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise DatasetError(f"{path}: schema version {manifest.get('schema_version')} is not compatible with {SCHEMA_VERSION}")
    return manifest


def read_sequences(
    path: str | Path, *, scope: str = ALL_SCOPE, split: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Sequences of a dataset: scope "all" (one row per user) or a service name (that service's rows).

    Args:
        path: dataset folder.
        scope: "all" or a service name.
        split: "train" / "val" / "test", or None for every user.
        columns: subset of SEQUENCE_SCHEMA columns.
    """
    manifest = load_manifest(path)
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    sub = manifest["files"]["sequences" if scope == ALL_SCOPE else "service_sequences"]
    folder = Path(path) / sub
    if not any(folder.glob("*.parquet")):
        return SEQUENCE_SCHEMA.empty_table().select(columns or SEQUENCE_SCHEMA.names)
    ds = pads.dataset(str(folder), format="parquet", schema=SEQUENCE_SCHEMA)
    flt = None
    if scope != ALL_SCOPE:
        if scope not in manifest["services"]:
            raise DatasetError(f"{path}: no service {scope!r}; services: {sorted(manifest['services'])}")
        flt = pc.field("scope") == scope
    if split is not None:
        f2 = pc.field("split") == split
        flt = f2 if flt is None else (flt & f2)
    return ds.to_table(columns=columns, filter=flt)


def read_attributes(path: str | Path, name: str | None = None) -> pa.Table:
    """An attributes table ingested with the dataset (the first one when ``name`` is None)."""
    manifest = load_manifest(path)
    tables = {a["name"]: a for a in manifest.get("attributes", [])}
    if not tables:
        raise DatasetError(f"{path}: no attributes were ingested with this dataset")
    entry = tables[name] if name is not None else next(iter(tables.values()))
    return pq.read_table(Path(path) / entry["file"])


def summarize(path: str | Path) -> dict:
    """Counts a person wants first: rows, quarantine, users by split, services, history lengths."""
    manifest = load_manifest(path)
    lengths = read_sequences(path, columns=["n_events"]).column("n_events").to_numpy()
    if len(lengths):
        q = np.percentile(lengths, [25, 50, 75, 90, 99]).round(1).tolist()
        hist = {
            "min": int(lengths.min()),
            "p25": q[0],
            "median": q[1],
            "p75": q[2],
            "p90": q[3],
            "p99": q[4],
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 2),
            "users_le_5": int((lengths <= 5).sum()),
            "users_ge_100": int((lengths >= 100).sum()),
        }
    else:
        hist = {}
    # one by_service row per (user, service): users with 2+ rows are active in several services
    folder = Path(path) / manifest["files"]["service_sequences"]
    per_user = pq.read_table(folder, columns=["user_id"]).column("user_id") if any(folder.glob("*.parquet")) else pa.array([], pa.string())
    multi = sum(1 for d in pc.value_counts(per_user).to_pylist() if d["counts"] > 1) if len(per_user) else 0
    return {
        "path": str(path),
        "rows_in": manifest["rows_in"],
        "rows_kept": manifest["rows_kept"],
        "rows_quarantined": manifest["rows_quarantined"],
        "quarantined_by_reason": {k: v for k, v in manifest["quarantined_by_reason"].items() if v},
        "texts_truncated": manifest["texts_truncated"],
        "users": manifest["users"],
        "users_in_several_services": multi,
        "services": manifest["services"],
        "history_length": hist,
        "attributes": [a["name"] for a in manifest.get("attributes", [])],
    }


def format_summary(s: dict) -> str:
    """A short human-readable block for the terminal."""
    lines = [
        f"dataset  {s['path']}",
        f"rows     {s['rows_in']:,} in = {s['rows_kept']:,} kept + {s['rows_quarantined']:,} quarantined"
        + (f" ({', '.join(f'{k}: {v:,}' for k, v in s['quarantined_by_reason'].items())})" if s["quarantined_by_reason"] else ""),
        f"users    {s['users']['total']:,} (train {s['users']['train']:,} / val {s['users']['val']:,} / test {s['users']['test']:,});"
        f" {s['users_in_several_services']:,} active in 2+ services",
        "services " + ", ".join(f"{k}: {v:,}" for k, v in s["services"].items()),
    ]
    h = s["history_length"]
    if h:
        lines.append(
            f"history  events/user min {h['min']} | p25 {h['p25']} | median {h['median']} | p75 {h['p75']} | p99 {h['p99']} | max {h['max']};"
            f" {h['users_le_5']:,} users with <=5, {h['users_ge_100']:,} with >=100"
        )
    if s["texts_truncated"]:
        lines.append(f"text     {s['texts_truncated']:,} over-long texts truncated")
    if s["attributes"]:
        lines.append("labels   " + ", ".join(s["attributes"]))
    return "\n".join(lines)
