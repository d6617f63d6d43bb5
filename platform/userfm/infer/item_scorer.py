"""The pretrained objective's own item scorer: next item with no head trained on top.

The ``future`` and ``next`` objectives train the user embedding to pick the next items out of the encoder's own
item vectors (:meth:`userfm.models.encoders.UserEncoder.item_vectors`: item encoder + hashed item id +
co-occurrence vector) through the objective head (a linear map into the item space and a temperature). Their
exported model folder keeps that head (``head.safetensors`` + ``objective.json``, written by
:func:`userfm.train.pretrain.export`), so a frozen user embedding ``z`` scores every catalog item as the
objective did in training:

    score(user, item) = cos(head(z), item_vector(item)) / temperature

That is a retrieval head with zero training (as SASRec scores the catalog with its own item table), next to the
retrieval heads ``evaluate`` trains on frozen embeddings. ``future`` maps the pooled user embedding; ``next``
maps the state after the last event, which is its user embedding (pooling "last", no output layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.errors import UserfmError

SCORING_OBJECTIVES = ("future", "next")
ITEM_COLUMNS = ("ts", "service", "text", "item_id", "category", "value")


class ItemScorerError(UserfmError):
    """A model folder without an item-scoring head, or a catalog the dataset does not hold."""


def has_item_scorer(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a ``future``/``next`` objective head (models exported before heads were kept,
    and other objectives, have none)."""
    d = Path(model_dir)
    if not (d / "head.safetensors").exists() or not (d / "objective.json").exists():
        return False
    return json.loads((d / "objective.json").read_text()).get("objective") in SCORING_OBJECTIVES


def catalog_events(rows: pa.Table, catalog: list[str]) -> pa.Table:
    """Sequence rows -> one row per catalog item holding one event: the item's first stored event (its text,
    category, service and time), in catalog order; the encoder's item vector of that event is the item's.

    Raises:
        ItemScorerError: a catalog item that no row holds (the first one is named).
    """
    items = rows.column("item_id").combine_chunks()
    flat_items = items.flatten()
    idx = pc.index_in(flat_items, value_set=pa.array(catalog, flat_items.type)).fill_null(-1).to_numpy(zero_copy_only=False)
    idx = idx.astype(np.int64)
    first = np.full(len(catalog), -1, np.int64)
    where = np.flatnonzero(idx >= 0)
    seen, pos = np.unique(idx[where], return_index=True)
    first[seen] = where[pos]
    if (first < 0).any():
        raise ItemScorerError(f"catalog item {catalog[int(np.flatnonzero(first < 0)[0])]!r} is in no sequence row")
    take = pa.array(first, pa.int64())
    offsets = pa.array(np.arange(len(catalog) + 1, dtype=np.int32))
    out = {"user_id": pa.array(catalog, pa.string()), "n_events": pa.array(np.ones(len(catalog), np.int64))}
    for name in ITEM_COLUMNS:
        if name in rows.column_names:
            values = rows.column(name).combine_chunks().flatten().take(take)
            out[name] = pa.ListArray.from_arrays(offsets, values)
    return pa.table(out)


class ItemScorer:
    """A frozen encoder's objective head over a fixed catalog: ``scores(z)`` -> (n, n_items) logits.

    Args:
        model_dir: an exported model folder with a ``future``/``next`` head.
        rows: sequence rows holding every catalog item (e.g. ``read_sequences(data)``).
        catalog: item ids, in the order of the score columns.
        vectors_dir: the MiniLM vector cache (an encoder with ``item_encoder="minilm"``; see
            :func:`userfm.infer.embed.minilm_vectors`), else None.
        batch_size: catalog items per forward.
    """

    def __init__(self, model_dir: str | Path, rows: pa.Table, catalog: list[str], vectors_dir: str | None = None,
                 batch_size: int = 4096):
        import torch
        import torch.nn.functional as F
        from safetensors.torch import load_file

        import userfm
        from userfm.models.features import make_batch, to_torch
        from userfm.objectives.pretext import ObjectiveConfig, add_vectors, build_head

        d = Path(model_dir)
        if not has_item_scorer(d):
            raise ItemScorerError(f"{d}: no future/next objective head (head.safetensors + objective.json); only models "
                                  f"pretrained with objective future or next and exported by this version have one")
        self.model, vocabs, tok = userfm.load_encoder(d)
        ocfg = ObjectiveConfig(**json.loads((d / "objective.json").read_text()))
        enc = self.model.config
        if ocfg.objective == "next" and enc.out_dim and enc.out_dim != enc.d_model:
            raise ItemScorerError(f"{d}: a next encoder with an output layer (out_dim {enc.out_dim}): its embedding is not "
                                  f"the state its head reads")
        self.head = build_head(ocfg, enc)
        self.head.load_state_dict(load_file(str(d / "head.safetensors")))
        self.head.eval()
        self.objective = ocfg.objective
        vectors = None
        if vectors_dir:
            from userfm.models.minilm import VectorCache

            vectors = VectorCache.load(vectors_dir)
        events = catalog_events(rows, catalog)
        parts = []
        with torch.no_grad():
            for lo in range(0, events.num_rows, batch_size):
                nb = add_vectors(make_batch(events.slice(lo, batch_size), vocabs, tok, max_events=1), vectors)
                parts.append(F.normalize(self.model.item_vectors(to_torch(nb))[:, 0], dim=-1))
            self.items = torch.cat(parts) if parts else torch.zeros(0, enc.d_model)  # (n_items, d_model), unit rows
            self.temperature = float(self.head.temperature())

    def scores(self, z: np.ndarray) -> np.ndarray:
        """(n, embed_dim) frozen user embeddings -> (n, n_items) float32: cos(head(z), item) / temperature."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            u = F.normalize(self.head(torch.as_tensor(np.asarray(z, np.float32))), dim=-1)
            return (u @ self.items.T / self.temperature).numpy()
