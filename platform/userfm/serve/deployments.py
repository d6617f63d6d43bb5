"""The Serve deployments: ``Encoder`` (events -> embedding, the ingest + embed code path), ``EmbeddingStore``
(stored embeddings, top-k neighbours, reload) and ``Head`` (one downstream head), with the request's hop timing."""

import asyncio
import contextvars
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray import serve

from userfm.serve.config import ServeError, embedding_identity, head_summary

# How often a stopping replica checks that its requests are done (Serve's default: 2 s). Every replica waited at
# least one period, and the ingress stops before the rest: shutting the demo's app down took ~4 s of waiting.
SHUTDOWN_POLL_S = 0.25


# (hop, ms) of the request being handled: the ingress middleware sets a fresh list, each handle call and
# local table lookup appends to it, and the response carries them as a Server-Timing header. Deployment
# classes reach it only through the two functions below: Serve pickles those classes by value, with the
# globals their methods name, and a ContextVar does not pickle (module functions go by reference).
_HOPS: contextvars.ContextVar[list | None] = contextvars.ContextVar("userfm_serve_hops", default=None)
log = logging.getLogger(__name__)


def hop_timing(hops: list | None) -> None:
    """Collect this request's hops into ``hops`` (None: stop collecting in this task)."""
    _HOPS.set(hops)


def record_hop(hop: str, t0: float) -> None:
    """Add ``hop``, started at ``time.perf_counter()`` value ``t0``, to the request's timing (if collected)."""
    hops = _HOPS.get()
    if hops is not None:
        hops.append((hop, (time.perf_counter() - t0) * 1000))
# --------------------------------------------------------------------------------------------------
# Events -> encoder input (the ingest + embed code path, so /v1/embed equals `userfm embed`)
# --------------------------------------------------------------------------------------------------


def events_to_rows(users: list[list[dict]], max_events: int) -> pa.Table:
    """Per-user event lists (canonical fields; ``ts`` a datetime or ISO 8601, UTC if no zone) ->
    SEQUENCE_SCHEMA rows, row i = user i.

    Runs ingest's own ``sequences.build_partition``: same sort (ts, then the other fields), exact
    duplicates dropped, the most recent ``max_events`` kept.
    """
    from userfm.data.schema import EVENT_SCHEMA
    from userfm.data.sequences import build_partition

    cols = {name: [] for name in EVENT_SCHEMA.names}
    for i, events in enumerate(users):
        for e in events:
            cols["user_id"].append(f"{i:09d}")  # zero-padded: sorted ids keep the request order
            for name in EVENT_SCHEMA.names[1:]:
                cols[name].append(e.get(name))
            if isinstance(cols["ts"][-1], str):
                ts = datetime.fromisoformat(cols["ts"][-1])
                cols["ts"][-1] = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    table = pa.Table.from_pydict(cols, schema=EVENT_SCHEMA)
    return build_partition(table, max_events=max_events, fractions=(1.0, 0.0, 0.0)).sequences


def events_from_sequence(row: dict) -> list[dict]:
    """One sequence row (``dataset.read_sequences(...).to_pylist()[i]``) -> the JSON events of a request."""
    out = []
    for j, ts in enumerate(row["ts"]):
        e = {"ts": ts.isoformat() if hasattr(ts, "isoformat") else ts, "service": row["service"][j], "text": row["text"][j]}
        for k in ("item_id", "category", "value"):
            if row.get(k) is not None and row[k][j] is not None:
                e[k] = row[k][j]
        out.append(e)
    return out


