"""Downstream heads on frozen embeddings: the logistic/ridge and U-MLP heads (fit, save, load) and the
retrieval head over the item catalog with its full-ranking scorer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from userfm.eval import metrics as M
from userfm.eval.tasks import EvalConfig, EvalError, HEAD_FORMAT, TaskConfig


# --------------------------------------------------------------------------------------------------
# Heads (pickle-free: head.json + weights.safetensors)
# --------------------------------------------------------------------------------------------------


def _standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0).astype(np.float32)
    std = x.std(axis=0).astype(np.float32)
    return mean, np.where(std > 1e-6, std, 1.0).astype(np.float32)  # constant dims stay constant


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LinearHead:
    """Logistic regression (classification) or ridge (regression) on standardised embeddings."""

    def __init__(self, meta: dict, weights: dict[str, np.ndarray]):
        self.meta = meta  # kind "logreg" | "ridge", classes, input_dim, task, ...
        self.w = weights  # x_mean (D,), x_std (D,), coef (k', D), intercept (k',)

    @property
    def classes(self) -> list | None:
        return self.meta.get("classes")

    def decision(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float32) - self.w["x_mean"]) / self.w["x_std"]
        return z.astype(np.float64) @ self.w["coef"].T.astype(np.float64) + self.w["intercept"]  # (n, k')

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, D) embeddings -> (n, k) class probabilities (column order = ``classes``)."""
        if self.meta["kind"] not in ("logreg", "softmax"):
            raise EvalError("predict_proba: a regression head has no class probabilities; use predict")
        z = self.decision(x)
        if z.shape[1] == 1:  # binary: scikit-learn keeps one row of coefficients, for class 1
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        return _softmax(z)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) class values (classification) or predicted values (regression)."""
        if self.meta["kind"] == "ridge":
            return self.decision(x)[:, 0]
        return np.asarray(self.classes, dtype=object)[self.predict_proba(x).argmax(axis=1)]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """What the metrics read: probabilities (n, k), or values (n,) for regression."""
        return self.decision(x)[:, 0] if self.meta["kind"] == "ridge" else self.predict_proba(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k) pre-softmax scores (a retrieval head: one per catalog item, order ``classes``)."""
        return self.decision(x)


SPARSE_CHUNK = 4096  # rows of a sparse input (TF-IDF, bag-of-items) densified at a time by the U-MLP


def _mlp_module(d_in: int, hidden: int, n_out: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class MLPHead:
    """U-MLP: standardise -> Linear -> ReLU -> Dropout -> Linear; softmax over classes or one value."""

    def __init__(self, meta: dict, weights: dict[str, np.ndarray]):
        import torch

        self.meta = meta  # kind "mlp", input_dim, hidden, n_out, dropout, classes, target_mean/std, ...
        self.w = weights
        self.module = _mlp_module(meta["input_dim"], meta["hidden"], meta["n_out"], meta["dropout"])
        self.module.load_state_dict({k[len("mlp."):]: torch.from_numpy(np.ascontiguousarray(v))
                                     for k, v in weights.items() if k.startswith("mlp.")})
        self.module.eval()

    @property
    def classes(self) -> list | None:
        return self.meta.get("classes")

    def _out(self, x: np.ndarray) -> np.ndarray:
        import torch

        if sp.issparse(x):  # a head fitted on sparse features (mean 0, std 1): densified SPARSE_CHUNK rows at a time
            x = sp.csr_matrix(x, dtype=np.float32)
            parts = [self._out(x[i:i + SPARSE_CHUNK].toarray()) for i in range(0, x.shape[0], SPARSE_CHUNK)]
            return np.concatenate(parts) if parts else self._out(np.zeros((0, x.shape[1]), np.float32))
        z = (np.asarray(x, np.float32) - self.w["x_mean"]) / self.w["x_std"]
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))).double().numpy()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, D) embeddings -> (n, k) class probabilities (column order = ``classes``)."""
        if self.classes is None:
            raise EvalError("predict_proba: a regression head has no class probabilities; use predict")
        return _softmax(self._out(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.classes is None:
            return self._out(x)[:, 0] * self.meta["target_std"] + self.meta["target_mean"]
        return np.asarray(self.classes, dtype=object)[self.predict_proba(x).argmax(axis=1)]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x) if self.classes is None else self.predict_proba(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, k) pre-softmax scores (a retrieval head: one per catalog item, order ``classes``)."""
        return self._out(x)


