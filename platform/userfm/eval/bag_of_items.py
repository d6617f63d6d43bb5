"""The bag-of-items yardstick: a linear model on the binary user x item matrix, no pretraining at all.

The first baseline a recommender-systems engineer fits for a user attribute: each user is the set of
items they took, one column per item a training user took, and a logistic regression (ridge for
regression tasks) reads it, C chosen on val. Weinsberg et al., "BlurMe: inferring and obfuscating user
gender based on ratings" (RecSys 2012) reach 0.85 AUC on gender from ML-1M with it. Items are the
events' ``item_id``; text plays no part (TF-IDF is the text yardstick), so it is the baseline for
id-only logs.

    X  (U, I)  X[u, i] = 1 if user u took item i in their (held-out-shortened) history, else 0;
               I = the distinct items of the task's training users (items only val/test users took are
               dropped: a linear model learns nothing for them)

Nothing here imports ``ray`` or ``torch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc


def user_items(data: str | Path, holdout: int = 0, service: str = "") -> dict[str, list[str]]:
    """user id -> the item ids of the user's stored events (scope "all"), oldest first, without the last
    ``holdout`` events (``service``: only that service's; events without an item are skipped)."""
    from userfm.infer.embed import read_history

    t = read_history(data, ["user_id", "item_id"], holdout, service)
    items = t.column("item_id").combine_chunks()
    flat = items.flatten()
    off = items.offsets.to_numpy()
    off = off - off[0]
    valid = pc.is_valid(flat).to_numpy(zero_copy_only=False)
    values = flat.to_pylist()
    return {u: [values[j] for j in range(off[i], off[i + 1]) if valid[j]]
            for i, u in enumerate(t.column("user_id").to_pylist())}


def bag_of_items(docs: dict[str, list[list[str]]]) -> tuple[dict[str, Any], int]:
    """split -> per user its item ids  ->  (split -> (n, I) binary CSR float32, I).

    The columns are the items of ``docs["train"]`` (sorted); other splits' unknown items are dropped.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(analyzer=_identity, binary=True, lowercase=False, dtype=np.float32)
    x = {"train": vec.fit_transform(docs["train"])}
    for s, d in docs.items():
        if s != "train":
            x[s] = vec.transform(d)
    return x, len(vec.vocabulary_)


def _identity(items: list[str]) -> list[str]:  # CountVectorizer analyzer: the item ids are the tokens
    return items