class _OnlineVectors:
    """MiniLM vectors: the pretraining cache, plus texts missing from it encoded on the fly (then kept)."""

    def __init__(self, cache):
        self.cache, self.extra, self.model = cache, {}, None

    def add(self, texts: list[str]) -> None:
        from userfm.models.features import text_hash

        hashes = text_hash(texts)
        known = np.zeros(len(texts), bool)
        if len(self.cache.hashes):
            pos = np.clip(np.searchsorted(self.cache.hashes, hashes), 0, len(self.cache.hashes) - 1)
            known = self.cache.hashes[pos] == hashes
        todo = {int(h): t for h, t, k in zip(hashes, texts, known) if not k and int(h) not in self.extra}
        if todo:
            from userfm.models.minilm import MiniLMEncoder

            self.model = self.model or MiniLMEncoder()
            for h, v in zip(todo, self.model.encode(list(todo.values()))):
                self.extra[h] = v

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        out = self.cache.lookup(hashes)
        if self.extra:
            flat_h, flat_o = hashes.reshape(-1), out.reshape(-1, out.shape[-1])
            for i, h in enumerate(flat_h):
                v = self.extra.get(int(h))
                if v is not None:
                    flat_o[i] = v
        return out


# --------------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------------


class _IdleNoWait:
    """Sends one item through a ``@serve.batch`` method, waiting ``wait_s`` for a batch to fill only while
    the replica has other items in flight.

    Serve's batch queue waits ``batch_wait_timeout_s`` after the first item of every batch. On an idle
    replica nothing can join that batch, so the wait is pure latency (every request at 1 client pays it,
    at each batched hop). Under load the wait is kept: items that arrive while a batch runs fill the next.
    Serve reads the wait when a batch's first item arrives, so each call sets it just before enqueuing;
    all calls run on the replica's one event loop, so the count needs no lock.
    """

    def __init__(self, method, batch_size: int, wait_s: float):
        self.method, self.wait_s, self.in_flight = method, wait_s, 0
        method.set_max_batch_size(batch_size)
        method.set_batch_wait_timeout_s(wait_s)

    async def __call__(self, item):
        self.in_flight += 1
        try:
            self.method.set_batch_wait_timeout_s(self.wait_s if self.in_flight > 1 else 0.0)
            return await self.method(item)
        finally:
            self.in_flight -= 1


