"""A task's users, labels and splits from a dataset folder (``task_data``): the user table, the held-out
last events, item histories, folds and label-budget picks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.data.dataset import load_manifest, read_attributes, read_sequences
from userfm.eval.tasks import EvalError, LAST_EVENT, TaskConfig, _category_level


# --------------------------------------------------------------------------------------------------
# Users, labels, splits
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Labelled users of one task, by split. ``y`` holds class indices (classification) or floats."""

    task: TaskConfig
    ids: dict[str, np.ndarray]  # split -> (n,) user ids (object array of str)
    y: dict[str, np.ndarray]  # split -> (n,) int64 class index or float64 value
    classes: list | None  # class values in index order (None for regression)
    n_events: dict[str, np.ndarray]  # split -> (n,) history length (without the held-out event for last_event tasks)
    left_out: dict[str, int]  # users dropped and why
    history: dict[str, list[np.ndarray]] | None = None  # retrieval: split -> per user, catalog indices of the
    #                                                     items before the held-out one (oldest first)
    outside: dict[str, list[np.ndarray]] | None = None  # retrieval, catalog "service": split -> per user, the
    #                                                     catalog indices outside the held-out item's service

    @property
    def holdout(self) -> int:
        """Events held out of each user's history for this task (the task's holdout on last_event, else 0)."""
        return self.task.holdout

    @property
    def view(self) -> tuple[int, str]:
        """(holdout, history service) of the history every model of this task reads (``TaskConfig.view``)."""
        return self.task.view

    def excluded(self, split: str, mask_seen: bool) -> list[np.ndarray] | None:
        """Per user of ``split``, the catalog indices removed from the ranking: items outside the catalog
        (``catalog: service``) and, with ``mask_seen``, the user's history (the target never is); None: none."""
        parts = [p for p in ((self.history or {}).get(split) if mask_seen else None,
                             (self.outside or {}).get(split)) if p is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        return [np.concatenate([a, b]) for a, b in zip(*parts)]


def user_table(data: str | Path) -> pa.Table:
    """user_id, split, n_events (whole history) and n_services (services the user is active in)."""
    manifest = load_manifest(data)
    users = read_sequences(data, columns=["user_id", "split", "n_events"])
    ids = [read_sequences(data, scope=s, columns=["user_id"]).column("user_id") for s in manifest["services"]]
    if ids:
        counts = pc.value_counts(pa.chunked_array([c for col in ids for c in col.chunks], pa.string()))
        per = pa.table({"user_id": counts.field("values"), "n_services": counts.field("counts")})
        users = users.join(per, "user_id", join_type="left outer")
    else:
        users = users.append_column("n_services", pa.nulls(users.num_rows, pa.int64()))
    return users.set_column(users.schema.get_field_index("n_services"), "n_services",
                            pc.fill_null(users.column("n_services"), 0).cast(pa.int64()))


def fold_of(user_ids: np.ndarray, k: int) -> np.ndarray:
    """(n,) user ids -> (n,) fold index in [0, k): the user-id hash (the one ingest splits by) cut in k."""
    from userfm.data.sequences import split_fraction

    return np.minimum((np.asarray([split_fraction(u) for u in user_ids], np.float64) * k).astype(np.int64), k - 1)


def label_rank(user_ids: np.ndarray) -> np.ndarray:
    """(n,) user ids -> (n,) position in [0, 1) of a salted user-id hash, independent of the split and fold
    hash: a label budget keeps the first users by it (within each class, :func:`budget_pick`), so a smaller
    budget is a subset of a larger one up to the class quotas' rounding."""
    from userfm.data.sequences import split_fraction

    return np.asarray([split_fraction("labels:" + u) for u in user_ids], np.float64)


def budget_pick(idx: np.ndarray, rank: np.ndarray, n: int, strata: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` of ``idx`` a label budget keeps: the first by ``rank``; with ``strata`` (class per row), the
    first of each class by rank, the classes' quotas in their proportions (largest remainder, so they sum
    to ``n``): a 200-user budget drawn plainly can hold 54 % parents where the split holds 43 %."""
    if strata is None:
        return idx[np.argsort(rank, kind="stable")[:n]]
    values, counts = np.unique(strata, return_counts=True)
    share = n * counts / counts.sum()
    quota = np.floor(share).astype(np.int64)
    quota[np.argsort(-(share - quota), kind="stable")[: n - int(quota.sum())]] += 1
    picked = [idx[strata == v][np.argsort(rank[strata == v], kind="stable")[:q]] for v, q in zip(values, quota)]
    return np.sort(np.concatenate(picked))


def task_data(data: str | Path, task: TaskConfig, users: pa.Table, tables: dict[str, pa.Table] | None = None,
              fold: tuple[int, int] | None = None, labels: int = 0) -> TaskData:
    """Join the task's label column with the users table, filter users, encode labels by split.

    Splits come from the dataset (user-disjoint by construction); a label table whose split disagrees
    with the sequences' is an error rather than a silent leak. ``fold`` (f, k): cross-fitting instead:
    fold f of :func:`fold_of` is the test split, fold f + 1 (mod k) val, the others train; the classes
    are those of every labelled user, so all k folds share one class order. ``labels`` > 0: a label
    budget: heads and baselines see only ``labels`` training users, the first by :func:`label_rank` within
    each class in the classes' proportions (:func:`budget_pick`), and the same share of the val users (at
    least one); test users are untouched, and the classes stay those of all training users, so every
    budget scores the same test users against the same class order.
    """
    table = (tables or {}).get(task.label_table)
    if table is None:
        table = _attribute_table(data, task.label_table)
    level = _category_level(task.target) if task.table == LAST_EVENT else None
    if level is not None:  # level k of the held-out event's category path (null when the path is shorter)
        paths = table.column("category_path").to_pylist()
        table = table.append_column(task.target, pa.array([p[level] if p and len(p) > level else None for p in paths],
                                                          pa.string()))
    if task.target not in table.column_names:
        cols = [c for c in table.column_names if c not in ("user_id", "split")]
        raise EvalError(f"task {task.name!r}: column {task.target!r} is not in table {task.table!r} (columns: {cols})")
    lab_cols = ["user_id", "split", task.target] + (["service"] if task.users.startswith("last_service:") else [])
    lab = table.select(lab_cols).rename_columns(["user_id", "label_split", "label", "label_service"][:len(lab_cols)])
    joined = lab.join(users, "user_id", join_type="inner").sort_by("user_id")
    left_out = {"no_sequence": lab.num_rows - joined.num_rows}
    bad = pc.sum(pc.not_equal(joined.column("split"), joined.column("label_split"))).as_py() or 0
    if bad:
        raise EvalError(f"task {task.name!r}: {bad} user(s) have a different split in table {task.table!r} than in the "
                        f"sequences; re-ingest the dataset so labels and sequences share one split")
    null = joined.column("label").is_null()
    left_out["null_label"] = int(pc.sum(null).as_py() or 0)
    joined = joined.filter(pc.invert(null))
    if task.users == "multi_service":
        keep = pc.greater_equal(joined.column("n_services"), 2)
    elif task.users.startswith("service:"):
        svc = task.users.split(":", 1)[1]
        manifest = load_manifest(data)
        if svc not in manifest["services"]:
            raise EvalError(f"task {task.name!r}: users {task.users!r}: no service {svc!r}; services: {sorted(manifest['services'])}")
        active = read_sequences(data, scope=svc, columns=["user_id"]).column("user_id")
        keep = pc.is_in(joined.column("user_id"), value_set=active.combine_chunks())
    elif task.users.startswith("last_service:"):
        svc = task.users.split(":", 1)[1]
        manifest = load_manifest(data)
        if svc not in manifest["services"]:
            raise EvalError(f"task {task.name!r}: users {task.users!r}: no service {svc!r}; services: {sorted(manifest['services'])}")
        keep = pc.fill_null(pc.equal(joined.column("label_service"), svc), False)
    else:
        keep = None
    if keep is not None:
        left_out["users_filter"] = joined.num_rows - int(pc.sum(keep).as_py() or 0)
        joined = joined.filter(keep)
    svc = task.history_service
    if svc:  # the model reads one service's events: users with none of them before the label have no input
        services = load_manifest(data)["services"]
        if svc not in services:
            raise EvalError(f"task {task.name!r}: history {task.history!r}: no service {svc!r}; "
                            f"services: {sorted(services)}")
        from userfm.infer.embed import read_history

        counts = read_history(data, ["user_id", "n_events"], task.holdout, svc)
        joined = joined.drop_columns(["n_events"]).join(
            counts.rename_columns(["user_id", "n_events"]).select(["user_id", "n_events"]), "user_id").sort_by("user_id")
        has = pc.greater(joined.column("n_events"), 0)
        left_out["no_history_in_service"] = joined.num_rows - int(pc.sum(has).as_py() or 0)
        joined = joined.filter(has)
        hold = 0  # n_events above is already the history's length
    else:
        hold = task.holdout

    split = np.asarray(joined.column("split").to_pylist(), dtype=object)
    if fold is not None:
        f, k = fold
        fid = fold_of(np.asarray(joined.column("user_id").to_pylist(), dtype=object), k)
        split = np.where(fid == f, "test", np.where(fid == (f + 1) % k, "val", "train")).astype(object)
    raw = joined.column("label").to_pylist()
    classes, hist = None, None
    if task.type == "retrieval":
        catalog, user_items = item_histories(data, holdout=task.holdout, service=svc)
        classes = catalog
        index = {v: i for i, v in enumerate(catalog)}
        y_all = np.asarray([index[v] for v in raw], dtype=np.int64)  # the held-out item is in the catalog by construction
        hist = [user_items[u] for u in joined.column("user_id").to_pylist()]
        keep_rows = np.ones(len(y_all), bool)
        if task.catalog == "service":
            item_svc = item_services(data, catalog)
            by_svc = {v: np.flatnonzero(item_svc != v) for v in np.unique(item_svc)}  # one array per service, shared
            outside = [by_svc[item_svc[i]] for i in y_all]
    elif task.type == "regression":
        try:
            y_all = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise EvalError(f"task {task.name!r}: column {task.target!r} of {task.table!r} is not numeric: {exc}") from None
        if task.transform == "log1p":
            y_all = np.log1p(y_all)
        keep_rows = np.ones(len(y_all), bool)
    else:
        train_vals = {v for v, s in zip(raw, split) if s == "train" or fold is not None}
        classes = sorted(train_vals, key=lambda v: (str(type(v)), v))
        if task.type == "binary" and len(classes) != 2:
            raise EvalError(f"task {task.name!r}: binary target {task.target!r} has {len(classes)} class(es) among "
                            f"training users: {classes[:5]}")
        if len(classes) < 2:
            raise EvalError(f"task {task.name!r}: target {task.target!r} has fewer than 2 classes among training users")
        index = {v: i for i, v in enumerate(classes)}
        y_all = np.asarray([index.get(v, -1) for v in raw], dtype=np.int64)
        keep_rows = y_all >= 0  # val/test users whose class never occurs in train cannot be scored
        left_out["class_unseen_in_train"] = int((~keep_rows).sum())
    uid = np.asarray(joined.column("user_id").to_pylist(), dtype=object)
    n_ev = joined.column("n_events").to_numpy() - hold
    masks = {s: (split == s) & keep_rows for s in ("train", "val", "test")}
    if labels:
        n_tr = int(masks["train"].sum())
        quota = {"train": labels, "val": max(1, round(labels * int(masks["val"].sum()) / max(n_tr, 1)))}
        rank = label_rank(uid)
        strata = y_all if classes is not None and task.type != "retrieval" else None
        dropped = 0
        for s, n in quota.items():
            idx = np.flatnonzero(masks[s])
            if n < len(idx):
                masks[s][:] = False
                masks[s][budget_pick(idx, rank[idx], n, None if strata is None else strata[idx])] = True
                dropped += len(idx) - n
        left_out["label_budget"] = dropped
    out_ids, out_y, out_n, out_h, out_o = {}, {}, {}, {}, {}
    for s in ("train", "val", "test"):
        m = masks[s]
        out_ids[s], out_y[s], out_n[s] = uid[m], y_all[m], n_ev[m]
        if hist is not None:
            out_h[s] = [h for h, k in zip(hist, m) if k]
        if task.type == "retrieval" and task.catalog == "service":
            out_o[s] = [o for o, k in zip(outside, m) if k]
        if not m.any():
            where = f" in cross-fitting fold {fold[0]} of {fold[1]}" if fold else ""
            raise EvalError(f"task {task.name!r}: no labelled {s} users{where} (after the users filter {task.users!r})")
    if (labels or fold is not None) and classes is not None and task.type != "retrieval" and len(np.unique(out_y["train"])) < 2:
        # the dataset's own split was checked above (classes from its training users); a budget or a fold may not be
        if labels:
            raise EvalError(f"task {task.name!r}: the {len(out_y['train'])} training users of the label budget (labels="
                            f"{labels}) have one class only; raise labels")
        raise EvalError(f"task {task.name!r}: the training users of cross-fitting fold {fold[0]} of {fold[1]} have one "
                        f"class only; use fewer folds or the dataset's split (folds=0)")
    return TaskData(task, out_ids, out_y, classes, out_n, {k: v for k, v in left_out.items() if v}, out_h or None,
                    out_o or None)


def stack_folds(fold_tds: list[TaskData]) -> TaskData:
    """The k cross-fitting folds of one task -> one TaskData whose test split is every fold's test users
    (fold order), the order :func:`merge_folds` stacks their scores in. It has no train / val split."""
    first = fold_tds[0]
    cat = lambda key: np.concatenate([getattr(f, key)["test"] for f in fold_tds])  # noqa: E731
    hist = {"test": [h for f in fold_tds for h in f.history["test"]]} if first.history is not None else None
    outside = {"test": [o for f in fold_tds for o in f.outside["test"]]} if first.outside is not None else None
    return TaskData(first.task, {"test": cat("ids")}, {"test": cat("y")}, first.classes, {"test": cat("n_events")},
                    first.left_out, hist, outside)


def merge_folds(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Per-fold ``score_models`` results -> one per model: each seed's test scores stacked over the folds
    (fold order), fit / predict seconds of every fold's fits, heads saved, and what val chose per fold
    (the first fold's choice at the top level, every fold's under ``per_fold``)."""
    merged = {}
    for model, first in parts[0].items():
        per = [p[model] for p in parts]
        merged[model] = {
            "embedding": first["embedding"], "head": first["head"],
            "scores": [np.concatenate([p["scores"][i] for p in per]) for i in range(len(first["scores"]))],
            "train_s": [t for p in per for t in p["train_s"]], "infer_s": [t for p in per for t in p["infer_s"]],
            "saved": [x for p in per for x in p["saved"]],
            "extra": {k: {**v, "per_fold": [p["extra"][k] for p in per]} for k, v in first["extra"].items()},
        }
    return merged


def _last_elements(col: pa.ChunkedArray | pa.Array, valid: np.ndarray, n: int = 1) -> pa.Array:
    """Each row's n-th last list element (null where ``valid`` is False or the list is shorter than n)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy()
    ok = valid & (np.diff(off) >= n)
    return arr.values.take(pa.array(np.where(ok, off[1:] - n, 0), pa.int64(), mask=~ok))


def last_event_table(data: str | Path, n: int = 1) -> pa.Table:
    """The built-in ``last_event`` table: per user, properties of the n-th LAST event of the combined history
    (n = a task's ``holdout``: 1 the last event, 2 the one before it).

    Columns user_id, split, item_id, service, category (path joined with " > "), category_top (level 0),
    category_leaf (deepest level), category_path (the list, for ``category@<k>`` targets). Users with
    fewer than n + 1 events get nulls (no history would be left before the event).
    """
    t = read_sequences(data, columns=["user_id", "split", "n_events", "service", "item_id", "category"])
    valid = t.column("n_events").to_numpy() >= n + 1
    paths = _last_elements(t.column("category"), valid, n).to_pylist()
    return pa.table({
        "user_id": t.column("user_id"), "split": t.column("split"),
        "item_id": _last_elements(t.column("item_id"), valid, n),
        "service": _last_elements(t.column("service"), valid, n),
        "category": pa.array([" > ".join(p) if p else None for p in paths], pa.string()),
        "category_top": pa.array([p[0] if p else None for p in paths], pa.string()),
        "category_leaf": pa.array([p[-1] if p else None for p in paths], pa.string()),
        "category_path": pa.array([p or None for p in paths], pa.list_(pa.string())),
    })


def item_services(data: str | Path, catalog: list[str]) -> np.ndarray:
    """(len(catalog),) object array: the service of each catalog item (the first service it occurs in, in
    stored order; items are one service's in every format the converters write)."""
    t = read_sequences(data, columns=["item_id", "service"])
    items = t.column("item_id").combine_chunks().flatten()
    svc = t.column("service").combine_chunks().flatten()
    idx = pc.index_in(items, value_set=pa.array(catalog, items.type)).fill_null(-1).to_numpy().astype(np.int64)
    out = np.full(len(catalog), None, dtype=object)
    svc_np = np.asarray(svc.to_pylist(), dtype=object)
    first = np.full(len(catalog), -1, np.int64)
    order = np.flatnonzero(idx >= 0)
    seen_idx, pos = np.unique(idx[order], return_index=True)
    first[seen_idx] = order[pos]
    out[first >= 0] = svc_np[first[first >= 0]]
    return out


def item_histories(data: str | Path, keep_null: bool = False, holdout: int = 0,
                   service: str = "") -> tuple[list[str], dict[str, np.ndarray]]:
    """The retrieval catalog and every user's items as catalog indices.

    Returns (catalog: sorted distinct non-null item ids of every user's stored sequence, user id ->
    (n,) int64 indices of the user's events with an item, oldest first, the last event included; with
    ``keep_null`` one per event, -1 where the event has no item). ``holdout`` / ``service``: the histories
    are :func:`userfm.infer.embed.history_rows` (the catalog is still every item).
    """
    t = read_sequences(data, columns=["user_id", "item_id"] + (["service"] if service else []))
    catalog = pc.unique(t.column("item_id").combine_chunks().flatten().drop_null()).sort()
    if holdout or service:
        from userfm.data.sequences import history_rows

        t = history_rows(t, holdout, service)
    items = t.column("item_id").combine_chunks()
    flat = items.flatten()
    idx = pc.index_in(flat, value_set=catalog).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    off = items.offsets.to_numpy()
    off = off - off[0]
    users = t.column("user_id").to_pylist()
    if keep_null:
        return catalog.to_pylist(), {u: idx[off[i]:off[i + 1]] for i, u in enumerate(users)}
    return catalog.to_pylist(), {u: (lambda a: a[a >= 0])(idx[off[i]:off[i + 1]]) for i, u in enumerate(users)}


def _attribute_table(data: str | Path, name: str) -> pa.Table:
    """An attributes table by name, or the built-in ``last_event@<n>`` (``TaskConfig.label_table``)."""
    if name.startswith(LAST_EVENT + "@"):
        return last_event_table(data, int(name.split("@", 1)[1]))
    if name == LAST_EVENT:
        return last_event_table(data)
    manifest = load_manifest(data)
    names = [a["name"] for a in manifest.get("attributes", [])]
    if name not in names:
        raise EvalError(f"{data}: no attributes table {name!r}; ingested tables: {names} (ingest with --attributes)")
    return read_attributes(data, name)


