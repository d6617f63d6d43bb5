"""The objective's own item scorer (userfm.infer.item_scorer): the head is kept through save_best -> export, and
the scores equal cos(head(z), item vector of the item's first event) / temperature computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from seqrows import all_scope, event_rows, table
from userfm.infer.item_scorer import ItemScorer, ItemScorerError, catalog_events, has_item_scorer

pytestmark = pytest.mark.timeout(120)


def _rows() -> pa.Table:
    return all_scope(table(event_rows(n_users=8, seed=3)))


def test_catalog_events_is_each_items_first_event_by_hand():
    rows = _rows()
    first: dict[str, dict] = {}
    for r in rows.to_pylist():
        for k in range(r["n_events"]):
            first.setdefault(r["item_id"][k], {c: r[c][k] for c in ("ts", "service", "text", "category", "value")})
    catalog = sorted(first)[::-1]  # any order: the rows follow it
    got = catalog_events(rows, catalog).to_pylist()
    assert [g["user_id"] for g in got] == catalog and all(g["n_events"] == 1 and g["item_id"] == [g["user_id"]] for g in got)
    for g in got:
        want = first[g["user_id"]]
        assert {c: g[c] for c in want} == {c: [v] for c, v in want.items()}
    with pytest.raises(ItemScorerError, match="'nope' is in no sequence row"):
        catalog_events(rows, [catalog[0], "nope"])


def _export(tmp_path, objective: str, pooling: str, item_key: str = "item_id"):
    """A tiny encoder + its objective head through the pretraining path (save_best -> export)."""
    from userfm.models.encoders import UserEncoder, config_for
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.models.tokenizer import TextTokenizer
    from userfm.objectives.pretext import build_head
    from userfm.train.pretrain import export
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import _objective_config, save_best

    rows = _rows()
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=16, max_text_tokens=8))
    tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=200)
    torch.manual_seed(0)
    enc_cfg = config_for("tiny", vocabs, tok, item_encoder="text", item_id_buckets=97, pooling=pooling,
                         causal=objective == "next", item_key=item_key)
    model = UserEncoder(enc_cfg).eval()
    cfg = PretrainConfig(objective=objective, pooling=pooling, temperature=0.2, time_fields=("hour",))
    head = build_head(_objective_config(cfg), enc_cfg)
    if objective != "clue":
        torch.nn.init.normal_(head.projection.weight)  # not near-identity: a wrong map would show
    save_best(tmp_path / "best", model, 7, 1.0, cfg, enc_cfg.to_json(), head)
    export(tmp_path / "best", tmp_path / "model", vocabs, tok)
    return rows, model, head, vocabs, tok


@pytest.mark.parametrize("objective,pooling,item_key", [("future", "mean", "item_id"), ("next", "last", "item_id"),
                                                       ("future", "mean", "text")])
def test_scores_equal_the_head_and_item_vectors_by_hand(tmp_path, objective, pooling, item_key):
    from userfm.models.features import make_batch, to_torch

    rows, model, head, vocabs, tok = _export(tmp_path, objective, pooling, item_key)
    assert has_item_scorer(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "objective.json").read_text())["objective"] == objective
    catalog = sorted({i for lst in rows.column("item_id").to_pylist() for i in lst})
    scorer = ItemScorer(tmp_path / "model", rows, catalog, batch_size=5)  # several catalog batches
    with torch.no_grad():
        z = model(to_torch(make_batch(rows, vocabs, tok))).numpy()  # (8, d): what `userfm embed` writes
    got = scorer.scores(z)
    assert got.shape == (rows.num_rows, len(catalog))
    firsts = catalog_events(rows, catalog).to_pylist()
    with torch.no_grad():
        u = head.projection(torch.as_tensor(z))
        for j, ev in enumerate(firsts):  # each item's vector from its own one-event batch
            one = {"user_id": ["x"], "n_events": [1], **{c: [ev[c]] for c in ("ts", "service", "text", "item_id", "category", "value")}}
            v = model.item_vectors(to_torch(make_batch(pa.table(one), vocabs, tok)))[0, 0]
            want = (u @ v / (u.norm(dim=1) * v.norm())).numpy() / 0.2
            np.testing.assert_allclose(got[:, j], want, rtol=1e-4, atol=1e-4)


def test_contrastive_models_have_no_item_scorer(tmp_path):
    rows, *_ = _export(tmp_path, "clue", "mean")
    assert (tmp_path / "model" / "head.safetensors").exists()  # CLUE's head is kept too (its projection)
    assert not has_item_scorer(tmp_path / "model")
    with pytest.raises(ItemScorerError, match="no future/next objective head"):
        ItemScorer(tmp_path / "model", rows, ["i1"])


def test_evaluate_adds_the_own_head_row_of_a_future_table_and_its_hr_by_hand(tmp_path, ray_local):
    """``userfm evaluate`` on a next-item task: the table a future encoder made gets a ``<table>/own-head`` row
    whose HR@10 is the scorer's, by hand; a table with no model behind it gets none."""
    from userfm.data.dataset import read_sequences
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.eval import metrics as M
    from userfm.eval.embeddings import load_embeddings
    from userfm.eval.evaluate import run_evaluate
    from userfm.eval.task_data import task_data, user_table
    from userfm.eval.tasks import EvalConfig, TaskConfig
    from userfm.infer.embed import EmbedConfig, run_embed
    from userfm.models.encoders import UserEncoder, config_for
    from userfm.models.features import FeatureConfig, fit_vocabs
    from userfm.models.tokenizer import TextTokenizer
    from userfm.objectives.pretext import build_head
    from userfm.train.pretrain import export
    from userfm.train.pretrain_config import PretrainConfig
    from userfm.train.steps import _objective_config, save_best

    generate(SynthConfig(n_users=300, events_per_user=12, seed=4), tmp_path / "raw")
    run_ingest(IngestConfig(inputs=(str(tmp_path / "raw" / "events"),), out=str(tmp_path / "ds")), progress=lambda s: None)
    rows = read_sequences(tmp_path / "ds")
    vocabs = fit_vocabs(rows, FeatureConfig(max_events=16, max_text_tokens=8))
    tok = TextTokenizer.fit([t for lst in rows.column("text").to_pylist() for t in lst], vocab_size=300)
    torch.manual_seed(0)
    enc_cfg = config_for("tiny", vocabs, tok, item_encoder="text", item_id_buckets=257, item_key="item_id")
    cfg = PretrainConfig(objective="future", temperature=0.1, time_fields=("hour",))
    head = build_head(_objective_config(cfg), enc_cfg)
    encoder = UserEncoder(enc_cfg).eval()
    save_best(tmp_path / "best", encoder, 1, 1.0, cfg, enc_cfg.to_json(), head)
    model = export(tmp_path / "best", tmp_path / "future" / "model", vocabs, tok)
    run_embed(EmbedConfig(model=str(model), data=str(tmp_path / "ds"), out=str(tmp_path / "emb"), holdout_last=1),
              progress=lambda s: None)
    other = tmp_path / "copy.parquet"  # the same vectors with no embed manifest beside them: no model, no own head
    pa.parquet.write_table(pa.parquet.read_table(tmp_path / "emb" / "embeddings"), other)
    # untrained weights would hit nothing in a 575-item catalog: aim the head's bias at the test users' five most
    # common next items, at 3x the scale of the projected embeddings, so HR@10 is neither 0 nor 1
    task = TaskConfig(name="nxt", table="last_event", target="item_id", type="retrieval")
    td = task_data(tmp_path / "ds", task, user_table(tmp_path / "ds"))
    z = load_embeddings(tmp_path / "emb").lookup(td.ids["test"])
    common = torch.as_tensor(np.bincount(td.y["test"]).argsort()[::-1][:5].copy())
    items = ItemScorer(model, rows, td.classes).items
    with torch.no_grad():
        scale = float(head.projection(torch.as_tensor(z)).norm(dim=1).median())
        head.projection.bias.copy_(3 * scale * torch.nn.functional.normalize(items[common].sum(0), dim=0))
    save_best(tmp_path / "best", encoder, 1, 1.0, cfg, enc_cfg.to_json(), head)  # the same encoder: its digest is checked
    export(tmp_path / "best", model, vocabs, tok)
    (tmp_path / "tasks.yaml").write_text("- {name: nxt, table: last_event, target: item_id, type: retrieval}\n")
    res = run_evaluate(EvalConfig(data=str(tmp_path / "ds"), embeddings={"fut": str(tmp_path / "emb"), "plain": str(other)},
                                  tasks=str(tmp_path / "tasks.yaml"), out=str(tmp_path / "ev"), heads=("logreg",),
                                  baselines=("popularity",), seeds=1, bootstrap_samples=20, mlp_max_epochs=2),
                       progress=lambda s: None)
    models = [r["model"] for r in res["rows"]]
    assert "fut/own-head" in models and "plain/own-head" not in models and "fut/logreg" in models
    scorer = ItemScorer(model, rows, td.classes)
    want = M.hit_rate_at_k(M.target_rank(scorer.scores(z), td.y["test"]), 10)
    row = next(r for r in res["rows"] if r["model"] == "fut/own-head")
    assert 0.05 < want < 0.95 and row["test"]["value"] == pytest.approx(want, abs=1e-6) and row["head"] == "own-head"
    # two tables: a val-chosen row, its val HR@10s by hand (own head: the scorer; logreg: the saved head), and
    # the test ranks of the best of them (the two logreg rows read the same vectors: the tie keeps fut's)
    from userfm.eval.heads import load_head

    by = {r["model"]: r for r in res["rows"]}
    picked = by["val-chosen"]["val_chosen"]
    z_val = load_embeddings(tmp_path / "emb").lookup(td.ids["val"])
    lr = load_head(tmp_path / "ev" / by["fut/logreg"]["heads"][0])
    for model, scores in (("fut/own-head", scorer.scores(z_val)), ("fut/logreg", lr.logits(z_val))):
        assert picked["val"][model] == [pytest.approx(M.hit_rate_at_k(M.target_rank(scores, td.y["val"]), 10), abs=1e-6)]
    assert picked["val"]["plain/logreg"] == picked["val"]["fut/logreg"]
    best = max(picked["val"], key=lambda m: picked["val"][m][0])
    assert picked["chosen"] == [best] and best != "plain/logreg"
    assert by["val-chosen"]["per_seed"] == by[best]["per_seed"]
