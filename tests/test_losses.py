"""Losses against hand-computed values; gathered (2-process gloo) == single-process; GradCache == plain."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from userfm.objectives.losses import Temperature, gather_with_grad, grad_cache, info_nce, nt_xent, symmetric_info_nce

# Unit vectors, so normalisation is a no-op and the logits below are exact dot products.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
K = torch.tensor([[0.6, 0.8], [0.0, 1.0]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_info_nce_2x2_by_hand():
    # t = 0.5: row 0 logits [1.2, 0.0] (positive 1.2); row 1 logits [1.6, 2.0] (positive 2.0).
    # -log(e^p / sum e^l) for two logits = log(1 + e^(other - p)).
    expected = (softplus(0.0 - 1.2) + softplus(1.6 - 2.0)) / 2
    assert info_nce(Q, K, 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.388151, abs=1e-5)


def test_info_nce_offset_picks_the_rank_slice():
    # Query row 0 is K[1]'s pair when offset = 1 (the second rank's rows in a global batch).
    q = torch.tensor([[0.0, 1.0]])
    expected = softplus(0.8 * 2 - 1.0 * 2)  # logits [1.6, 2.0], positive is index 1
    assert info_nce(q, K, 0.5, offset=1).item() == pytest.approx(expected, abs=1e-6)


def test_symmetric_info_nce_is_average_of_both_directions_and_by_hand():
    a_to_b = (softplus(0.0 - 1.2) + softplus(1.6 - 2.0)) / 2
    # b -> a: row 0 = K0 vs [Q0, Q1]: logits [1.2, 1.6], positive 1.2; row 1 = K1: logits [0, 2], positive 2.
    b_to_a = (softplus(1.6 - 1.2) + softplus(0.0 - 2.0)) / 2
    got = symmetric_info_nce(Q, K, 0.5).item()
    assert got == pytest.approx((a_to_b + b_to_a) / 2, abs=1e-6)
    assert got == pytest.approx(0.5 * (info_nce(Q, K, 0.5) + info_nce(K, Q, 0.5)).item(), abs=1e-7)
    assert got != pytest.approx(a_to_b, abs=1e-3)  # the two directions really differ here


def test_nt_xent_2_users_by_hand():
    z1, z2 = Q, K
    # keys [z1_0, z1_1, z2_0, z2_1]; each row drops itself, positive is the other view of its user.
    rows = [
        -0.6 + math.log(math.exp(0.0) + math.exp(0.6) + math.exp(0.0)),  # z1_0: [0, .6, 0]
        -1.0 + math.log(math.exp(0.0) + math.exp(0.8) + math.exp(1.0)),  # z1_1: [0, .8, 1]
        -0.6 + math.log(math.exp(0.6) + math.exp(0.8) + math.exp(0.8)),  # z2_0: [.6, .8, .8]
        -1.0 + math.log(math.exp(0.0) + math.exp(1.0) + math.exp(0.8)),  # z2_1: [0, 1, .8]
    ]
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx(sum(rows) / 4, abs=1e-6)


def test_info_nce_3x3_normalises_inputs():
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])
    s = 1 / math.sqrt(2)
    # cosine logits (t = 1): rows [1, 0, -s], [0, 1, -s], [s, s, -1]; positives on the diagonal.
    rows = [
        -1 + math.log(math.e + 1 + math.exp(-s)),
        -1 + math.log(1 + math.e + math.exp(-s)),
        1 + math.log(2 * math.exp(s) + math.exp(-1)),
    ]
    assert info_nce(q, k, 1.0).item() == pytest.approx(sum(rows) / 3, abs=1e-6)


def test_temperature_fixed_and_learnable():
    t = Temperature(0.05)
    assert t().item() == pytest.approx(0.05)
    assert not list(t.parameters())
    lt = Temperature(0.1, learnable=True, min_temperature=0.02)
    assert [p.shape for p in lt.parameters()] == [torch.Size([])]
    loss = info_nce(Q, K, lt())
    loss.backward()
    assert lt.log_scale.grad is not None and lt.log_scale.grad.abs().item() > 0
    with torch.no_grad():
        lt.log_scale.fill_(10.0)  # 1/t = e^10 -> clamped at t = 0.02
    assert lt().item() == pytest.approx(0.02)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    y, offset = gather_with_grad(x)
    assert y is x and offset == 0


# --------------------------------------------------------------------------------------------------
# 2-process gloo group == single process on the concatenated batch (loss and gradients).
# --------------------------------------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)


SPLITS = {"equal": [(0, 2), (2, 4)], "unequal": [(0, 3), (3, 5)]}


def _losses(model, temp, a, b, global_mean):
    za, zb = model(a), model(b)
    return {
        "clue": symmetric_info_nce(za, zb, temp(), global_mean=global_mean),
        "simclr": nt_xent(za, zb, temp(), global_mean=global_mean),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a_full, b_full = _data()
        out = {}
        for split, bounds in SPLITS.items():
            lo, hi = bounds[rank]
            for name in ("clue", "simclr"):
                model, temp = _tiny_model(), Temperature(0.2, learnable=True)
                loss = _losses(model, temp, a_full[lo:hi], b_full[lo:hi], split == "unequal")[name]
                loss.backward()
                # What DDP does: average parameter gradients (and the loss we report) over ranks.
                params = list(model.parameters()) + list(temp.parameters())
                for p in params:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
                reported = loss.detach().clone()
                torch.distributed.all_reduce(reported)
                out[f"{split}.{name}.loss"] = (reported / world).numpy()
                for i, p in enumerate(params):
                    out[f"{split}.{name}.grad{i}"] = p.grad.numpy()
            # GradCache across ranks: mini-batches of 1 row, the loss gathers inside loss_fn.
            model, temp = _tiny_model(), Temperature(0.2)
            loss = grad_cache(
                model, [a_full[lo:hi], b_full[lo:hi]],
                lambda za, zb: symmetric_info_nce(za, zb, temp(), global_mean=split == "unequal"), 1,
            )
            out[f"{split}.cached.loss"] = loss.numpy()
            for i, p in enumerate(model.parameters()):
                torch.distributed.all_reduce(p.grad)
                out[f"{split}.cached.grad{i}"] = (p.grad / world).numpy()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    ctx = mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    import time

    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers timed out")
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    a, b = _data()
    for split in SPLITS:
        for name in ("clue", "simclr"):
            model, temp = _tiny_model(), Temperature(0.2, learnable=True)
            loss = _losses(model, temp, a[:4] if split == "equal" else a, b[:4] if split == "equal" else b, False)[name]
            loss.backward()
            params = list(model.parameters()) + list(temp.parameters())
            for r in range(2):
                assert ranks[r][f"{split}.{name}.loss"] == pytest.approx(loss.item(), abs=1e-6), (split, name)
                for i, p in enumerate(params):
                    np.testing.assert_allclose(ranks[r][f"{split}.{name}.grad{i}"], p.grad.numpy(), atol=1e-6)
        model = _tiny_model()
        loss = symmetric_info_nce(*(model(x[:4] if split == "equal" else x) for x in (a, b)), 0.2)
        loss.backward()
        for r in range(2):
            for i, p in enumerate(model.parameters()):
                np.testing.assert_allclose(ranks[r][f"{split}.cached.grad{i}"], p.grad.numpy(), atol=1e-6)
    # Sanity: the gathered loss is not the local-only loss (negatives really crossed ranks).
    model, temp = _tiny_model(), Temperature(0.2, learnable=True)
    local = _losses(model, temp, a[:2], b[:2], False)["clue"].item()
    assert ranks[0]["equal.clue.loss"] != pytest.approx(local, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# GradCache == plain loss, dropout on.
# --------------------------------------------------------------------------------------------------


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, batch):
        x = batch["x"] if isinstance(batch, dict) else batch
        return self.net(x)


@pytest.mark.parametrize("mini_batch_size", [1, 3, 8])
@pytest.mark.parametrize("loss_name", ["clue", "simclr"])
def test_grad_cache_matches_plain_with_dropout(mini_batch_size, loss_name):
    g = torch.Generator().manual_seed(2)
    views = [{"x": torch.randn(8, 4, generator=g)}, {"x": torch.randn(8, 4, generator=g)}]

    def run(cached: bool, seed: int):
        model, temp = _DropoutNet(), Temperature(0.1, learnable=True)
        model.train()

        def loss_fn(za, zb):
            return (symmetric_info_nce if loss_name == "clue" else nt_xent)(za, zb, temp())

        torch.manual_seed(seed)
        if cached:
            loss = grad_cache(model, views, loss_fn, mini_batch_size)
        else:
            # Same mini-batch order as GradCache's step 1, so the same dropout masks are drawn.
            embs = [
                torch.cat([model({"x": v["x"][i : i + mini_batch_size]}) for i in range(0, 8, mini_batch_size)])
                for v in views
            ]
            loss = loss_fn(*embs)
            loss.backward()
        grads = [p.grad.clone() for p in list(model.parameters()) + list(temp.parameters())]
        return loss.item(), grads, torch.rand(1).item()

    plain_loss, plain_grads, plain_next = run(False, 123)
    cached_loss, cached_grads, cached_next = run(True, 123)
    assert cached_loss == pytest.approx(plain_loss, abs=1e-6)
    for gp, gc in zip(plain_grads, cached_grads):
        torch.testing.assert_close(gc, gp, atol=1e-6, rtol=1e-5)
    # The random stream after GradCache is where the plain run leaves it (replays do not consume it).
    assert cached_next == plain_next
    # Not vacuous: dropout is on, so another seed gives another loss.
    other_loss, _, _ = run(True, 321)
    assert other_loss != pytest.approx(plain_loss, abs=1e-4)


def test_grad_cache_no_sync_used_for_all_but_last():
    calls = []

    class Ctx:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *a):
            return False

    model = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    grad_cache(model, [x, x + 1], lambda a, b: symmetric_info_nce(a, b, 0.1), 2, no_sync=Ctx)
    assert calls == ["enter"] * 5  # 2 views x 3 mini-batches = 6 backwards; the last one syncs