def save_head(path: str | Path, head: LinearHead | MLPHead) -> Path:
    """Write ``head.json`` (metadata, classes, task) and ``weights.safetensors`` (float32 arrays)."""
    from safetensors.numpy import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "head.json").write_text(json.dumps({"format": HEAD_FORMAT, "version": 1, **head.meta}, indent=2))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.w.items()}, str(p / "weights.safetensors"))
    return p


def load_head(path: str | Path) -> LinearHead | MLPHead:
    """Load a head saved by ``run_evaluate`` (``heads/<task>/<model>/seed<k>/``), no pickle.

    The result has ``predict_proba(embeddings (n, D)) -> (n, k)`` for classification heads (columns in
    the order of ``.classes``), and ``predict(embeddings) -> (n,)`` for every head.
    """
    from safetensors.numpy import load_file

    p = Path(path)
    if not (p / "head.json").is_file() or not (p / "weights.safetensors").is_file():
        raise EvalError(f"{p}: not a saved head (needs head.json and weights.safetensors)")
    meta = json.loads((p / "head.json").read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise EvalError(f"{p}/head.json: format is {meta.get('format')!r}, expected {HEAD_FORMAT!r}")
    weights = load_file(str(p / "weights.safetensors"))
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    if meta["kind"] == "mlp":
        return MLPHead(meta, weights)
    if meta["kind"] in ("logreg", "ridge", "softmax"):
        return LinearHead(meta, weights)
    raise EvalError(f"{p}/head.json: unknown head kind {meta['kind']!r}")


def _fit_sklearn_linear(x_tr, y_tr, x_va, y_va, regression: bool, cs: tuple[float, ...], max_iter: int, seed: int):
    """Fit one linear model per C, keep the one with the best val loss (log loss; RMSE for ridge).
    Works on dense or sparse x. Returns (model, C, its val loss).

    Logistic fits go through the C values in increasing order, each starting from the previous solution
    (``warm_start``): the same optimum to lbfgs' tolerance, in about half the iterations (the demo's
    384-float mean-MiniLM table: 7.8 s -> 3.7 s per grid)."""
    import copy

    from sklearn.linear_model import LogisticRegression, Ridge

    best, best_loss, best_c = None, math.inf, None
    warm = None if regression else LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)
    for c in sorted(cs):
        if regression:
            model = Ridge(alpha=1.0 / c, random_state=seed).fit(x_tr, y_tr)
            loss = M.rmse(y_va, model.predict(x_va))
        else:
            model = copy.deepcopy(warm.set_params(C=c).fit(x_tr, y_tr))  # a copy: the next C refits `warm`
            proba = np.zeros((x_va.shape[0], int(max(y_tr.max(), y_va.max())) + 1))
            proba[:, model.classes_] = model.predict_proba(x_va)
            loss = M.log_loss(y_va, proba)
        if best is None or loss < best_loss:  # (the first fit stands if every val loss is NaN)
            best, best_loss, best_c = model, loss, c
    return best, best_c, best_loss


