"""What every section of the run report shares: its config (``ReportConfig``), its error, and the small HTML and
figure helpers."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path


from userfm.errors import UserfmError


_NA = "n/a"


class ReportError(UserfmError, ValueError):
    """The run folder cannot be reported on; the message names the folder or option."""


@dataclass(frozen=True)
class ReportConfig:
    run: str = ""  # run folder: dataset/, pretrain/<objective>/, embeddings/<objective>/, evaluate/ (any may be missing)
    out: str | None = None  # report folder (default <run>/report); report.html and the PNGs go there
    sweeps: tuple[str, ...] = ()  # more folders searched recursively for sweep figures (fig_*.png)
    color_by: tuple[str, ...] = ()  # attribute columns to colour maps by ("" = auto: first attribute table + top service/category)
    max_colorings: int = 6  # attribute panels per map at most (auto mode)
    map_method: str = "auto"  # tsne | umap | auto (umap when importable, else tsne)
    map_users: int = 2000  # users per 2-D map at most (uniform subsample, same users for every objective)
    perplexity: float = 30.0  # t-SNE perplexity (capped at (users - 1) / 3)
    tsne_iters: int = 500  # t-SNE optimisation iterations (>= 250; 1000 is sharper and twice as slow)
    cluster_users: int = 20000  # users for k-means and keywords at most (uniform subsample)
    clusters: int = 8  # k-means clusters per embedding table
    keywords: int = 10  # keywords shown per cluster
    neighbours: int = 10  # k of the k-NN agreement printed above each map panel
    max_categories: int = 10  # colours per categorical attribute; rarer values are drawn grey as "other"
    seed: int = 0  # subsample, t-SNE / UMAP and k-means seed

    def __post_init__(self):
        if not self.run:
            raise ValueError("run: the run folder is required")
        if self.map_method not in ("auto", "tsne", "umap"):
            raise ValueError(f"map_method must be auto, tsne or umap, got {self.map_method!r}")
        for name in ("map_users", "cluster_users", "clusters", "keywords", "neighbours", "max_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tsne_iters < 250:
            raise ValueError(f"tsne_iters must be >= 250 (scikit-learn's minimum), got {self.tsne_iters}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be >= 2, got {self.clusters}")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path.name


def _img(name: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{_e(name)}" alt="{_e(alt)}">{cap}</figure>'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (callers escape text with ``_e``)."""
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(v)
    return f"{v:.{digits}g}" if (a and (a < 1e-3 or a >= 1e5)) else f"{v:,.{digits}f}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s) or "_"
