"""Multi-task pretraining (userfm.objectives.multitask): the weighted sum by hand, the pairs stacked as histories,
each objective's step inputs under its own prefix, the summed pretext loss against its parts computed alone,
and a two-worker Ray Train run of clue+future whose logged loss is the weighted sum of its logged parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from userfm.objectives.multitask import objective_parts, stack_views, sub_batch, weighted_sum
from userfm.train.pretrain_config import PretrainConfig


def test_weighted_sum_by_hand():
    losses = torch.tensor([2.0, 3.0, 0.5])
    assert float(weighted_sum(losses)) == 5.5
    assert float(weighted_sum(losses, (1.0, 0.5, 4.0))) == 2.0 + 1.5 + 2.0
    with pytest.raises(ValueError, match="3 objectives but 2 weights"):
        weighted_sum(losses, (1.0, 2.0))
    assert objective_parts("clue+future") == ("clue", "future") and objective_parts("next") == ("next",)
    assert sub_batch({"clue/a.length": 1, "future/a.length": 2, "clue/b.x": 3}, "clue") == {"a.length": 1, "b.x": 3}


def test_stack_views_by_hand():
    pairs = {"a.length": np.array([2, 1]), "b.length": np.array([1, 3]), "pair_kind": np.array([1, 0]),
             "a.text_hash": np.array([[5, 6], [7, 0]]), "b.text_hash": np.array([[8, 0, 0], [9, 10, 11]])}
    out = stack_views(pairs)
    assert set(out) == {"length", "text_hash"}  # pair_kind is a per-pair array: dropped
    assert out["length"].tolist() == [2, 1, 1, 3]
    assert out["text_hash"].tolist() == [[5, 6, 0], [7, 0, 0], [8, 0, 0], [9, 10, 11]]
    with pytest.raises(ValueError, match="different keys"):
        stack_views({"a.length": np.array([1]), "a.time": np.zeros((1, 1)), "b.length": np.array([1])})


def test_config_spellings_and_errors():
    assert PretrainConfig(objective=["clue", "future"]).objective == "clue+future"  # a YAML list
    assert PretrainConfig(objective="clue,future").objective == "clue+future"  # --set objective=clue,future
    assert PretrainConfig(objective="future+clue", objective_weights=[1, 0.5]).objective_weights == (1.0, 0.5)
    with pytest.raises(ValueError, match="sum of distinct ones"):
        PretrainConfig(objective="clue+fture")
    with pytest.raises(ValueError, match="sum of distinct ones"):
        PretrainConfig(objective="clue+clue")
    with pytest.raises(ValueError, match="objective_weights must be 2 numbers"):
        PretrainConfig(objective="clue+future", objective_weights=(1.0,))
    with pytest.raises(ValueError, match="needs pooling 'last'"):
        PretrainConfig(objective="clue+next")
    assert PretrainConfig(objective="clue+next", pooling="last").objective == "clue+next"
    with pytest.raises(ValueError, match="GradCache"):
        PretrainConfig(objective="clue+future", mini_batch_size=8)


def test_config_from_yaml_list_and_set(tmp_path):
    from userfm.config import load_config

    (tmp_path / "p.yaml").write_text("objective: [clue, future]\nobjective_weights: [1.0, 0.25]\n")
    cfg = load_config(PretrainConfig, tmp_path / "p.yaml")
    assert (cfg.objective, cfg.objective_weights) == ("clue+future", (1.0, 0.25))
    assert load_config(PretrainConfig, None, ["objective=future+masked-item"]).objective == "future+masked-item"


def _pairs():
    th_a = np.array([[11, 12, 13, 0], [21, 22, 0, 0], [31, 0, 0, 0]], np.int64)
    th_b = np.array([[14, 15, 0, 0], [23, 24, 25, 26], [32, 33, 0, 0]], np.int64)
    out = {"pair_kind": np.array([1, 0, 1])}
    for v, th in (("a", th_a), ("b", th_b)):
        out.update({f"{v}.service": (th > 0).astype(np.int64), f"{v}.text_hash": th, f"{v}.item_hash": th,
                    f"{v}.category": np.repeat(th[..., None] % 7 + (th[..., None] > 0), 4, -1),
                    f"{v}.time": np.repeat(th[..., None] % 4 + (th[..., None] > 0), 5, -1),
                    f"{v}.ts": th * 100, f"{v}.length": (th > 0).sum(1)})
    return out


def test_step_inputs_put_each_objective_under_its_prefix():
    """clue+future: clue's pairs as clue alone draws them, then future's cut of the stacked views drawn from
    the same generator; future+mlm (no clue): both read the rows as histories."""
    from userfm.objectives.future import future_views
    from userfm.objectives.pretext import crop_views, mask_events
    from userfm.train.steps import step_inputs

    nb = _pairs()
    cfg = PretrainConfig(objective="clue+future", clue_crop=0.5, future_window=2)
    got = step_inputs(nb, cfg, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    want = {**{f"clue/{k}": v for k, v in crop_views(nb, 0.5, rng).items()},
            **{f"future/{k}": v for k, v in future_views(stack_views(nb), 2, rng).items()}}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["future/a.length"].shape == (6,)  # 3 pairs -> 6 histories

    hist = stack_views(nb)
    got = step_inputs(hist, PretrainConfig(objective="future+mlm", future_window=2), np.random.default_rng(3))
    rng = np.random.default_rng(3)
    want = {**{f"future/{k}": v for k, v in future_views(hist, 2, rng).items()},
            **{f"mlm/{k}": v for k, v in mask_events(hist, 0.15, rng).items()}}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_summed_pretext_loss_is_the_weighted_sum_of_each_alone():
    from userfm.models.encoders import EncoderConfig, UserEncoder
    from userfm.models.features import trim_events
    from userfm.objectives.multitask import MultiTaskHead
    from userfm.objectives.pretext import ObjectiveConfig, build_head, pretext_loss
    from userfm.train.steps import step_inputs

    torch.manual_seed(0)
    enc = UserEncoder(EncoderConfig(d_model=16, n_heads=2, d_ff=32, n_layers=1, max_events=8, dropout=0.0,
                                    item_id_buckets=64)).eval()
    nb = trim_events(step_inputs(_pairs(), PretrainConfig(objective="clue+future", future_window=2), np.random.default_rng(0)))
    batch = {k: torch.as_tensor(v) for k, v in nb.items()}
    cfg = ObjectiveConfig("clue+future", temperature=0.2, weights=(1.0, 0.25))
    head = build_head(cfg, enc.config)
    assert isinstance(head, MultiTaskHead) and set(head.heads) == {"clue", "future"}
    loss, metrics = pretext_loss(enc, head, batch, cfg)
    clue, _ = pretext_loss(enc, head["clue"], sub_batch(batch, "clue"), ObjectiveConfig("clue", temperature=0.2))
    fut, _ = pretext_loss(enc, head["future"], sub_batch(batch, "future"), ObjectiveConfig("future", temperature=0.2))
    assert float(loss.detach()) == pytest.approx(float(clue.detach()) + 0.25 * float(fut.detach()), rel=1e-6)
    assert metrics["clue/loss"] == pytest.approx(float(clue.detach()), rel=1e-6)
    assert metrics["future/loss"] == pytest.approx(float(fut.detach()), rel=1e-6)
    assert {"clue/temperature", "future/temperature", "clue/top1", "future/top1"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())  # both heads are trained by the one backward
    with pytest.raises(ValueError, match="GradCache"):
        ObjectiveConfig("clue+future", mini_batch_size=4)


@pytest.mark.timeout(600)
def test_two_worker_clue_plus_future_run_logs_the_weighted_sum_and_exports_the_future_head(tmp_path, ray_local):
    """DDP over 2 CPU workers with two forwards per backward; model/ carries the future head as an item scorer."""
    from userfm.data.dataset import read_sequences
    from userfm.data.ingest import IngestConfig, run_ingest
    from userfm.data.synth import generate
    from userfm.data.synth_model import SynthConfig
    from userfm.infer.item_scorer import ItemScorer, has_item_scorer
    from userfm.train.pretrain import run_pretrain

    generate(SynthConfig(n_users=300, events_per_user=12, seed=5), tmp_path / "raw")
    run_ingest(IngestConfig(inputs=(str(tmp_path / "raw" / "events"),), out=str(tmp_path / "ds")), progress=lambda s: None)
    cfg = PretrainConfig(data=str(tmp_path / "ds"), out=str(tmp_path / "run"), objective=("clue", "future"),
                         objective_weights=(1.0, 0.5), size="tiny", max_events=16, max_text_tokens=8, text_vocab=256,
                         batch_size=16, lr=3e-3, warmup_steps=2, max_steps=6, log_every=2, eval_every=3,
                         checkpoint_every=100, num_workers=2, peak_flops=1e10, cooc_dim=8, item_id_buckets=64)
    summary = run_pretrain(cfg, progress=lambda s: None)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3, 4, 6] and summary["final"]["step"] == 6
    for r in logged:  # each row: window means, and the mean of a weighted sum is the weighted sum of the means
        assert r["loss"] == pytest.approx(r["clue/loss"] + 0.5 * r["future/loss"], rel=1e-5)
        assert r["clue/loss"] > 0 and r["future/loss"] > 0
    assert all(np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    model = Path(summary["model"])
    assert json.loads((model / "objective.json").read_text())["objective"] == "future" and has_item_scorer(model)
    rows_tab = read_sequences(cfg.data, split="train")
    catalog = sorted({i for seq in rows_tab.column("item_id").to_pylist()[:20] for i in (seq or []) if i})[:5]
    scorer = ItemScorer(model, rows_tab, catalog)
    assert scorer.scores(np.zeros((2, scorer.model.config.embed_dim), np.float32)).shape == (2, len(catalog))


def test_demo_pretrains_a_sum_with_each_parts_choices(tmp_path):
    from userfm.demo import FUTURE_ITEM_BUCKETS, DemoConfig, pretrain_config

    cfg = DemoConfig(objectives=("clue+next", "future"))
    p = pretrain_config(cfg, "clue+next", tmp_path / "ds", tmp_path / "out")
    assert (p.objective, p.pooling, p.item_id_buckets) == ("clue+next", "last", FUTURE_ITEM_BUCKETS)
    p = pretrain_config(cfg, "clue", tmp_path / "ds", tmp_path / "out")
    assert (p.pooling, p.item_id_buckets) == ("mean", 0)
    with pytest.raises(ValueError, match=r"objectives: unknown \['clue\+fture'\]"):
        DemoConfig(objectives=("clue+fture",))
