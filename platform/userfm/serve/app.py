"""``userfm serve``: user embeddings and downstream heads behind one HTTP API, on Ray Serve.

One Serve application, one deployment per model, composed with ``.bind()`` and ``DeploymentHandle``s::

    Ingress (FastAPI)  --> Encoder          events -> user embedding (``@serve.batch``; the same code path
                       |                    as ``userfm embed``: ingest's sort/dedupe/truncate, EmbedActor)
                       --> EmbeddingStore   stored embeddings by user id, top-k cosine neighbours, reload
                       --> Head_<name>      one per saved head (``userfm evaluate``), batched, own replicas

Routes: ``POST /v1/embed``, ``GET /v1/users/{id}/embedding``, ``GET /v1/users/{id}/similar?k=``,
``GET /v1/heads``, ``POST /v1/heads/{name}/predict`` (by user id(s) or by events), ``POST /v1/admin/reload``,
``GET /healthz`` (models loaded, versions, warnings) and OpenAPI at ``/docs``.

Hot path: every hop is a process hop (HTTP proxy -> ingress replica -> model replica), a few ms each on
a loaded 2-core box, so the ingress keeps what needs no model: stored-embedding lookups (GET
``/v1/users/{id}/embedding``, predict by user id) are answered from the ingress replica's own copy of the
store's table (``ingress_table``; it follows reloads, and a request reads one table, never a mix); the
batch wait applies only while a replica has other requests in flight; every response carries a
``Server-Timing`` header (each hop and the ingress route, ms), which ``experiments/benchmarks/serve_load.py
--breakdown`` turns into a per-hop table.

Auth: ``api_key_file`` (read routes) and ``admin_key_file`` (``/v1/admin/*``; none: admin routes off) are
two keys, sent as ``X-API-Key``, compared in constant time, read from files no other user can read. A
non-loopback bind without a read key is refused unless ``allow_unauthenticated`` (``check_exposure``). A
reload reads only under ``embeddings_root`` or URIs with a ``reload_uri_prefixes`` prefix (``reload_target``).

Errors: 422 (schema; the body names the field), 404 (unknown user or head), 413 (body over
``max_body_bytes``), 401 (missing or wrong key), 403 (a read key on an admin route, admin routes off, a
reload outside the allowed places), 409 (reload refused; the body names the kind, never a server path),
503 (Serve's backpressure: ``max_ongoing_requests`` / ``max_queued_requests``, or a model call past
``request_timeout_s``).

Versions: the encoder's ``model_version`` is its weights' digest (``embed.model_identity``); embedding
tables carry the version that made them, heads point at the table they were fitted on. A table or head
made by another encoder version would answer for a different model than ``/v1/embed``: with
``version_check: refuse`` the app does not start (a reload is refused), ``warn`` serves and lists it in
``/healthz``.

Run: ``userfm serve --config experiments/serve/default.yaml`` (embedded Ray, 127.0.0.1), or with Ray's
own tooling: ``serve run experiments/serve/serve-config.yaml`` (import path ``userfm.serve:app_builder``).
"""

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray import serve

from userfm.config import from_dict, load_config, to_dict
from userfm.errors import UserfmError

HEAD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
ADMIN_PREFIX = "/v1/admin/"
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3:, gs:, file:, http: ... (a path has none)


class ServeError(UserfmError):
    """The serving config or its inputs (encoder, embeddings, heads) are wrong; the message says which."""