def fit_logreg(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
               classes: list | None, cfg: EvalConfig, seed: int) -> LinearHead:
    """Logistic regression (ridge for regression) on standardised embeddings; C picked on val loss."""
    mean, std = _standardize_stats(x_tr)
    z_tr, z_va = (x_tr - mean) / std, (x_va - mean) / std
    regression = task.type == "regression"
    model, c, _ = _fit_sklearn_linear(z_tr, y_tr, z_va, y_va, regression, cfg.logreg_c, cfg.logreg_max_iter, seed)
    if regression:
        coef, intercept = np.asarray(model.coef_, np.float64).reshape(1, -1), np.atleast_1d(model.intercept_)
    else:
        k = len(classes)
        coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
        if len(model.classes_) != k:  # a class missing from train: never predicted
            if k == 2:
                raise EvalError(f"task {task.name!r}: only one class among training users")
            full_c, full_b = np.zeros((k, coef.shape[1])), np.full(k, -1e9)
            full_c[model.classes_], full_b[model.classes_] = coef, intercept
            coef, intercept = full_c, full_b
    meta = {"kind": "ridge" if regression else "logreg", "task": dataclasses.asdict(task), "classes": classes,
            "input_dim": int(x_tr.shape[1]), "C": c, "seed": seed}
    return LinearHead(meta, {"x_mean": mean, "x_std": std, "coef": coef, "intercept": intercept})


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0 = unchanged), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_mlp(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
            classes: list | None, cfg: EvalConfig, seed: int) -> MLPHead:
    """U-MLP trained with AdamW on cross-entropy (or MSE on the standardised target), early-stopped on the
    val loss with the best epoch's weights restored. ``x``: (n, D) embeddings (standardised on train), or
    scipy sparse features (TF-IDF, bag-of-items: read as they are, densified a mini-batch at a time)."""
    with _torch_threads(cfg.torch_threads):
        return _train_mlp(x_tr, y_tr, x_va, y_va, task, classes, cfg, seed)


def _train_mlp(x_tr, y_tr, x_va, y_va, task: TaskConfig, classes: list | None, cfg: EvalConfig, seed: int) -> MLPHead:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    regression = task.type == "regression"
    t_mean, t_std = (float(y_tr.mean()), float(y_tr.std() or 1.0)) if regression else (0.0, 1.0)
    n_out = 1 if regression else len(classes)
    n_tr, d_in = x_tr.shape
    if sp.issparse(x_tr):
        # TF-IDF (unit-norm rows) or bag-of-items (binary) read as they are: centring would densify them. Each
        # mini-batch is densified on its own, the val rows SPARSE_CHUNK at a time.
        mean, std = np.zeros(d_in, np.float32), np.ones(d_in, np.float32)
        xs_tr, xs_va = sp.csr_matrix(x_tr, dtype=np.float32), sp.csr_matrix(x_va, dtype=np.float32)
        rows = lambda idx: torch.from_numpy(xs_tr[idx.numpy()].toarray())  # noqa: E731
        val_out = lambda: torch.cat([model(torch.from_numpy(xs_va[i:i + SPARSE_CHUNK].toarray()))  # noqa: E731
                                     for i in range(0, xs_va.shape[0], SPARSE_CHUNK)] or [torch.zeros(0, n_out)])
    else:
        mean, std = _standardize_stats(x_tr)
        xt = torch.from_numpy(((x_tr - mean) / std).astype(np.float32))
        xv = torch.from_numpy(((x_va - mean) / std).astype(np.float32))
        rows = lambda idx: xt[idx]  # noqa: E731
        val_out = lambda: model(xv)  # noqa: E731
    if regression:
        yt = torch.from_numpy(((y_tr - t_mean) / t_std).astype(np.float32))
        yv = torch.from_numpy(((y_va - t_mean) / t_std).astype(np.float32))
        loss_fn = lambda out, y: F.mse_loss(out[:, 0], y)  # noqa: E731
    else:
        yt, yv = torch.from_numpy(y_tr.astype(np.int64)), torch.from_numpy(y_va.astype(np.int64))
        loss_fn = F.cross_entropy
    model = _mlp_module(d_in, cfg.mlp_hidden, n_out, cfg.mlp_dropout)
    best_state, best_epoch, best_loss, epochs = _early_stopped_fit(
        model, n_tr, lambda idx: loss_fn(model(rows(idx)), yt[idx]), lambda: loss_fn(val_out(), yv), cfg, gen)
    weights = {"x_mean": mean, "x_std": std, **{f"mlp.{k}": v.numpy() for k, v in best_state.items()}}
    meta = {"kind": "mlp", "task": dataclasses.asdict(task), "classes": classes, "input_dim": int(d_in),
            "hidden": cfg.mlp_hidden, "n_out": n_out, "dropout": cfg.mlp_dropout, "target_mean": t_mean,
            "target_std": t_std, "best_epoch": best_epoch, "epochs": epochs, "val_loss": best_loss, "seed": seed}
    return MLPHead(meta, weights)