@serve.deployment(graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Encoder:
    """Events -> user embedding. One model load per replica (``embed.EmbedActor``), requests batched."""

    def __init__(self, model_dir: str, minilm_cache: str = "", threads: int = 1, batch_size: int = 16,
                 batch_wait_s: float = 0.002):
        from userfm.infer.embed import EmbedActor, model_identity

        self.identity = model_identity(model_dir)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        minilm = cfg["item_encoder"] == "minilm"
        self.actor = EmbedActor(str(Path(model_dir).resolve()), self.identity,
                                vectors_dir=minilm_cache if minilm else None, threads=threads)
        if minilm:
            self.actor.vectors = _OnlineVectors(self.actor.vectors)
        self.max_events = self.actor.model.config.max_events
        self.dim = self.actor.model.config.embed_dim
        self._batcher = _IdleNoWait(self.embed_batch, batch_size, batch_wait_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    def info(self) -> dict:
        return {**self.identity, "embed_dim": self.dim, "max_events": self.max_events,
                "item_encoder": self.actor.model.config.item_encoder, "batching": dict(self.stats)}

    def embed_now(self, users: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
        """(B users' event lists) -> ((B, D) float32 embeddings, exactly as ``userfm embed`` computes
        them; (B,) events used: distinct events, at most the encoder's ``max_events``)."""
        rows = events_to_rows(users, self.max_events)
        if isinstance(self.actor.vectors, _OnlineVectors):
            self.actor.vectors.add([t for lst in rows.column("text").to_pylist() for t in lst])
        col = self.actor(rows).column("embedding").combine_chunks()
        used = np.minimum(rows.column("n_events").to_numpy(), self.max_events)
        return col.flatten().to_numpy().reshape(len(users), self.dim), used

    async def embed(self, events: list[dict]) -> tuple[np.ndarray, int]:
        """One user's events -> ((D,) embedding, events used); batched with concurrent calls."""
        return await self._batcher(events)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def embed_batch(self, users: list[list[dict]]) -> list[tuple[np.ndarray, int]]:
        if len(users) == 1 and self._batcher.in_flight == 1:
            # Alone on an idle replica: nothing can queue behind it, and the thread hand-off (and back)
            # costs more than it frees (measured: serve_load.py --breakdown, encoder hop).
            x, used = self.embed_now(users)
        else:
            # In a thread, so requests keep queueing into the next batch while this one runs.
            x, used = await asyncio.to_thread(self.embed_now, users)
        self.stats["requests"] += len(users)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(users))
        return [(x[i], int(used[i])) for i in range(len(users))]


@dataclass(frozen=True)
class _StoredTable:
    """One loaded embedding table; replaced as a whole, never changed in place."""

    ids: list[str]  # (N,) user ids, row order of x
    index: dict[str, int]  # user id -> row
    x: np.ndarray  # (N, D) float32
    norms: np.ndarray  # (N,) L2 norms of x's rows
    meta: dict  # source, model id/version, table_version digest, users, dim, loaded_at, similar (exact or the index)
    ann: object = None  # the table's faiss index (userfm.infer.ann) when it has one; never sent to the ingress


def lookup(table: _StoredTable, user_ids: list[str]) -> tuple[list[str], np.ndarray | None, dict]:
    """-> (missing ids, (n, D) embeddings or None when any is missing, the table's identity: model id,
    model version, table_version). Everything comes from the one ``table`` passed in, so a caller that
    reads its table reference once never mixes two tables."""
    rows = [table.index.get(u) for u in user_ids]
    missing = [u for u, r in zip(user_ids, rows) if r is None]
    ident = {k: table.meta[k] for k in ("model_id", "model_version", "table_version")}
    return missing, None if missing else table.x[rows], ident


@serve.deployment(graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class EmbeddingStore:
    """Precomputed embeddings by user id, top-k cosine neighbours, and a table switch in place.

    Neighbours are exact (one (N, D) matrix-vector product per query) unless the table folder has an ANN index
    that ``userfm embed`` built from this very table (``<table>/ann``, :mod:`userfm.infer.ann`, written above
    ANN_MIN_USERS users); an index built from another table is not used (``info()["similar"]`` says why).

    Memory: ids (list + dict index), the (N, D) float32 matrix and N norms, plus the index's normalised rows
    when there is one (two tables while a reload builds the new one).

    Serve runs sync methods in a thread pool, so ``get``/``similar`` run while a ``reload`` is loading:
    a reload builds the whole new table off to the side and swaps one reference, and every call reads
    that reference once. A request during the swap is answered from the old table or the new one,
    never from a mix (an index of one and the matrix of the other).
    """

    def __init__(self, path: str, expected_version: str | None = None, version_check: str = "refuse"):
        self.expected, self.policy = expected_version, version_check
        self._load(path)

    def _load(self, path: str) -> dict:
        from userfm.infer.embed import EmbedError, read_embeddings

        try:
            ids, x = read_embeddings(path)
        except EmbedError as exc:
            raise ServeError(f"embeddings: {exc}") from None
        ident = embedding_identity(path)
        if (self.policy == "refuse" and self.expected and ident["model_version"] is not None
                and ident["model_version"] != self.expected):
            raise ServeError(f"embeddings {path} were made by encoder version {ident['model_version']}, the served "
                             f"encoder is {self.expected} (version_check: refuse)")
        from userfm.infer.ann import table_version

        x = np.ascontiguousarray(x)
        version = table_version(ids, x)
        ann, similar = _ann_for(path, version)
        meta = {"source": str(path), **ident, "table_version": version, "users": len(ids), "dim": int(x.shape[1]),
                "similar": similar, "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.table = _StoredTable(ids, {u: i for i, u in enumerate(ids)}, x, np.linalg.norm(x, axis=1), meta, ann)
        return meta

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {embeddings: PATH}`` in a Serve config switches every replica's table."""
        path = (user_config or {}).get("embeddings")
        if path and path != self.table.meta["source"]:
            self._load(path)

    def info(self) -> dict:
        return self.table.meta

    def reload(self, path: str | None = None) -> dict:
        """Load ``path`` (default: the current source again); the old table serves until it succeeds."""
        return self._load(path or self.table.meta["source"])

    def get(self, user_ids: list[str]) -> tuple[list[str], np.ndarray | None, dict]:
        """-> (missing ids, (n, D) embeddings or None when any is missing, the table's identity)."""
        return lookup(self.table, user_ids)

    def snapshot(self) -> _StoredTable:
        """The whole current table (one consistent version), for the ingress replicas' local copies (without the
        ANN index: neighbour queries go to this deployment)."""
        return dataclasses.replace(self.table, ann=None)

    def similar(self, user_id: str, k: int) -> list[tuple[str, float]] | None:
        """Top-k users by cosine similarity to ``user_id`` (itself excluded), best first; None if unknown."""
        t = self.table
        i = t.index.get(user_id)
        if i is None:
            return None
        if t.ann is not None:
            from userfm.infer.ann import search

            scores, rows = search(t.ann, t.x[i], k + 1)  # itself is (almost always) one of them
            return [(t.ids[j], float(s)) for s, j in zip(scores[0], rows[0]) if j >= 0 and j != i][:k]
        scores = t.x @ t.x[i]  # (N,)
        denom = t.norms * t.norms[i]
        scores = np.divide(scores, denom, out=np.zeros_like(scores), where=denom > 0)
        scores[i] = -np.inf
        k = min(k, len(t.ids) - 1)
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # by score, ties by row: deterministic
        return [(t.ids[j], float(scores[j])) for j in top]


def _ann_for(path: str, version: str) -> tuple[object, str]:
    """The ANN index of the table at ``path`` whose ``table_version`` is ``version`` (None when it has none or one
    built from another table) and how ``similar`` answers: "exact", the index's kind and settings, or why an index
    found there is not used."""
    from userfm.infer.ann import AnnError, read_index

    p = Path(path)
    # an embed / refresh table folder holds ann/ beside embeddings/; a path to its embeddings/ or a file in it also finds it
    folder = next((f for f in (p, p.parent, p.parent.parent) if (f / "ann").is_dir()), p)
    try:
        index, meta = read_index(folder, version=version)
    except AnnError as exc:
        log.warning("similar users: exact search; %s", exc)
        return None, f"exact (index not used: {exc})"
    if index is None:
        return None, "exact"
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time per call; Serve runs calls in a thread pool
    return index, f"ann: {meta['library']} {meta['index']}, nlist {meta['nlist']}, nprobe {meta['nprobe']}"


def head_outputs(head, x: np.ndarray) -> list[dict]:
    """(n, D) embeddings -> per row ``{"prediction", "probabilities"}`` (probabilities in ``classes``
    order, None for regression heads)."""
    classes = head.classes
    if classes is None:
        return [{"prediction": float(v), "probabilities": None} for v in head.predict(x)]
    proba = head.predict_proba(x)
    return [{"prediction": classes[int(p.argmax())], "probabilities": [float(v) for v in p]} for p in proba]


@serve.deployment(graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class Head:
    """One saved downstream head (``evaluate.load_head``); calls batched into one forward."""

    def __init__(self, name: str, path: str, batch_size: int = 16, batch_wait_s: float = 0.002):
        from userfm.eval.heads import load_head

        self.head = load_head(path)
        self.summary = head_summary(name, path, self.head.meta)
        self._batcher = _IdleNoWait(self.predict_batch, batch_size, batch_wait_s)

    def info(self) -> dict:
        return self.summary

    async def predict(self, x: np.ndarray) -> list[dict]:
        """(n, D) embeddings -> n outputs (``head_outputs``); batched with concurrent calls."""
        return await self._batcher(x)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def predict_batch(self, xs: list[np.ndarray]) -> list[list[dict]]:
        """Each call: (n_i, D) -> n_i outputs; the batch runs as one (sum n_i, D) forward."""
        sizes = np.cumsum([len(x) for x in xs])[:-1]
        out = head_outputs(self.head, np.concatenate(xs))
        return [out[a:b] for a, b in zip([0, *sizes], [*sizes, len(out)])]


