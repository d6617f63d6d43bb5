"""What ``userfm serve`` serves: its config (``ServeConfig``), the auth and exposure checks, and the plan read
from the embedding table, encoder and heads it names (driver side; metadata only, no weights)."""

import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from userfm.errors import UserfmError


HEAD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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


