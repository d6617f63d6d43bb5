"""MLM masking and loss, SimCLR augmentations, CLUE pairs, and the loss_and_backward wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from seqrows import all_scope, event_rows, table

from userfm.models.encoders import UserEncoder, tiny
from userfm.models.features import IGNORE_INDEX, fit_vocabs, make_batch, to_torch
from userfm.objectives.losses import grad_cache, symmetric_info_nce
from userfm.objectives.pretext import (
    MLMHead,
    ObjectiveConfig,
    augment,
    build_head,
    clue_batch,
    clue_pairs,
    loss_and_backward,
    mask_events,
    mlm_batch,
    mlm_loss,
    pretext_loss,
    simclr_batch,
    split_views,
)
from userfm.models.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def corpus():
    tab = table(event_rows(40, seed=5, max_len=16))
    vocabs = fit_vocabs(all_scope(tab))
    tok = TextTokenizer.fit(sum(all_scope(tab).column("text").to_pylist(), []), vocab_size=300)
    return tab, vocabs, tok


# ---------------------------------------------------------------------------------------------- mlm


def test_mask_rate_and_targets(corpus):
    tab, vocabs, _ = corpus
    batch = make_batch(all_scope(tab), vocabs)
    out = mask_events(batch, 0.25, np.random.default_rng(0))
    n, masked = batch["length"], out["masked"]
    real = np.arange(masked.shape[1])[None, :] < n[:, None]
    assert not (masked & ~real).any()  # only real events
    np.testing.assert_array_equal(masked.sum(1), np.maximum(1, np.round(0.25 * n)).astype(int) * (n > 0))
    # Targets only at masked positions; missing category levels ignored; time fields always present.
    assert (out["mlm_category"][~masked] == IGNORE_INDEX).all() and (out["mlm_time"][~masked] == IGNORE_INDEX).all()
    cat = batch["category"][masked]
    np.testing.assert_array_equal(out["mlm_category"][masked], np.where(cat == 0, IGNORE_INDEX, cat))
    np.testing.assert_array_equal(out["mlm_time"][masked], batch["time"][masked])
    assert (cat == 0).any()  # the corpus has short paths, so the ignore branch is exercised


def test_mlm_loss_by_hand_and_unmasked_carry_no_loss():
    cfg = tiny(d_model=2, n_heads=1, category_sizes=(2,), time_sizes=(2,))
    head = MLMHead(cfg)
    with torch.no_grad():
        for lin in (*head.category, *head.time):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    # [CLS], event 1 = [1, 0] (masked), event 2 = [0, 2] (not masked)
    h = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    batch = {
        "mlm_category": torch.tensor([[[1], [IGNORE_INDEX]]]),
        "mlm_time": torch.tensor([[[0], [IGNORE_INDEX]]]),
    }
    loss, metrics = mlm_loss(h, batch, head, time_fields=["hour"])
    # logits [1, 0]: category target 1 -> log(1 + e); time target 0 -> log(1 + e^-1)
    cat_ce, time_ce = math.log1p(math.e), math.log1p(math.exp(-1))
    assert loss.item() == pytest.approx((cat_ce + time_ce) / 2, abs=1e-6)
    assert metrics["mlm/acc/category0"] == 0.0 and metrics["mlm/acc/hour"] == 1.0
    assert metrics["mlm/loss/hour"] == pytest.approx(time_ce, abs=1e-6)
    loss.backward()
    assert h.grad[0, 2].abs().sum() == 0 and h.grad[0, 0].abs().sum() == 0  # unmasked / [CLS]: no loss
    assert h.grad[0, 1].abs().sum() > 0


# ------------------------------------------------------------------------------------------- simclr


def _orig_positions(view_ts, orig_ts):
    return [int(np.nonzero(orig_ts == t)[0][0]) for t in view_ts]


def test_crop_keeps_order_and_contiguity(corpus):
    tab, vocabs, _ = corpus
    batch = make_batch(all_scope(tab), vocabs)
    cfg = ObjectiveConfig("simclr", crop_min_fraction=0.3, shuffle_prob=0.0, replace_rate=0.0, event_mask_rate=0.0)
    view = augment(batch, cfg, np.random.default_rng(1))
    assert ((view["length"] >= 1) & (view["length"] <= batch["length"])).all()
    assert (view["length"] < batch["length"]).any()  # cropping really happened
    for u in range(len(batch["length"])):
        n, m = batch["length"][u], view["length"][u]
        ts = view["ts"][u, :m]
        assert (np.diff(ts) >= 0).all()
        start = int(np.searchsorted(batch["ts"][u, :n], ts[0]))
        np.testing.assert_array_equal(view["text_hash"][u, :m], batch["text_hash"][u, start : start + m])
        assert (view["ts"][u, m:] == 0).all() and (view["service"][u, m:] == 0).all()  # padding stays padding
    full = augment(batch, ObjectiveConfig("simclr", crop_min_fraction=1.0, shuffle_prob=0, replace_rate=0,
                                          event_mask_rate=0), np.random.default_rng(1))
    np.testing.assert_array_equal(full["length"], batch["length"])
    for k in ("ts", "service", "category", "time", "text_hash"):
        np.testing.assert_array_equal(full[k], batch[k], err_msg=k)


def test_shuffle_replace_and_mask_rates(corpus):
    tab, vocabs, _ = corpus
    big = make_batch(table(event_rows(300, seed=9, max_len=20)), vocabs)
    pool = make_batch({"ts": [[0, 1, 2]], "service": [["news"] * 3], "text": [["p1", "p2", "p3"]]}, vocabs)
    cfg = ObjectiveConfig("simclr", crop_min_fraction=1.0, shuffle_prob=1.0, replace_rate=0.2, event_mask_rate=0.3)
    view = augment(big, cfg, np.random.default_rng(2), pool=pool)
    n = big["length"]
    np.testing.assert_array_equal(view["length"], n)  # no crop: same lengths
    real = np.arange(view["ts"].shape[1])[None, :] < n[:, None]
    for u in range(len(n)):  # shuffle is a permutation of the user's own times
        np.testing.assert_array_equal(np.sort(view["ts"][u, : n[u]]), big["ts"][u, : n[u]])
    pool_hashes = set(pool["text_hash"][0].tolist())
    from_pool = np.isin(view["text_hash"], list(pool_hashes)) & real
    np.testing.assert_array_equal(from_pool, view["replaced"])  # replaced items come from the pool only
    assert view["replaced"][real].mean() == pytest.approx(0.2, abs=0.03)
    assert view["masked"][real].mean() == pytest.approx(0.3, abs=0.03)
    assert not (view["masked"] & ~real).any()
    single = n == 1
    assert not view["masked"][single, 0].any()  # at least one event stays unmasked


def test_simclr_batch_views_differ(corpus):
    tab, vocabs, tok = corpus
    out = simclr_batch(all_scope(tab), vocabs, tok, cfg=ObjectiveConfig("simclr"), seed=3)
    a, b = split_views(out)
    assert set(a) == set(b) >= {"length", "tokens", "ts", "masked"}
    assert len(a["length"]) == all_scope(tab).num_rows
    assert not np.array_equal(a["ts"][:, :3], b["ts"][:, :3])
    again = simclr_batch(all_scope(tab), vocabs, tok, cfg=ObjectiveConfig("simclr"), seed=3)
    for k in out:  # pure function of (rows, seed)
        np.testing.assert_array_equal(out[k], again[k])


# --------------------------------------------------------------------------------------------- clue


def test_clue_pairs_cross_service_and_time_split(corpus):
    tab, _, _ = corpus
    ra, rb, stats = clue_pairs(tab, "time_split", seed=0)
    rows = tab.to_pydict()
    n_services = {}
    for u, s in zip(rows["user_id"], rows["scope"]):
        if s != "all":
            n_services[u] = n_services.get(u, 0) + 1
    multi = sum(1 for v in n_services.values() if v >= 2)
    assert stats["cross_service"] == multi > 0
    assert stats["cross_service"] + stats["time_split"] + stats["skipped"] == len(n_services)
    for i, u in enumerate(ra["user_id"]):
        assert rb["user_id"][i] == u
        if ra["pair_kind"][i] == 0:
            assert len(set(ra["service"][i])) == 1 and set(ra["service"][i]) != set(rb["service"][i])
        else:
            assert max(ra["ts"][i]) <= min(rb["ts"][i]) and len(rb["ts"][i]) - len(ra["ts"][i]) in (0, 1)
    assert stats["time_split"] > 0
    _, _, skip = clue_pairs(tab, "skip")
    assert skip["time_split"] == 0 and skip["skipped"] == stats["time_split"] + stats["skipped"]
    batch = clue_batch(tab, corpus[1], single_service="skip")
    assert (batch["pair_kind"] == 0).all() and len(batch["a.length"]) == skip["cross_service"]


def test_clue_single_event_single_service_is_skipped():
    rows = {"user_id": ["x"], "scope": ["shopping"], "ts": [[1]], "service": [["shopping"]], "text": [["t"]]}
    _, _, stats = clue_pairs(rows)
    assert stats == {"cross_service": 0, "time_split": 0, "skipped": 1}


# ------------------------------------------------------------------------------------------- wiring


def _tiny_model(vocabs, tok, dropout=0.0):
    torch.manual_seed(0)
    return UserEncoder(tiny(vocabs, tok, item_encoder="text", dropout=dropout, max_events=16))


@pytest.mark.parametrize("objective,proj_dim", [("clue", 0), ("simclr", 0), ("clue", 12)])
def test_grad_cache_path_equals_plain_path(corpus, objective, proj_dim):
    tab, vocabs, tok = corpus
    if objective == "clue":
        batch = clue_batch(tab, vocabs, tok)
    else:
        batch = simclr_batch(all_scope(tab), vocabs, tok, cfg=ObjectiveConfig("simclr"))
    batch = to_torch(batch)
    results = []
    for mbs in (0, 7):
        model = _tiny_model(vocabs, tok)
        cfg = ObjectiveConfig(objective, mini_batch_size=mbs, learnable_temperature=True, proj_dim=proj_dim)
        torch.manual_seed(1)
        head = build_head(cfg, model.config)
        loss, metrics = loss_and_backward(model, head, batch, cfg)
        results.append((loss.item(), [p.grad.clone() for p in [*model.parameters(), *head.parameters()]]))
        assert 0 <= metrics[f"{objective}/top1"] <= 1
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g0, atol=2e-5, rtol=1e-4)


def test_grad_cache_with_dropout_on_real_encoder(corpus):
    tab, vocabs, tok = corpus
    a, b = split_views(to_torch(clue_batch(tab, vocabs, tok)))
    a.pop("pair_kind", None)
    grads = []
    for cached in (False, True):
        model = _tiny_model(vocabs, tok, dropout=0.2).train()
        torch.manual_seed(42)
        loss_fn = lambda za, zb: symmetric_info_nce(za, zb, 0.1)  # noqa: E731
        if cached:
            loss = grad_cache(model, [a, b], loss_fn, 5)
        else:
            n = len(a["length"])
            chunks = lambda v: [{k: x[i : i + 5] for k, x in v.items()} for i in range(0, n, 5)]  # noqa: E731
            loss = loss_fn(*(torch.cat([model(c) for c in chunks(v)]) for v in (a, b)))
            loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g1, g0, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["mlm", "clue", "simclr"])
def test_a_few_steps_reduce_the_loss(corpus, objective):
    tab, vocabs, tok = corpus
    model = _tiny_model(vocabs, tok)
    cfg = ObjectiveConfig(objective, mask_rate=0.3, temperature=0.2)
    head = build_head(cfg, model.config)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    if objective == "mlm":
        batch = to_torch(mlm_batch(all_scope(tab), vocabs, tok, mask_rate=0.3, seed=0))
    elif objective == "clue":
        batch = to_torch(clue_batch(tab, vocabs, tok))
    else:
        batch = to_torch(simclr_batch(all_scope(tab), vocabs, tok, cfg=cfg, seed=0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, metrics = loss_and_backward(model, head, batch, cfg, time_fields=vocabs.config.time_fields)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    if objective == "mlm":
        assert {"mlm/acc/category0", "mlm/acc/hour", "mlm/loss/year"} <= set(metrics)


def test_projection_head_loss_by_hand_and_embeddings_taken_before_it(corpus):
    """With proj_dim > 0 the loss is InfoNCE on g(z) = W2 gelu(W1 z + b1) + b2, while the encoder's
    output (the user embedding) keeps the encoder's width."""
    tab, vocabs, tok = corpus
    batch = to_torch(clue_batch(tab, vocabs, tok))
    model = _tiny_model(vocabs, tok).eval()
    cfg = ObjectiveConfig("clue", proj_dim=6, temperature=0.2)
    torch.manual_seed(3)
    head = build_head(cfg, model.config)
    loss, _ = pretext_loss(model, head, batch, cfg)
    a, b = split_views(batch)  # pair_kind is not a view key
    za, zb = model(a), model(b)
    assert za.shape[1] == model.config.embed_dim == 32
    lin1, lin2 = head.projection[0], head.projection[2]
    g = lambda z: F.gelu(z @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias  # noqa: E731
    ga, gb = F.normalize(g(za), dim=-1), F.normalize(g(zb), dim=-1)
    logits = ga @ gb.T / 0.2  # (n, n), positives on the diagonal
    labels = torch.arange(len(ga))
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert ga.shape[1] == 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert lin1.weight.grad is not None and lin1.weight.grad.abs().sum() > 0


def test_crop_views_keeps_a_contiguous_time_window_of_each_view(corpus):
    from userfm.objectives.pretext import crop_views

    tab, vocabs, tok = corpus
    batch = clue_batch(tab, vocabs, tok)
    same = crop_views(batch, 1.0, np.random.default_rng(0))
    assert set(same) == set(batch) - {"pair_kind"}
    for k in same:
        np.testing.assert_array_equal(same[k], batch[k])
    cropped = crop_views(batch, 0.3, np.random.default_rng(0))
    for v in ("a", "b"):
        n0, n1 = batch[f"{v}.length"], cropped[f"{v}.length"]
        assert np.all((n1 >= 1) & (n1 <= n0))
        for u in range(len(n0)):
            ts0, ts1 = batch[f"{v}.ts"][u, : n0[u]], cropped[f"{v}.ts"][u, : n1[u]]
            start = int(np.nonzero(ts0 == ts1[0])[0][0])  # the window is a contiguous run of the view
            np.testing.assert_array_equal(ts1, ts0[start : start + n1[u]])
    assert (cropped["a.length"] < batch["a.length"]).any()  # something was cut
