"""Objectives: the pretext tasks (``pretext``: batch building, augmentations, heads, loss wiring) and their pure
losses, one per file (``losses``: NT-Xent / InfoNCE; ``future``, ``next_event``, ``masked_item``; ``multitask``:
weighted sums of them).

Here, importable without torch: the objectives' names and how a multi-task sum is spelled and checked."""

from __future__ import annotations

OBJECTIVES = ("mlm", "simclr", "clue", "future", "next", "masked-item")
# whose targets are the user's own events, never other users: they can train on every window of a history
# (PretrainConfig.windows); simclr and clue contrast users, so two windows of one user would be each other's negative
EVENT_OBJECTIVES = ("mlm", "future", "next", "masked-item")


def objective_parts(objective: str) -> tuple[str, ...]:
    """``"clue+future"`` -> ``("clue", "future")``; a single objective -> a 1-tuple."""
    return tuple(p.strip() for p in objective.split("+"))


def reads_windows(objective: str) -> bool:
    """True when every part of ``objective`` is one of EVENT_OBJECTIVES."""
    return all(p in EVENT_OBJECTIVES for p in objective_parts(objective))


def check_objective(objective: str, weights: tuple[float, ...] = ()) -> None:
    """``objective`` is one of OBJECTIVES or a "+"-joined sum of distinct ones, with one weight >= 0 each
    (or none); raises ValueError naming what is wrong."""
    parts = objective_parts(objective)
    if any(p not in OBJECTIVES for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"objective must be one of {OBJECTIVES} or a sum of distinct ones ([clue, future]), "
                         f"got {objective!r}")
    if weights and (len(weights) != len(parts) or min(weights) < 0):
        raise ValueError(f"objective_weights must be {len(parts)} numbers >= 0, one per objective of {objective!r}, "
                         f"got {list(weights)}")
