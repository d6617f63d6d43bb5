"""Tiny SEQUENCE_SCHEMA rows for encoder/objective tests (not a test module)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

from userfm.data.schema import SEQUENCE_SCHEMA

T0 = dt.datetime(2023, 5, 17, 13, 0, tzinfo=dt.timezone.utc)  # a Wednesday, 13:00 UTC
SERVICES = ("shopping", "search", "news")
WORDS = ("red", "running", "shoes", "laptop", "bag", "café", "한국어", "news", "phone", "case", "blue")
TREE = {"Clothing": ("Shoes", "Shirts"), "Electronics": ("Phones", "Laptops"), "Books": ("Fiction",)}


def event_rows(n_users: int = 6, seed: int = 0, max_len: int = 12, services=SERVICES) -> dict[str, list]:
    """Scope-"all" rows plus one row per (user, service): a dict of column lists."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in SEQUENCE_SCHEMA.names}
    for u in range(n_users):
        n = int(rng.integers(1, max_len + 1))
        hours = np.sort(rng.integers(0, 24 * 400, size=n))
        events = []
        for h in hours:
            top = list(TREE)[int(rng.integers(len(TREE)))]
            sub = TREE[top][int(rng.integers(len(TREE[top])))]
            path = [top, sub][: int(rng.integers(0, 3))] or None
            events.append(
                dict(
                    ts=T0 + dt.timedelta(hours=int(h)),
                    service=services[int(rng.integers(len(services)))],
                    text=" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=int(rng.integers(0, 5)))),
                    item_id=f"i{int(rng.integers(100))}",
                    category=path,
                    value=float(rng.random()),
                )
            )
        scopes = {"all": events}
        for s in services:
            sub_events = [e for e in events if e["service"] == s]
            if sub_events:
                scopes[s] = sub_events
        for scope, evs in scopes.items():
            cols["user_id"].append(f"u{u}")
            cols["split"].append("train")
            cols["scope"].append(scope)
            cols["n_events"].append(len(evs))
            for k in ("ts", "service", "text", "item_id", "category", "value"):
                cols[k].append([e[k] for e in evs])
    return cols


def table(cols: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict(cols, schema=SEQUENCE_SCHEMA)


def all_scope(tab: pa.Table) -> pa.Table:
    return tab.filter(pa.compute.equal(tab.column("scope"), "all"))