@dataclass(frozen=True)
class ServeConfig:
    """Config of ``userfm serve`` (and of ``app_builder`` for ``serve run`` / ``serve deploy``)."""

    model: str = ""  # exported encoder folder (`userfm pretrain` writes <run>/model)
    embeddings: str = ""  # embedding table of `userfm embed` (run folder or Parquet); "" = no stored users
    heads: dict[str, str] = field(default_factory=dict)  # head name -> saved head folder (…/seed<k>/)
    heads_root: str = ""  # <evaluate out>/heads: adds every task's <heads_embedding>-<heads_kind>/seed<heads_seed>
    heads_embedding: str = ""  # embedding name in the head folder names (e.g. "clue"); needed with heads_root
    heads_kind: str = "mlp"  # "mlp" | "logreg" (with heads_root)
    heads_seed: int = 0  # seed folder (with heads_root)
    minilm_cache: str = ""  # MiniLM vector cache (minilm encoders); texts missing from it are encoded on the fly
    version_check: str = "refuse"  # "refuse" | "warn" | "off": tables/heads made by another encoder version
    host: str = "127.0.0.1"  # HTTP bind address (loopback by default)
    port: int = 8000  # HTTP port; 0 = a free one
    app_name: str = "userfm"  # Serve application name
    route_prefix: str = "/"  # where the app is mounted
    api_key_file: str = ""  # file holding the read key clients send as X-API-Key (all routes but /healthz, docs and
    #                         /v1/admin/*); "" = reads are open. Refused when readable by every user (chmod 600)
    admin_key_file: str = ""  # file holding the admin key (X-API-Key on /v1/admin/*: reload); "" = admin routes off
    allow_unauthenticated: bool = False  # serve a non-loopback host without api_key_file (refused otherwise)
    embeddings_root: str = ""  # /v1/admin/reload loads only tables under this folder (resolved: no .. or symlink
    #                            escape); "" = the folder holding `embeddings`
    reload_uri_prefixes: tuple[str, ...] = ()  # /v1/admin/reload may also load URIs starting with one of these
    #                                            (e.g. s3://bucket/embeddings/); () = no URIs
    max_events: int = 1024  # events per request (more -> 422); the encoder keeps its own most recent max_events
    max_text_chars: int = 512  # characters per event text (the ingest default)
    max_batch: int = 256  # user ids per predict request
    max_k: int = 100  # neighbours per /similar request
    max_body_bytes: int = 1_000_000  # request body size (Content-Length) -> 413 above
    batch_size: int = 16  # @serve.batch: requests per encoder / head forward
    batch_wait_s: float = 0.002  # @serve.batch: seconds to wait for a batch to fill, only while the replica has other requests in flight (an idle replica runs a lone request at once)
    torch_threads: int = 1  # torch threads per encoder replica
    encoder_replicas: int = 1  # encoder replicas (min, with autoscaling)
    encoder_max_replicas: int = 1  # > encoder_replicas turns autoscaling on
    encoder_cpus: float = 0.5  # Ray CPUs per encoder replica (fractional: 2-core machines)
    head_replicas: int = 1  # replicas per head (min, with autoscaling)
    head_max_replicas: int = 1  # > head_replicas turns autoscaling on
    head_cpus: float = 0.1  # Ray CPUs per head replica
    store_cpus: float = 0.1  # Ray CPUs of the embedding store (one replica: /v1/admin/reload reaches it)
    ingress_replicas: int = 1  # FastAPI ingress replicas
    ingress_cpus: float = 0.25  # Ray CPUs per ingress replica
    ingress_table: bool = True  # each ingress replica answers stored-embedding lookups (GET /v1/users/{id}/embedding, predict by user id) from its own copy of the table: one handle hop less per request; memory: one more table per ingress replica
    table_sync_s: float = 1.0  # seconds between an ingress replica's checks of the EmbeddingStore's table version (its copy follows reloads made through another ingress replica or a Serve config)
    max_ongoing_requests: int = 64  # per ingress replica, in flight at once
    max_queued_requests: int = 256  # per ingress, waiting beyond that; more -> 503 (-1 = unbounded)
    target_ongoing_requests: float = 16.0  # autoscaling target per model replica
    request_timeout_s: float = 30.0  # a model call taking longer -> 503
    start_timeout_s: float = 180.0  # start(): seconds to wait for /healthz
    access_log: bool = False  # Serve's per-request access log lines

    def __post_init__(self):
        if self.version_check not in ("refuse", "warn", "off"):
            raise ValueError(f"version_check must be 'refuse', 'warn' or 'off', got {self.version_check!r}")
        if self.heads_kind not in ("mlp", "logreg"):
            raise ValueError(f"heads_kind must be 'mlp' or 'logreg', got {self.heads_kind!r}")
        for name in ("max_events", "max_text_chars", "max_batch", "max_k", "max_body_bytes", "batch_size",
                     "torch_threads", "encoder_replicas", "head_replicas", "ingress_replicas", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_max_replicas < self.encoder_replicas or self.head_max_replicas < self.head_replicas:
            raise ValueError("encoder_max_replicas / head_max_replicas must be >= encoder_replicas / head_replicas")
        if not self.batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if not self.table_sync_s > 0:
            raise ValueError(f"table_sync_s must be > 0, got {self.table_sync_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        bad = [n for n in self.heads if not HEAD_NAME.match(n)]
        if bad:
            raise ValueError(f"heads: names {bad} must match {HEAD_NAME.pattern}")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def read_key_file(path: str, field_name: str) -> str:
    """The key in ``path`` (stripped); ServeError when it is missing, empty, or readable by every user on the
    machine (a key any local account can read is no key: ``chmod 600`` it)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ServeError(f"{field_name}: no file {path}")
    mode = p.stat().st_mode
    if mode & 0o004:
        raise ServeError(f"{field_name} {path} is readable by every user on this machine (mode {oct(mode & 0o777)}); "
                         f"chmod 600 it")
    key = p.read_text().strip()
    if not key:
        raise ServeError(f"{field_name} {path} is empty")
    return key


def check_exposure(cfg: "ServeConfig") -> dict:
    """Refuse a non-loopback bind without a read key (every route would be open to the network) unless
    ``allow_unauthenticated``; read both key files (permission-checked) and refuse one key for both roles.
    Returns the auth summary /healthz and the start-up line show."""
    read = read_key_file(cfg.api_key_file, "api_key_file") if cfg.api_key_file else ""
    admin = read_key_file(cfg.admin_key_file, "admin_key_file") if cfg.admin_key_file else ""
    if read and admin and hmac.compare_digest(read.encode(), admin.encode()):
        raise ServeError("api_key_file and admin_key_file hold the same key: a client that may read could switch the "
                         "table; give the admin routes a key of their own")
    if not is_loopback(cfg.host) and not read and not cfg.allow_unauthenticated:
        raise ServeError(f"refusing to serve on {cfg.host} without api_key_file: every route would be open to the network "
                         f"(set api_key_file, and admin_key_file for /v1/admin/*; or allow_unauthenticated: true)")
    return auth_summary(cfg)


def auth_summary(cfg: "ServeConfig") -> dict:
    return {"read": "key" if cfg.api_key_file else "open", "admin": "key" if cfg.admin_key_file else "off",
            "allow_unauthenticated": cfg.allow_unauthenticated}


def reload_target(requested: str | None, cfg: "ServeConfig", current: str) -> str:
    """The table a reload may load: ``current`` when none is named; a path resolved under ``embeddings_root``
    (relative paths are taken from it; ``..`` and symlinks that lead out are refused); a URI only with a
    prefix in ``reload_uri_prefixes``. Raises PermissionError naming the rule (never the server's paths)."""
    if requested is None:
        return current
    try:
        requested.encode("utf-8")  # lone surrogates: no file has that name, and readers would fail on it
    except UnicodeError:
        raise PermissionError("reload: embeddings must be a path under embeddings_root") from None
    if "\x00" in requested:
        raise PermissionError("reload: embeddings must be a path under embeddings_root")
    if URI_SCHEME.match(requested):
        if any(requested.startswith(p) for p in cfg.reload_uri_prefixes):
            return requested
        raise PermissionError("reload: a URI must start with one of the server's reload_uri_prefixes"
                              + ("" if cfg.reload_uri_prefixes else " (none are configured)"))
    root = Path(cfg.embeddings_root or Path(current).parent).expanduser().resolve()
    target = (root / Path(requested).expanduser()).resolve()  # an absolute path replaces root; symlinks followed
    if target != root and root not in target.parents:
        raise PermissionError("reload: embeddings must be a path under embeddings_root (resolved, symlinks followed)")
    return str(target)


# --------------------------------------------------------------------------------------------------
# Inputs: identities, heads, versions (driver side; reads metadata only, no weights)
# --------------------------------------------------------------------------------------------------


def embedding_identity(path: str | Path) -> dict:
    """``model_id`` / ``model_version`` an embedding table was made with (its columns, else its
    manifest.json); ``None`` values when unknown, ``"mixed"`` when the table holds several."""
    p = Path(path)
    src = p / "embeddings" if (p / "embeddings").is_dir() else p
    out = {"model_id": None, "model_version": None}
    try:
        names = pq.read_schema(next(iter(sorted(src.glob("*.parquet")))) if src.is_dir() else src).names
        cols = [c for c in ("model_id", "model_version") if c in names]
        if cols:
            t = pq.read_table(str(src), columns=cols)
            for c in cols:
                vals = t.column(c).unique().to_pylist()
                out[c] = vals[0] if len(vals) == 1 else "mixed"
            return out
    except (StopIteration, OSError, pa.ArrowInvalid):
        pass
    manifest = p / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        out.update({k: m.get(k) for k in out})
    return out


def resolve_heads(cfg: ServeConfig) -> dict[str, str]:
    """Head name -> folder: ``cfg.heads`` plus, with ``heads_root``, each task's
    ``<heads_embedding>-<heads_kind>/seed<heads_seed>`` (named after the task)."""
    heads = dict(cfg.heads)
    if cfg.heads_root:
        root = Path(cfg.heads_root)
        if not root.is_dir():
            raise ServeError(f"heads_root: no folder {root}")
        if not cfg.heads_embedding:
            raise ServeError("heads_root needs heads_embedding (the embedding name in the head folder names, e.g. clue)")
        for task in sorted(d for d in root.iterdir() if d.is_dir()):
            d = task / f"{cfg.heads_embedding}-{cfg.heads_kind}" / f"seed{cfg.heads_seed}"
            if (d / "head.json").is_file():
                heads.setdefault(task.name, str(d))
        if len(heads) == len(cfg.heads):
            raise ServeError(f"heads_root: no {cfg.heads_embedding}-{cfg.heads_kind}/seed{cfg.heads_seed} head under {root}")
    bad = [n for n in heads if not HEAD_NAME.match(n)]
    if bad:
        raise ServeError(f"head names {bad} must match {HEAD_NAME.pattern}")
    return heads


def head_meta(path: str | Path) -> dict:
    p = Path(path)
    if not (p / "head.json").is_file() or not (p / "weights.safetensors").is_file():
        raise ServeError(f"{p}: not a saved head (needs head.json and weights.safetensors)")
    return json.loads((p / "head.json").read_text())


def head_summary(name: str, path: str, meta: dict) -> dict:
    task = meta.get("task") or {}
    src = meta.get("embedding_source")
    version = None
    if src == "random":
        version = "random"
    elif src and Path(src).exists():
        version = embedding_identity(src)["model_version"]
    return {"name": name, "path": str(path), "kind": meta.get("kind"), "task": task.get("name"),
            "type": task.get("type"), "target": task.get("target"), "classes": meta.get("classes"),
            "input_dim": meta.get("input_dim"), "embedding": meta.get("embedding"),
            "embedding_source": src, "embedding_version": version}


def resolve_minilm_cache(cfg: ServeConfig) -> str:
    """The MiniLM vector cache the encoder reads: ``minilm_cache`` when set, else the one its pretraining run
    built (``<run>/config.json`` beside ``<run>/model``: the run's ``minilm_cache`` or ``<data>/minilm_cache``),
    so a trained model serves without an extra flag. "" when neither is a folder."""
    if cfg.minilm_cache:
        return cfg.minilm_cache if Path(cfg.minilm_cache).is_dir() else ""
    run = Path(cfg.model).parent / "config.json"
    try:
        pre = json.loads(run.read_text())["pretrain"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    cache = pre.get("minilm_cache") or (str(Path(pre["data"]) / "minilm_cache") if pre.get("data") else "")
    return cache if cache and Path(cache).is_dir() else ""


def plan(cfg: ServeConfig) -> dict:
    """Check the inputs and their versions before any replica starts.

    Returns ``{"encoder": identity + dims, "embeddings": identity, "heads": {name: summary},
    "warnings": [...]}``; raises ServeError for what cannot work (missing files, dimension mismatch) and,
    with ``version_check: refuse``, for a table or head made by another encoder version.
    """
    from userfm.infer.embed import EmbedError, model_identity

    if not cfg.model:
        raise ServeError("model is required (an exported encoder folder)")
    try:
        enc = model_identity(cfg.model)
    except EmbedError as exc:
        raise ServeError(f"model: {exc}") from None
    enc_cfg = json.loads((Path(cfg.model) / "config.json").read_text())
    enc.update(embed_dim=enc_cfg.get("out_dim") or enc_cfg["d_model"], max_events=enc_cfg["max_events"],
               item_encoder=enc_cfg["item_encoder"])
    if enc["item_encoder"] == "minilm" and not resolve_minilm_cache(cfg):
        raise ServeError(f"model {cfg.model} uses MiniLM item vectors and its pretraining run does not say where its vector "
                         f"cache is (or it is gone): set minilm_cache (pretraining wrote <data>/minilm_cache)")
    notes: list[tuple[str, bool]] = []  # (warning, a known mismatch: refused with version_check: refuse)
    emb = None
    if cfg.embeddings:
        if not Path(cfg.embeddings).exists():
            raise ServeError(f"embeddings: no file or folder {cfg.embeddings}")
        emb = {"source": str(cfg.embeddings), **embedding_identity(cfg.embeddings)}
        notes += version_notes(f"embeddings {cfg.embeddings}", emb["model_version"], enc["model_version"])
    heads = {}
    for name, path in resolve_heads(cfg).items():
        h = head_summary(name, path, head_meta(path))
        if h["input_dim"] != enc["embed_dim"]:
            raise ServeError(f"head {name!r} ({path}) takes {h['input_dim']}-d embeddings, the encoder makes {enc['embed_dim']}-d")
        notes += version_notes(f"head {name!r} (fitted on {h['embedding_source']})", h["embedding_version"], enc["model_version"])
        heads[name] = h
    known = [w for w, refuse in notes if refuse]
    if known and cfg.version_check == "refuse":
        raise ServeError("version mismatch (set version_check: warn to serve anyway): " + "; ".join(known))
    warnings = [] if cfg.version_check == "off" else [w for w, _ in notes]
    return {"encoder": enc, "embeddings": emb, "heads": heads, "warnings": warnings,
            "head_warnings": [w for w in warnings if w.startswith("head ")]}


def version_notes(what: str, version: str | None, encoder_version: str) -> list[tuple[str, bool]]:
    """[(warning, known mismatch)] when ``what`` was not made by ``encoder_version``; [] when it was."""
    if version is None:
        return [(f"{what}: encoder version unknown (no model_version column or manifest)", False)]
    if version == "random":
        return [(f"{what}: fitted on a random embedding table, not on the served encoder's embeddings", True)]
    if version != encoder_version:
        return [(f"{what}: made by encoder version {version}, the served encoder is {encoder_version}", True)]
    return []


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


@serve.deployment
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
    meta: dict  # source, model id/version, table_version digest, users, dim, loaded_at


def lookup(table: _StoredTable, user_ids: list[str]) -> tuple[list[str], np.ndarray | None, dict]:
    """-> (missing ids, (n, D) embeddings or None when any is missing, the table's identity: model id,
    model version, table_version). Everything comes from the one ``table`` passed in, so a caller that
    reads its table reference once never mixes two tables."""
    rows = [table.index.get(u) for u in user_ids]
    missing = [u for u, r in zip(user_ids, rows) if r is None]
    ident = {k: table.meta[k] for k in ("model_id", "model_version", "table_version")}
    return missing, None if missing else table.x[rows], ident


@serve.deployment
class EmbeddingStore:
    """Precomputed embeddings by user id, exact top-k cosine neighbours, and a table switch in place.

    Memory: ids (list + dict index), the (N, D) float32 matrix and N norms; no normalised copy (two
    tables while a reload builds the new one).

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
        x = np.ascontiguousarray(x)
        digest = hashlib.blake2b(x.tobytes(), digest_size=6)
        digest.update("\x1f".join(ids).encode("utf-8", "surrogatepass"))
        meta = {"source": str(path), **ident, "table_version": digest.hexdigest(), "users": len(ids), "dim": int(x.shape[1]),
                "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.table = _StoredTable(ids, {u: i for i, u in enumerate(ids)}, x, np.linalg.norm(x, axis=1), meta)
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
        """The whole current table (one consistent version), for the ingress replicas' local copies."""
        return self.table

    def similar(self, user_id: str, k: int) -> list[tuple[str, float]] | None:
        """Top-k users by cosine similarity to ``user_id`` (itself excluded), best first; None if unknown."""
        t = self.table
        i = t.index.get(user_id)
        if i is None:
            return None
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


def head_outputs(head, x: np.ndarray) -> list[dict]:
    """(n, D) embeddings -> per row ``{"prediction", "probabilities"}`` (probabilities in ``classes``
    order, None for regression heads)."""
    classes = head.classes
    if classes is None:
        return [{"prediction": float(v), "probabilities": None} for v in head.predict(x)]
    proba = head.predict_proba(x)
    return [{"prediction": classes[int(p.argmax())], "probabilities": [float(v) for v in p]} for p in proba]


@serve.deployment
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


# --------------------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------------------


def api_models(cfg: ServeConfig) -> dict[str, type]:
    """Pydantic request/response models with the configured limits (they show in the OpenAPI schema)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    def utf8(v):
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid UTF-8 text (lone surrogate)") from None
        return v

    ts_lo, ts_hi = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc)

    class Event(BaseModel):
        """One event in the canonical schema (``userfm.data.schema.EVENT_SCHEMA``), ``user_id`` implied."""

        model_config = ConfigDict(extra="forbid")
        ts: datetime = Field(description="ISO 8601 (UTC assumed without a zone) or epoch seconds")
        service: str = Field(min_length=1, max_length=128, examples=["shopping"])
        text: str = Field(min_length=1, max_length=cfg.max_text_chars, examples=["Trail running shoes"])
        item_id: str | None = Field(None, max_length=256)
        category: list[str] | None = Field(None, max_length=16, examples=[["Sports", "Running", "Shoes"]])
        value: float | None = Field(None, allow_inf_nan=False)

        @field_validator("service", "text", "item_id", mode="after")
        @classmethod
        def _text(cls, v):
            if isinstance(v, str) and not v.strip():
                raise ValueError("must not be empty or whitespace only")
            return utf8(v)

        @field_validator("category", mode="after")
        @classmethod
        def _category(cls, v):
            for level in v or ():
                if len(level) > 256:
                    raise ValueError("category levels are at most 256 characters")
                utf8(level)
            return v

        @field_validator("ts", mode="after")
        @classmethod
        def _ts(cls, v: datetime):
            v = v if v.tzinfo else v.replace(tzinfo=timezone.utc)
            if not ts_lo <= v < ts_hi:
                raise ValueError(f"must be in [{ts_lo.date()}, {ts_hi.date()})")
            return v

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: str | None = Field(None, min_length=1, max_length=256, description="echoed back; optional")
        events: list[Event] = Field(min_length=1, max_length=cfg.max_events)

        @field_validator("user_id", mode="after")
        @classmethod
        def _uid(cls, v):
            return utf8(v)

    class EmbedResponse(BaseModel):
        user_id: str | None
        embedding: list[float]
        dim: int
        n_events: int = Field(description="events used: distinct, most recent, at most the encoder's max_events")
        model_id: str
        model_version: str

    class StoredEmbedding(BaseModel):
        user_id: str
        embedding: list[float]
        dim: int
        model_id: str | None
        model_version: str | None

    class Neighbour(BaseModel):
        user_id: str
        score: float = Field(description="cosine similarity")

    class SimilarResponse(BaseModel):
        user_id: str
        k: int
        neighbours: list[Neighbour]

    class PredictRequest(BaseModel):
        """Exactly one of ``user_id``, ``user_ids`` (stored embeddings) or ``events`` (encoded now)."""

        model_config = ConfigDict(extra="forbid")
        user_id: str | None = Field(None, min_length=1, max_length=256)
        user_ids: list[str] | None = Field(None, min_length=1, max_length=cfg.max_batch)
        events: list[Event] | None = Field(None, min_length=1, max_length=cfg.max_events)

        @field_validator("user_id", mode="after")
        @classmethod
        def _uid(cls, v):
            return utf8(v)

        @field_validator("user_ids", mode="after")
        @classmethod
        def _uids(cls, v):
            for u in v or ():
                if not 1 <= len(u) <= 256:
                    raise ValueError("user ids have 1 to 256 characters")
                utf8(u)
            return v

        @model_validator(mode="after")
        def _one(self):
            given = [k for k in ("user_id", "user_ids", "events") if getattr(self, k) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of user_id, user_ids, events (got {given or 'none'})")
            return self

    class Prediction(BaseModel):
        user_id: str | None
        prediction: Any
        probabilities: list[float] | None = Field(description="in the order of `classes`; null for regression")

    class PredictResponse(BaseModel):
        head: str
        task: str | None
        kind: str | None
        classes: list[Any] | None
        source: str = Field(description="'stored' (embedding table) or 'events' (encoder)")
        model_version: str | None
        predictions: list[Prediction]

    class ReloadRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        embeddings: str | None = Field(None, min_length=1, max_length=4096, description="table to load; default: reload the current one")

    return {k: v for k, v in locals().items() if isinstance(v, type) and issubclass(v, BaseModel)}


@serve.deployment
@serve.ingress()
class Ingress:
    """The app's single FastAPI ingress; the routes call the model deployments through handles."""

    async def __init__(self, config: dict, plan_: dict, encoder, store, heads: dict):
        # async: Serve awaits it on the replica's user-code event loop (the routes' loop), so the table
        # copy is in place before the first request and its follower task runs on that loop.
        self.cfg = from_dict(ServeConfig, config)
        self.plan = plan_
        self.encoder, self.store, self.heads = encoder, store, heads
        self.api_key = read_key_file(self.cfg.api_key_file, "api_key_file") if self.cfg.api_key_file else ""
        self.admin_key = read_key_file(self.cfg.admin_key_file, "admin_key_file") if self.cfg.admin_key_file else ""
        # ingress_table: this replica's copy of the store's table, replaced as a whole (never changed in
        # place), so a request that reads the reference once never mixes two tables.
        self.table: _StoredTable | None = None
        self._table_lock = asyncio.Lock()
        self._follower: asyncio.Task | None = None
        if self.cfg.ingress_table and store is not None:
            await self.refresh_table()
            self._follower = asyncio.create_task(self._follow_store())

    def __serve_build_asgi_app__(self):
        return make_api(self)

    async def call(self, response, hop: str):
        """Await a handle call with the configured timeout; its time goes into the Server-Timing header
        as ``hop``. Past the timeout, or when the model replica died mid-request (Serve starts a new one),
        answer 503 (retry later), never a hang or a 500."""
        from fastapi import HTTPException
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(response, self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"model call took longer than request_timeout_s={self.cfg.request_timeout_s}") from None
        except RayActorError:
            raise HTTPException(503, "a model replica stopped while handling the request; retry") from None
        finally:
            record_hop(hop, t0)

    async def refresh_table(self, seen: dict | None = None) -> None:
        """Replace this replica's copy with the store's current table, unless the copy already is ``seen``
        (the store's meta). The copy is fetched at replica start, then kept in step by a background check
        every ``table_sync_s`` and at once after a reload through this replica. Fetches are serialised,
        so a slow older fetch never replaces a newer table."""
        async with self._table_lock:
            if seen is not None and self.table is not None and self.table.meta == seen:
                return
            self.table = await self.call(self.store.snapshot.remote(), "store")

    async def _follow_store(self) -> None:
        hop_timing(None)  # started inside a request: its calls are not that request's hops
        while True:
            await asyncio.sleep(self.cfg.table_sync_s)
            try:
                meta = await self.call(self.store.info.remote(), "store")
                if self.table is None or meta != self.table.meta:
                    await self.refresh_table(meta)
            except Exception as exc:  # the store is restarting or slow: keep serving the copy, retry next time
                log.warning("ingress: could not check the embedding table version (%s); serving table %s",
                            exc, self.table.meta["table_version"] if self.table else None)


def _public_reload_error(message: str) -> str:
    """What a refused reload tells its caller: the kind of failure, no server paths or library internals."""
    m = re.search(r"made by encoder version (\S+), the served encoder is (\S+)", message)
    if m:
        return f"refused: the table was made by encoder version {m.group(1)}, the served encoder is {m.group(2)} (version_check: refuse)"
    return "refused: the table could not be read as a userfm embedding table (the server log says why)"


def make_api(ing: Ingress):
    """The FastAPI app of one ingress replica (built at replica start, so limits come from the config)."""
    from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.datastructures import Headers

    from userfm import __version__

    cfg, M = ing.cfg, api_models(ing.cfg)
    EmbedRequest, PredictRequest, ReloadRequest = M["EmbedRequest"], M["PredictRequest"], M["ReloadRequest"]
    app = FastAPI(title="userfm", version=__version__, redirect_slashes=False,  # a wrong path is a 404, not a 307
                  description="User embeddings from a pretrained user encoder and downstream heads on them.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # FastAPI's default echoes each bad input back, which fails to render for NaN/inf (a 500) and
        # repeats whole oversized lists: keep type, location and message only.
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    class Guard:
        """Body size (413) and API key (401) checks, and a Server-Timing header: each hop of the request
        (handle call or local table lookup) and the whole route in this replica ("ingress"), in ms.
        Plain ASGI: Starlette's ``@app.middleware("http")`` runs the route in an extra task and streams
        the response through a memory channel, which is time on every request."""

        def __init__(self, asgi_app):
            self.app = asgi_app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            headers = Headers(scope=scope)
            size = headers.get("content-length", "")
            if size.isdigit() and int(size) > cfg.max_body_bytes:
                body = {"detail": f"request body of {size} bytes exceeds max_body_bytes={cfg.max_body_bytes}"}
                return await JSONResponse(body, 413)(scope, receive, send)
            path = scope["path"][len(scope.get("root_path", "")):] or "/"
            given = headers.get("x-api-key", "").encode()
            if path.startswith(ADMIN_PREFIX):  # admin routes: the admin key only; a read key is known but not enough
                if not ing.admin_key:
                    body = {"detail": "admin routes are off: the server has no admin_key_file"}
                    return await JSONResponse(body, 403)(scope, receive, send)
                if not hmac.compare_digest(given, ing.admin_key.encode()):
                    if ing.api_key and hmac.compare_digest(given, ing.api_key.encode()):
                        body = {"detail": "this key may read, not administer: admin routes need the admin key"}
                        return await JSONResponse(body, 403)(scope, receive, send)
                    return await JSONResponse({"detail": "missing or wrong X-API-Key header"}, 401)(scope, receive, send)
            elif ing.api_key and path not in OPEN_PATHS:
                if not hmac.compare_digest(given, ing.api_key.encode()):
                    return await JSONResponse({"detail": "missing or wrong X-API-Key header"}, 401)(scope, receive, send)
            hops: list[tuple[str, float]] = []
            hop_timing(hops)  # the route runs in this task: its hops land in this list
            t0 = time.perf_counter()

            async def send_timed(message):
                if message["type"] == "http.response.start":
                    hops.append(("ingress", (time.perf_counter() - t0) * 1000))
                    timing = ", ".join(f"{name};dur={ms:.3f}" for name, ms in hops).encode()
                    message = {**message, "headers": [*message.get("headers", []), (b"server-timing", timing)]}
                await send(message)

            await self.app(scope, receive, send_timed)

    app.add_middleware(Guard)

    def head_handle(name: str):
        h = ing.heads.get(name)
        if h is None:
            raise HTTPException(404, f"unknown head {name!r}; heads: {sorted(ing.heads)}")
        return h

    def need_store():
        if ing.store is None:
            raise HTTPException(404, "no embedding table is served (config: embeddings)")
        return ing.store

    async def stored(user_ids: list[str]) -> tuple[list[str], np.ndarray | None, dict]:
        """``lookup`` on the stored table: this replica's copy (ingress_table), else the store's."""
        store = need_store()
        if not cfg.ingress_table:
            return await ing.call(store.get.remote(user_ids), "store")
        table = ing.table  # read once: the whole request uses this one table
        t0 = time.perf_counter()
        out = lookup(table, user_ids)
        record_hop("table", t0)
        return out

    async def embed_events(events: list) -> tuple[np.ndarray, int]:
        return await ing.call(ing.encoder.embed.remote([e.model_dump(mode="python") for e in events]), "encoder")

    @app.get("/healthz", summary="models loaded, their versions, warnings")
    async def healthz():
        try:
            enc = await ing.call(ing.encoder.info.remote(), "encoder")
            emb = await ing.call(ing.store.info.remote(), "store") if ing.store is not None else None
            heads = {n: await ing.call(h.info.remote(), "head") for n, h in ing.heads.items()}
        except HTTPException:
            return JSONResponse({"status": "unavailable", "detail": "a model deployment did not answer in time"}, 503)
        warnings = list(ing.plan["head_warnings"])
        if emb is not None and cfg.version_check != "off":
            warnings += [w for w, _ in version_notes(f"embeddings {emb['source']}", emb["model_version"], enc["model_version"])]
        return {"status": "warn" if warnings else "ok", "warnings": warnings, "encoder": enc, "embeddings": emb,
                "ingress_table": ing.table.meta["table_version"] if ing.table is not None else None,
                "heads": heads, "auth": auth_summary(cfg), "version": __version__}

    @app.post("/v1/embed", response_model=M["EmbedResponse"], summary="events -> user embedding")
    async def embed(req: EmbedRequest):
        vec, used = await embed_events(req.events)
        enc = ing.plan["encoder"]
        return {"user_id": req.user_id, "embedding": vec.tolist(), "dim": len(vec), "n_events": used,
                "model_id": enc["model_id"], "model_version": enc["model_version"]}

    @app.get("/v1/users/{user_id}/embedding", response_model=M["StoredEmbedding"], summary="stored embedding of a user")
    async def user_embedding(user_id: str = PathParam(min_length=1, max_length=256)):
        missing, x, info = await stored([user_id])
        if missing:
            raise HTTPException(404, f"unknown user_id {user_id!r}: not in the embedding table")
        return {"user_id": user_id, "embedding": x[0].tolist(), "dim": x.shape[1], "model_id": info["model_id"],
                "model_version": info["model_version"]}

    @app.get("/v1/users/{user_id}/similar", response_model=M["SimilarResponse"], summary="top-k users by cosine similarity")
    async def similar(user_id: str = PathParam(min_length=1, max_length=256), k: int = Query(10, ge=1, le=cfg.max_k)):
        top = await ing.call(need_store().similar.remote(user_id, k), "store")
        if top is None:
            raise HTTPException(404, f"unknown user_id {user_id!r}: not in the embedding table")
        return {"user_id": user_id, "k": len(top), "neighbours": [{"user_id": u, "score": s} for u, s in top]}

    @app.get("/v1/heads", summary="served heads: task, kind, classes, versions")
    async def heads():
        return {"heads": [ing.plan["heads"][n] for n in sorted(ing.heads)]}

    @app.post("/v1/heads/{name}/predict", response_model=M["PredictResponse"], summary="head prediction by user id(s) or events")
    async def predict(req: PredictRequest, name: str = PathParam(max_length=64)):
        h = head_handle(name)
        if req.events is not None:
            x, ids, source = (await embed_events(req.events))[0][None, :], [None], "events"
            version = ing.plan["encoder"]["model_version"]
        else:
            ids = req.user_ids or [req.user_id]
            missing, x, info = await stored(ids)
            if missing:
                raise HTTPException(404, f"unknown user_id(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                                         f"not in the embedding table")
            source, version = "stored", info["model_version"]
        out = await ing.call(h.predict.remote(x), "head")
        meta = ing.plan["heads"][name]
        return {"head": name, "task": meta["task"], "kind": meta["kind"], "classes": meta["classes"], "source": source,
                "model_version": version, "predictions": [{"user_id": u, **o} for u, o in zip(ids, out)]}

    @app.post("/v1/admin/reload", summary="switch the embedding table (or re-read it) without a restart")
    async def reload(req: ReloadRequest):
        store = need_store()
        try:  # checked here, before the store is asked to read anything (None: re-read the current table)
            target = None if req.embeddings is None else reload_target(req.embeddings, cfg, ing.plan["embeddings"]["source"])
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        try:
            meta = await ing.call(store.reload.remote(target), "store")
        except HTTPException:  # 503: the store timed out or restarted
            raise
        except Exception as exc:  # ServeError (Ray re-raises the replica's as a subclass of it) or anything the read hit
            # the store's message names server paths and library errors: the log gets it, the caller the kind
            log.warning("reload of %r refused: %s", req.embeddings, str(exc).strip().splitlines()[-1])
            raise HTTPException(409, _public_reload_error(str(exc))) from None
        if cfg.ingress_table:  # this replica answers from the new table before the reload returns
            await ing.refresh_table(meta)
        return {"embeddings": meta}

    return app


# --------------------------------------------------------------------------------------------------
# Building and running
# --------------------------------------------------------------------------------------------------


def _scaling(replicas: int, max_replicas: int, target: float) -> dict:
    if max_replicas > replicas:
        return {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": target}}
    return {"num_replicas": replicas}


def build_app(cfg: ServeConfig, plan_: dict | None = None):
    """The bound Serve application (``serve.run`` it, or return it from an import-path builder)."""
    plan_ = plan_ or plan(cfg)
    inner_ongoing = max(2 * cfg.batch_size, int(cfg.target_ongoing_requests) * 2)
    cache = resolve_minilm_cache(cfg)
    encoder = Encoder.options(
        ray_actor_options={"num_cpus": cfg.encoder_cpus}, max_ongoing_requests=inner_ongoing,
        **_scaling(cfg.encoder_replicas, cfg.encoder_max_replicas, cfg.target_ongoing_requests),
    ).bind(str(Path(cfg.model).resolve()), str(Path(cache).resolve()) if cache else "", cfg.torch_threads, cfg.batch_size,
           cfg.batch_wait_s)
    store = None
    if cfg.embeddings:
        store = EmbeddingStore.options(ray_actor_options={"num_cpus": cfg.store_cpus}, num_replicas=1,
                                       max_ongoing_requests=inner_ongoing).bind(
            str(Path(cfg.embeddings).resolve()), plan_["encoder"]["model_version"], cfg.version_check)
    heads = {
        name: Head.options(name=f"Head_{name}", ray_actor_options={"num_cpus": cfg.head_cpus}, max_ongoing_requests=inner_ongoing,
                           **_scaling(cfg.head_replicas, cfg.head_max_replicas, cfg.target_ongoing_requests),
                           ).bind(name, str(Path(h["path"]).resolve()), cfg.batch_size, cfg.batch_wait_s)
        for name, h in plan_["heads"].items()
    }
    return Ingress.options(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
    ).bind(to_dict(cfg), plan_, encoder, store, heads)


def app_builder(args: dict):
    """Import-path builder for Ray's CLI: ``serve run userfm.serve:app_builder config=experiments/serve/default.yaml``
    or ``import_path: userfm.serve:app_builder`` with ``args: {config: ..., <ServeConfig key>: ...}`` in a
    Serve config file. Host and port then come from Serve's ``http_options``, not from ServeConfig."""
    args = dict(args or {})
    return build_app(load_config(ServeConfig, args.pop("config", None), **args))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    # Serve's proxy binds with SO_REUSEPORT: a second cluster on the same port would silently share its
    # requests (ray-notes.md). A plain bind fails if anything listens there.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"port {port} on {host} is in use ({exc.strerror}); pick another (port: 0 = any free one)") from None


_RUNNING: dict = {}


def start(cfg: ServeConfig, *, address: str | None = None, num_cpus: int | None = None, progress=print) -> str:
    """Start the app on Ray Serve (embedded local Ray unless ``address``); return its base URL once
    ``/healthz`` answers 200. Non-blocking: the app runs until :func:`stop`."""
    import httpx

    from userfm.runtime import init_ray

    auth = check_exposure(cfg)  # before anything starts: a refused bind costs nothing
    p = plan(cfg)
    for w in p["warnings"]:
        progress(f"[serve] warning: {w}")
    if auth["read"] == "open" and not is_loopback(cfg.host):
        progress(f"[serve] warning: allow_unauthenticated: every route on {cfg.host} is open to the network")
    init_ray(address, num_cpus=num_cpus)
    if _RUNNING.get("port") is None:
        port = cfg.port or _free_port(cfg.host)
        _check_port(cfg.host, port)
        serve.start(http_options={"host": cfg.host, "port": port})
        _RUNNING["port"] = port
    port = _RUNNING["port"]
    t0 = time.perf_counter()
    progress(f"[serve] deploying {cfg.app_name}: encoder {p['encoder']['model_id']}@{p['encoder']['model_version']}, "
             f"embeddings {cfg.embeddings or '-'}, heads {sorted(p['heads']) or '-'} on {cfg.host}:{port}; auth: reads "
             f"{auth['read']}, admin {auth['admin']}" + (", allow_unauthenticated" if auth["allow_unauthenticated"] else ""))
    serve.run(build_app(cfg, p), name=cfg.app_name, route_prefix=cfg.route_prefix,
              logging_config={"enable_access_log": cfg.access_log, "log_level": "WARNING"})
    base = f"http://{cfg.host}:{port}{cfg.route_prefix.rstrip('/')}"
    deadline = time.monotonic() + cfg.start_timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/healthz", timeout=10)
            if r.status_code == 200:
                progress(f"[serve] healthy in {time.perf_counter() - t0:.1f}s: {base} (docs {base}/docs)")
                return base
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise ServeError(f"{base}/healthz did not answer 200 within start_timeout_s={cfg.start_timeout_s}: {last}")


def stop() -> None:
    """Shut Serve down (all its applications, the proxy and the controller); Ray itself keeps running."""
    serve.shutdown()
    _RUNNING.clear()


def smoke_calls(base_url: str, user_id: str, events: list[dict], head_name: str | None = None,
                api_key: str | None = None, timeout: float = 60.0) -> list[tuple[str, str, int, Any]]:
    """Call every route once: ``[(method, path, status, JSON body or text head)]``."""
    import httpx

    headers = {"x-api-key": api_key} if api_key else {}
    calls = [("GET", "/healthz", None), ("POST", "/v1/embed", {"user_id": user_id, "events": events}),
             ("GET", f"/v1/users/{user_id}/embedding", None), ("GET", f"/v1/users/{user_id}/similar?k=5", None),
             ("GET", "/v1/heads", None)]
    if head_name:
        calls += [("POST", f"/v1/heads/{head_name}/predict", {"user_id": user_id}),
                  ("POST", f"/v1/heads/{head_name}/predict", {"events": events})]
    calls.append(("GET", "/docs", None))
    out = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
        for method, path, body in calls:
            r = client.request(method, path, json=body)
            try:
                payload = r.json()
            except ValueError:
                payload = r.text[:80]
            out.append((method, path, r.status_code, payload))
    return out


def serve_forever(cfg: ServeConfig, *, address: str | None = None, num_cpus: int | None = None) -> None:
    """``userfm serve``: start, print the URLs, block until Ctrl-C, shut down."""
    base = start(cfg, address=address, num_cpus=num_cpus)
    print(f"[serve] {base}/healthz  {base}/docs  {base}/v1/embed  {base}/v1/heads  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        print("[serve] shutting down", flush=True)
        stop()