def mlp_batch(n: int, cfg: EvalConfig) -> int:
    """Mini-batch size of the early-stopped heads on ``n`` training rows: ``mlp_batch_size``, shrunk so an
    epoch has at least ``mlp_min_steps`` steps (n = 200 at 256 / 8 -> 25)."""
    return max(1, min(cfg.mlp_batch_size, math.ceil(n / cfg.mlp_min_steps)))


def _early_stopped_fit(model, n: int, batch_loss, val_loss, cfg: EvalConfig, gen) -> tuple[dict, int, float, int]:
    """:func:`userfm.train.early_stop.early_stopped_fit` with the heads' settings (``mlp_*``; :func:`mlp_batch` rows a
    batch). Returns (best epoch's state dict, best epoch, best val loss, epochs run)."""
    from userfm.train.early_stop import early_stopped_fit

    return early_stopped_fit(model, n, batch_loss, val_loss, lr=cfg.mlp_lr, weight_decay=cfg.mlp_weight_decay,
                             batch_size=mlp_batch(n, cfg), max_epochs=cfg.mlp_max_epochs, patience=cfg.mlp_patience, gen=gen)


_FITTERS = {"mlp": fit_mlp, "logreg": fit_logreg}


# --------------------------------------------------------------------------------------------------
# Next-item retrieval: heads over the item catalog, full-ranking ranks, popularity
# --------------------------------------------------------------------------------------------------


def _soft_targets(y: np.ndarray, history: list[np.ndarray], n_items: int, weight: float) -> np.ndarray:
    """(n,) held-out items + histories -> (n, n_items) float32 target distributions: 1 - ``weight`` on the
    held-out item, ``weight`` spread evenly over the earlier items (all on the held-out item when the
    history has no item)."""
    t = np.zeros((len(y), n_items), np.float32)
    for i, (item, h) in enumerate(zip(y, history)):
        if weight > 0 and len(h):
            np.add.at(t[i], h, weight / len(h))
            t[i, item] += 1.0 - weight
        else:
            t[i, item] = 1.0
    return t


def _target_mass(y: np.ndarray, history: list[np.ndarray], n_items: int, weight: float) -> np.ndarray:
    """:func:`_soft_targets` summed over users, (n_items,) float64, without the (n, n_items) matrix."""
    lens = np.array([len(h) for h in history], np.int64)
    spread = (lens > 0) & (weight > 0)
    mass = np.bincount(np.asarray(y, np.int64), weights=np.where(spread, 1.0 - weight, 1.0), minlength=n_items)
    if spread.any():
        items = np.concatenate([np.asarray(h, np.int64) for h, s in zip(history, spread) if s])
        mass += np.bincount(items, weights=np.repeat(weight / lens[spread], lens[spread]), minlength=n_items)
    return mass


