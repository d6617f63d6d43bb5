"""Multi-task pretraining (userfm.objectives.multitask): the weighted sum by hand, the pairs stacked as histories,
each objective's step inputs under its own prefix, the summed pretext loss against its parts computed alone.
A two-worker Ray Train run of clue+future (its logged loss the weighted sum of its logged parts, its export the
future head) is test_pretrain.py's test_epoch_budget_and_early_stop_export_the_best."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from userfm.objectives import objective_parts
from userfm.objectives.multitask import stack_views, sub_batch, weighted_sum
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


def test_demo_pretrains_a_sum_with_each_parts_choices(tmp_path):
    from userfm.demo import FUTURE_ITEM_BUCKETS, DemoConfig, pretrain_config

    cfg = DemoConfig(objectives=("clue+next", "future"))
    p = pretrain_config(cfg, "clue+next", tmp_path / "ds", tmp_path / "out")
    assert (p.objective, p.pooling, p.item_id_buckets) == ("clue+next", "last", FUTURE_ITEM_BUCKETS)
    p = pretrain_config(cfg, "clue", tmp_path / "ds", tmp_path / "out")
    assert (p.pooling, p.item_id_buckets) == ("mean", 0)
    with pytest.raises(ValueError, match=r"objectives: unknown \['clue\+fture'\]"):
        DemoConfig(objectives=("clue+fture",))
