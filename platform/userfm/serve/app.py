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
import hmac
import logging
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from userfm.config import from_dict, load_config, to_dict
from userfm.serve.config import ADMIN_PREFIX, OPEN_PATHS, ServeConfig, ServeError, auth_summary, check_exposure, is_loopback, plan, read_key_file, reload_target, resolve_minilm_cache, version_notes
from userfm.serve.deployments import SHUTDOWN_POLL_S, EmbeddingStore, Encoder, Head, _StoredTable, hop_timing, lookup, record_hop

log = logging.getLogger(__name__)


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


@serve.deployment(graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
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
