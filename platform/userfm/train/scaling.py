"""Scaling-law arithmetic: power-law fits with uncertainty, the compute frontier, correlations.

Pure numpy/scipy on arrays (no Ray, no torch), used by ``userfm sweep report``. The laws are those of
Kaplan et al. (https://arxiv.org/abs/2001.08361) as CLUE uses them (https://arxiv.org/abs/2111.11294):
pretext test loss ``L(C) = a * C^(-b)`` (optionally ``+ c``, an irreducible loss) over compute ``C`` in
PF-days, fitted on the compute frontier (the best loss reached at each compute), and ``L(N)``,
``L(D)`` over non-embedding parameters and dataset length. FLOPs per sample and parameter counts are
:func:`userfm.models.encoders.flops_per_sample` and :func:`userfm.models.encoders.expected_num_params`; pretraining
logs cumulative FLOPs and PF-days, so nothing here recounts them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day


def pf_days(flops: float | np.ndarray) -> float | np.ndarray:
    """FLOPs -> petaflop/s-days (10^15 FLOP/s for 86,400 s)."""
    return flops / PF_DAY


@dataclass(frozen=True)
class PowerLawFit:
    """``y = a * x^(-b) + c`` with standard errors (``c`` = 0 and ``c_err`` = 0 without an offset).

    ``r2`` is the coefficient of determination of ``log y`` (the scale the law is straight on), so fits
    with and without an offset are compared on the same footing.
    """

    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    r2: float
    n: int
    offset: bool

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, dtype=float) ** (-self.b) + self.c

    def describe(self, x: str = "C", y: str = "L") -> str:
        law = f"{y} = {self.a:.4g} * {x}^({-self.b:+.4f})" + (f" + {self.c:.4g}" if self.offset else "")
        return f"{law}; b = {self.b:.4f} ± {self.b_err:.4f}, R² = {self.r2:.3f}, n = {self.n}"

    def to_dict(self) -> dict:
        return asdict(self)


def _r2_log(y: np.ndarray, pred: np.ndarray) -> float:
    ly, lp = np.log(y), np.log(np.maximum(pred, 1e-300))
    sst = float(np.sum((ly - ly.mean()) ** 2))
    return 1.0 - float(np.sum((ly - lp) ** 2)) / sst if sst > 0 else float("nan")


def fit_power_law(x, y, offset: bool = False) -> PowerLawFit:
    """Least-squares power law through points ``(x_i, y_i)``, all positive.

    Without ``offset``: ordinary least squares of ``log y = log a - b log x`` (standard errors from the
    residual variance, ``a``'s by the delta method). With ``offset``: nonlinear least squares of
    ``a x^-b + c`` (scipy ``curve_fit``, started from the offset-free fit, ``0 <= c < min y``) with
    errors from its covariance; ``x`` is rescaled by its geometric mean while fitting, for conditioning.

    Args:
        x: (n,) positive, e.g. compute in PF-days; y: (n,) positive, e.g. test loss.
        offset: also fit the irreducible term ``c``.

    Raises:
        ValueError: fewer than 3 points (4 with ``offset``), a non-positive value, or one distinct x.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    need = 4 if offset else 3
    if x.shape != y.shape or x.ndim != 1 or len(x) < need:
        raise ValueError(f"need >= {need} points of matching 1-d x and y, got shapes {x.shape} and {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("power-law fits need finite, positive x and y")
    if np.unique(x).size < 2:
        raise ValueError("need at least two distinct x values")
    lx, ly = np.log(x), np.log(y)
    design = np.stack([np.ones_like(lx), lx], axis=1)  # (n, 2)
    coef, *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - design @ coef
    dof = len(x) - 2
    cov = float(resid @ resid) / dof * np.linalg.inv(design.T @ design)  # (2, 2)
    log_a, slope = coef
    a, b = math.exp(log_a), -slope
    a_err, b_err = a * math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    if not offset:
        return PowerLawFit(a, b, 0.0, a_err, b_err, 0.0, _r2_log(y, a * x ** (-b)), len(x), False)

    from scipy.optimize import curve_fit

    scale = math.exp(lx.mean())
    xs = x / scale

    def law(xx, aa, bb, cc):
        return aa * xx ** (-bb) + cc

    p0 = [a * scale ** (-b), max(b, 1e-3), 0.0]
    hi = float(y.min()) * (1 - 1e-9)
    p, pcov = curve_fit(law, xs, y, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, hi]), maxfev=20000)
    err = np.sqrt(np.clip(np.diag(pcov), 0, None))
    a2, b2, c2 = p
    # a for unscaled x: a2 * scale^b2 (the error shown ignores b's share)
    return PowerLawFit(float(a2 * scale**b2), float(b2), float(c2), float(err[0] * scale**b2), float(err[1]),
                       float(err[2]), _r2_log(y, law(xs, *p)), len(x), True)


def compute_frontier(compute, loss) -> np.ndarray:
    """Mask of the points on the compute-efficient frontier.

    A point is on it when no point with at most its compute reached a loss as low (ties in compute: the
    lower loss). Args: compute (n,), loss (n,). Returns: (n,) bool.
    """
    c, l = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    keep = np.zeros(len(c), dtype=bool)
    best = math.inf
    for i in np.lexsort((l, c)):  # by compute, then loss
        if np.isfinite(l[i]) and np.isfinite(c[i]) and l[i] < best:
            keep[i], best = True, l[i]
    return keep


def best_per_group(keys, loss) -> tuple[list, np.ndarray]:
    """Lowest loss per distinct key (e.g. per model size for L(N)): ``(keys sorted, (k,) best losses)``."""
    keys = list(keys)
    loss = np.asarray(loss, dtype=float)
    uniq = sorted(set(keys))
    return uniq, np.array([np.nanmin([l for k, l in zip(keys, loss) if k == u]) for u in uniq])


def correlation(x, y) -> dict:
    """Pearson and Spearman correlation with two-sided p-values over the finite pairs of (n,) x, y."""
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x)), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    pr, sr = pearsonr(x, y), spearmanr(x, y)
    return {"n": int(len(x)), "pearson": float(pr[0]), "pearson_p": float(pr[1]),
            "spearman": float(sr[0]), "spearman_p": float(sr[1])}