class _FactorizedOutput:
    """Output layer ``h (n, H) -> h @ W.T @ V.T + b (n, n_items)`` with the item vectors ``V`` (n_items, k)
    fixed: H x k + n_items parameters instead of H x n_items, so what the head learns from one item carries
    to the items that co-occur with it. Its weight is ``V @ W`` (n_items, H): saved heads are plain layers."""

    @staticmethod
    def module(d_h: int, item_vectors: np.ndarray, bias: np.ndarray):
        import torch
        from torch import nn

        class Factorized(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(d_h, item_vectors.shape[1], bias=False)
                self.register_buffer("items", torch.from_numpy(np.ascontiguousarray(item_vectors, np.float32)))
                self.bias = nn.Parameter(torch.from_numpy(bias.astype(np.float32)))

            def forward(self, h):
                return self.proj(h) @ self.items.T + self.bias

        return Factorized()

    @staticmethod
    def dense(state: dict, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """A factorized layer's state -> (weight (n_items, H), bias (n_items,)) of the equivalent nn.Linear."""
        return ((state[prefix + "items"] @ state[prefix + "proj.weight"]).numpy(), state[prefix + "bias"].numpy())


def fit_retrieval(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, task: TaskConfig,
                  classes: list, cfg: EvalConfig, seed: int, history: list[np.ndarray], hidden: int = 0,
                  item_vectors: np.ndarray | None = None) -> LinearHead | MLPHead:
    """A retrieval head: frozen user vector (n, D) -> logits over the ``classes`` catalog (n, n_items).

    ``hidden`` 0: one linear layer (saved as a ``softmax`` LinearHead); > 0: the U-MLP. Trained with AdamW
    on softmax cross-entropy towards :func:`_soft_targets`, early-stopped on the val users' held-out-item
    cross-entropy with the best epoch's weights restored. ``item_vectors`` (n_items, k), k > 0: the output
    layer is factorized through these fixed item vectors (:class:`_FactorizedOutput`), its bias starting at
    the log item counts of the training targets (the popularity ranking); the saved head is the same plain
    layer either way.
    """
    with _torch_threads(cfg.torch_threads):
        import torch
        import torch.nn.functional as F
        from torch import nn

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        mean, std = _standardize_stats(x_tr)
        n_items = len(classes)
        xt = torch.from_numpy(((x_tr - mean) / std).astype(np.float32))
        xv = torch.from_numpy(((x_va - mean) / std).astype(np.float32))
        yv = torch.from_numpy(y_va.astype(np.int64))
        factorized = item_vectors is not None and item_vectors.shape[1] > 0
        if factorized:
            if item_vectors.shape[0] != n_items:
                raise ValueError(f"item_vectors has {item_vectors.shape[0]} rows for a catalog of {n_items} items")
            counts = _target_mass(y_tr, history, n_items, cfg.retrieval_history_weight)
            out = _FactorizedOutput.module(hidden or xt.shape[1], item_vectors, np.log(counts + 1.0))
            model = nn.Sequential(*list(_mlp_module(xt.shape[1], hidden, n_items, cfg.mlp_dropout))[:-1], out) if hidden else out
        else:
            model = _mlp_module(xt.shape[1], hidden, n_items, cfg.mlp_dropout) if hidden else nn.Linear(xt.shape[1], n_items)

        def batch_loss(idx):
            rows = idx.numpy()
            target = torch.from_numpy(_soft_targets(y_tr[rows], [history[i] for i in rows], n_items,
                                                    cfg.retrieval_history_weight))
            return F.cross_entropy(model(xt[idx]), target)

        best_state, best_epoch, best_loss, epochs = _early_stopped_fit(
            model, len(xt), batch_loss, lambda: F.cross_entropy(model(xv), yv), cfg, gen)
    meta = {"task": dataclasses.asdict(task), "classes": classes, "input_dim": int(xt.shape[1]), "best_epoch": best_epoch,
            "epochs": epochs, "val_loss": best_loss, "seed": seed, "history_weight": cfg.retrieval_history_weight,
            "item_factors": int(item_vectors.shape[1]) if factorized else 0}
    if factorized:  # the equivalent plain output layer
        last = "3." if hidden else ""  # the output layer's index in _mlp_module's Sequential
        weight, bias = _FactorizedOutput.dense(best_state, last)
        best_state = {k: v for k, v in best_state.items() if hidden and not k.startswith(last)}
        best_state.update({f"{last}weight": torch.from_numpy(weight), f"{last}bias": torch.from_numpy(bias)})
    if hidden:
        meta.update(kind="mlp", hidden=hidden, n_out=n_items, dropout=cfg.mlp_dropout, target_mean=0.0, target_std=1.0)
        return MLPHead(meta, {"x_mean": mean, "x_std": std, **{f"mlp.{k}": v.numpy() for k, v in best_state.items()}})
    return LinearHead({**meta, "kind": "softmax"}, {"x_mean": mean, "x_std": std, "coef": best_state["weight"].numpy(),
                                                    "intercept": best_state["bias"].numpy()})


def retrieval_ranks(score_fn: Callable[[np.ndarray], np.ndarray], n: int, target: np.ndarray,
                    seen: list[np.ndarray] | None = None, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each user's held-out item in the full catalog ranking, ``chunk`` users at a time.

    ``score_fn(rows)`` -> (len(rows), n_items) scores of users ``rows``; ``seen`` (per user, catalog indices)
    are removed from the ranking when given (the target itself never is). Returns (n,) int64.
    """
    out = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        scores = np.asarray(score_fn(rows))
        exclude = None
        if seen is not None:
            exclude = np.zeros(scores.shape, bool)
            for j, r in enumerate(rows):
                exclude[j, seen[r]] = True
        out[rows] = M.target_rank(scores, target[rows], exclude)
    return out




def fit_and_score(head: str, x: dict[str, np.ndarray], y: dict[str, np.ndarray], task: TaskConfig, classes: list | None,
                  cfg: EvalConfig, seed: int, retrieval: bool = False, history: list[np.ndarray] | None = None,
                  item_vectors: np.ndarray | None = None,
                  seen: list[np.ndarray] | None = None, val_metric: bool = False,
                  seen_val: list[np.ndarray] | None = None) -> tuple[LinearHead | MLPHead, np.ndarray, float, float]:
    """Fit one ``head`` ("mlp" or "logreg") on ``x["train"]`` (val picks C / the epoch) and score ``x["test"]``.

    ``x`` and ``y``: split -> (n, D) user vectors and (n,) targets. Retrieval heads train towards ``history``
    (the train users' catalog indices) and score the test users' targets' ranks (``seen`` removed).
    A module-level function, so evaluate's worker processes can run it (``EvalConfig.workers``).

    Returns (the fitted head, test scores: ``head.scores`` or (n,) ranks, fit seconds, scoring seconds). With
    ``val_metric``, the head also keeps the task's metric on the val users (ranked without ``seen_val``) in
    ``head.meta["val_metric"]``: what evaluate's ``val-chosen`` row picks by (a second full ranking on
    retrieval tasks, so only when that row is made).
    """
    t0 = time.perf_counter()
    if retrieval:
        fitted = fit_retrieval(x["train"], y["train"], x["val"], y["val"], task=task, classes=classes, cfg=cfg,
                               seed=seed, history=history, hidden=cfg.mlp_hidden if head == "mlp" else 0,
                               item_vectors=item_vectors)
    else:
        fitted = _FITTERS[head](x["train"], y["train"], x["val"], y["val"], task=task, classes=classes, cfg=cfg,
                                seed=seed)
    t1 = time.perf_counter()

    def outputs(split: str, excluded: list[np.ndarray] | None) -> np.ndarray:
        """A split's class scores, or its held-out items' ranks in the full catalog (``excluded`` removed)."""
        xs = x[split]
        return retrieval_ranks(lambda r: fitted.logits(xs[r]), len(xs), y[split], excluded) if retrieval else fitted.scores(xs)

    scores = outputs("test", seen)
    t2 = time.perf_counter()
    if val_metric and len(y["val"]):  # what a recipe choosing among tables may read (never test)
        fitted.meta["val_metric"] = float(M.compute(task.metric, y["val"], outputs("val", seen_val)))
    return fitted, scores, t1 - t0, t2 - t1
