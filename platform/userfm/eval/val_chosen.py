"""The ``val-chosen`` evaluation row: among several pretrained tables (and heads), the one a recipe would keep.

A recipe that pretrains every objective (the demo's default on real data, ``userfm.demo.REAL_OBJECTIVES``)
keeps, per task, the (table, head) whose task metric is best on the validation users; evaluate reports that
choice's test predictions per fold and seed as the row ``val-chosen``, test never read to choose.
"""

from __future__ import annotations

import numpy as np

VAL_CHOSEN = "val-chosen"  # the row of the pretrained (table, head) that scores best on val, per fold and seed


def val_chosen(candidates: dict[str, dict], higher_is_better: bool) -> tuple[list[str], list[np.ndarray]]:
    """Per seed, the candidate with the best val metric, and its test scores: the row a recipe that pretrains
    several objectives and keeps, per task, the (table, head) best on its val users would report (test
    never read to choose).

    ``candidates``: model -> {"val": [val metric per seed], "scores": [test scores per seed]}, in row order
    (a tie keeps the first; a NaN val metric, e.g. AUC on one class, never wins).
    Returns (the chosen model per seed, its test scores per seed).
    """
    sign = 1.0 if higher_is_better else -1.0
    n = len(next(iter(candidates.values()))["scores"])
    chosen = [max(candidates, key=lambda m: -np.inf if np.isnan(v := candidates[m]["val"][i]) else sign * v)
              for i in range(n)]
    return chosen, [candidates[m]["scores"][i] for i, m in enumerate(chosen)]
