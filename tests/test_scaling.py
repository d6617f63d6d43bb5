"""Scaling-law arithmetic: FLOPs hand count, power-law fits on synthetic points, the compute frontier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from userfm.models.encoders import EncoderConfig, UserEncoder, expected_num_params, flops_per_sample
from userfm.train.scaling import PF_DAY, best_per_group, compute_frontier, correlation, fit_power_law, pf_days

# d 4, f 8, one user layer + one item layer, 2 events of 3 tokens, 2-d output projection
_CFG = EncoderConfig(item_encoder="text", d_model=4, n_layers=1, n_heads=1, d_ff=8, dropout=0.0, max_events=2,
                     text_vocab=10, max_text_tokens=3, item_layers=1, out_dim=2, n_services=3, time_sizes=(5,))


def test_flops_per_sample_by_hand_for_a_tiny_transformer():
    # one layer: attention 4*d^2 + 4d, FFN 2df + f + d, two LayerNorms 4d -> 64 + 16 + 64 + 8 + 4 + 16 = 172
    layer = 4 * 16 + 4 * 4 + 2 * 4 * 8 + 8 + 4 + 4 * 4
    assert layer == 172
    # user transformer, T = 2 events + [CLS] = 3 tokens: 2 * 172 * 3 + attention 2 * 1 * 3^2 * 4 = 1032 + 72
    user = 2 * layer * 3 + 2 * 1 * 3 * 3 * 4
    # item transformer per event, K = 3 tokens: the same shape, 1104; two events -> 2208
    item = 2 * (2 * layer * 3 + 2 * 1 * 3 * 3 * 4)
    out = 2 * 4 * 2  # Linear(4 -> 2)
    assert user + item + out == 3328
    assert flops_per_sample(_CFG, n_events=2, n_tokens=3, training=False) == 3328
    assert flops_per_sample(_CFG, n_events=2, n_tokens=3) == 3 * 3328  # backward = 2 x forward
    # non-embedding parameters: 2 layers + 2 final LayerNorms + projection = 344 + 16 + 10
    assert expected_num_params(_CFG, non_embedding=True) == 370


def test_flops_formula_matches_torchs_count_of_the_dense_matmuls():
    """torch's FlopCounterMode counts every Linear matmul of a real forward pass; the formula's remaining
    terms (2 FLOPs per bias/LayerNorm weight, attention scores) are the hand-counted part above."""
    torch.manual_seed(0)
    model = UserEncoder(_CFG).train()  # train mode: the path pretraining runs (dropout is 0)
    batch = {
        "length": torch.tensor([2]),
        "service": torch.tensor([[1, 2]]),
        "time": torch.ones(1, 2, 1, dtype=torch.long),
        "tokens": torch.tensor([[[1, 4, 5], [1, 6, 7]]]),  # no padding tokens: every position is computed
    }
    with FlopCounterMode(display=False) as counter:
        model(batch)
    d, f, t, k = 4, 8, 3, 3
    bias_and_norm = 2 * (9 * d + f) * (t + 2 * k)  # one user layer over T tokens, one item layer over 2 x K
    attention = 2 * t * t * d + 2 * (2 * k * k * d)
    expected = flops_per_sample(_CFG, n_events=2, n_tokens=3, training=False) - bias_and_norm - attention
    assert counter.get_total_flops() == expected == 2 * (4 * d * d + 2 * d * f) * (t + 2 * k) + 2 * d * 2


def test_pf_days():
    assert PF_DAY == 8.64e19
    assert pf_days(8.64e19) == 1.0
    assert pf_days(np.array([4.32e19])).tolist() == [0.5]


def test_power_law_exact_points():
    x = np.geomspace(1e-9, 1e-5, 6)
    fit = fit_power_law(x, 3.0 * x ** -0.05)
    assert fit.b == pytest.approx(0.05, abs=1e-12)
    assert fit.a == pytest.approx(3.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.b_err == pytest.approx(0.0, abs=1e-9)
    assert fit.predict(np.array([1e-7])) == pytest.approx([3.0 * 1e-7 ** -0.05])


def test_power_law_recovers_exponent_from_noisy_points():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e-10, 1e-6, 25)
    y = 2.0 * x ** -0.076 * np.exp(rng.normal(0, 0.02, x.shape))  # 2 % multiplicative noise
    fit = fit_power_law(x, y)
    assert abs(fit.b - 0.076) < 3 * fit.b_err  # the interval covers the truth
    assert 0.001 < fit.b_err < 0.01
    assert abs(fit.b - 0.076) < 0.01
    assert 0.9 < fit.r2 < 1.0
    # the standard error is calibrated: over 200 noise draws the 95 % interval covers the truth ~95 % of the time
    covered = 0
    for seed in range(200):
        noisy = 2.0 * x ** -0.076 * np.exp(np.random.default_rng(seed).normal(0, 0.02, x.shape))
        f = fit_power_law(x, noisy)
        covered += abs(f.b - 0.076) < 1.96 * f.b_err
    assert 0.9 <= covered / 200 <= 0.99
    # the same check against scipy's own regression
    from scipy.stats import linregress

    ref = linregress(np.log(x), np.log(y))
    assert fit.b == pytest.approx(-ref.slope) and fit.b_err == pytest.approx(ref.stderr) and fit.r2 == pytest.approx(ref.rvalue**2)


def test_power_law_with_offset_recovers_the_irreducible_loss():
    rng = np.random.default_rng(1)
    x = np.geomspace(1.0, 1e4, 30)
    y = 2.0 * x ** -0.3 + 1.5 + rng.normal(0, 0.002, x.shape)
    fit = fit_power_law(x, y, offset=True)
    assert fit.offset and fit.n == 30
    assert fit.b == pytest.approx(0.3, abs=0.03)
    assert fit.c == pytest.approx(1.5, abs=0.03)
    assert fit.a == pytest.approx(2.0, rel=0.1)
    assert fit.r2 > 0.99
    # the offset-free law fits these points worse (the curve flattens towards c)
    assert fit_power_law(x, y).r2 < fit.r2


@pytest.mark.parametrize("x,y,offset", [([1, 2], [3, 2], False), ([1, 2, 3], [3, 2, 1], True),
                                        ([1, -2, 3], [3, 2, 1], False), ([2, 2, 2], [3, 2, 1], False)])
def test_power_law_refuses_bad_input(x, y, offset):
    with pytest.raises(ValueError):
        fit_power_law(x, y, offset=offset)


def test_compute_frontier_by_hand():
    # compute 1..5; losses 5, 6 (worse than the cheaper 5), 4, 4.5 (worse than 4), 3
    assert compute_frontier([1, 2, 3, 4, 5], [5, 6, 4, 4.5, 3]).tolist() == [True, False, True, False, True]
    # order does not matter; equal compute keeps the lower loss; NaN losses never count
    assert compute_frontier([5, 1, 1, 3], [3, 3.0, 2.0, float("nan")]).tolist() == [False, False, True, False]


def test_best_per_group_and_correlation():
    keys, best = best_per_group([10, 20, 10, 20, 30], [4.0, 3.5, 3.8, 3.6, 3.0])
    assert keys == [10, 20, 30] and best.tolist() == [3.8, 3.5, 3.0]
    c = correlation([1, 2, 3, 4], [2, 4, 6, 8.5])
    assert c["n"] == 4 and c["pearson"] > 0.99 and c["spearman"] == pytest.approx(1.0)
    assert correlation([1, 2], [1, 2])["pearson"] is None  # too few points
