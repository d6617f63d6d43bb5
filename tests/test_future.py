"""The future objective (userfm.objectives.future): the per-step cut by hand, the dense all-action loss by hand; the next
and masked-item objectives, which are the same loss over other (state, item) pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from userfm.objectives.future import future_loss, future_views


def _batch():
    # 3 users, width 5: item ids 10.. as text_hash, category = hash as well, lengths 5, 1, 3
    length = np.array([5, 1, 3])
    th = np.array([[11, 12, 13, 14, 15], [21, 0, 0, 0, 0], [31, 32, 33, 0, 0]], np.int64)
    return {"service": (th > 0).astype(np.int64), "text_hash": th, "category": th[..., None] % 7,
            "time": np.stack([th, th], -1) % 5, "length": length, "pair_kind": np.zeros(3, np.int64)}


def test_future_views_by_hand():
    batch = _batch()
    r = np.random.default_rng(4).random(3)
    cut = [1 + int(math.floor(r[0] * 4)), 1, 1 + int(math.floor(r[2] * 2))]  # user 1 (one event) keeps it, no targets
    out = future_views(batch, window=2, rng=np.random.default_rng(4))
    assert "a.pair_kind" not in out and set(out) == {f"{v}.{k}" for v in "ab" for k in ("service", "text_hash", "category", "time",
                                                                                      "length")} | {"a.masked"}
    assert out["a.masked"].shape == (3, 5) and not out["a.masked"].any()
    assert out["a.length"].tolist() == cut
    assert out["b.length"].tolist() == [min(5 - cut[0], 2), 0, min(3 - cut[2], 2)]
    for u, n in enumerate([5, 1, 3]):
        row = batch["text_hash"][u]
        a = out["a.text_hash"][u]
        assert a.shape == (5,) and a[:cut[u]].tolist() == row[:cut[u]].tolist() and not a[cut[u]:].any()
        nb = out["b.length"][u]
        b = out["b.text_hash"][u]
        assert b.shape == (2,) and b[:nb].tolist() == row[cut[u]:cut[u] + nb].tolist() and not b[nb:].any()
        assert out["b.time"][u, :nb].tolist() == batch["time"][u, cut[u]:cut[u] + nb].tolist()
    # every cut leaves >= 1 event on both sides for users with >= 2 events
    many = future_views({**batch, "length": np.array([2, 2, 2])}, window=3, rng=np.random.default_rng(0))
    assert many["a.length"].tolist() == [1, 1, 1] and many["b.length"].tolist() == [1, 1, 1]


def _loss_by_hand(user, items, valid, keys, t, log_q):
    pairs = [(u, w) for u in range(valid.shape[0]) for w in range(valid.shape[1]) if valid[u, w]]
    p = len(pairs)
    cand = [items[u, w] / np.linalg.norm(items[u, w]) for u, w in pairs]
    ck = [keys[u, w] for u, w in pairs]
    total, hits = 0.0, 0
    for i, (u, w) in enumerate(pairs):
        q = user[u] / np.linalg.norm(user[u])
        logits = []
        for j in range(p):
            if j != i and ck[j] == ck[i]:
                logits.append(-np.inf)
                continue
            s = float(q @ cand[j]) / t
            if log_q:
                s -= math.log(ck.count(ck[j]) / p)
            logits.append(s)
        logits = np.array(logits)
        m = logits[np.isfinite(logits)].max()
        total += -(logits[i] - (m + math.log(np.exp(logits[np.isfinite(logits)] - m).sum())))
        hits += int(np.argmax(logits) == i)
    return total / p, hits / p


@pytest.mark.parametrize("log_q", [True, False])
def test_future_loss_by_hand(log_q):
    rng = np.random.default_rng(0)
    user = rng.normal(size=(3, 4))
    items = rng.normal(size=(3, 2, 4))
    valid = np.array([[True, True], [True, False], [True, True]])
    keys = np.array([[1, 2], [2, 0], [3, 1]])  # items 1 and 2 each the target of two users
    want, acc = _loss_by_hand(user, items, valid, keys, 0.5, log_q)
    got, got_acc = future_loss(torch.tensor(user), torch.tensor(items), torch.tensor(valid), torch.tensor(keys), 0.5, log_q)
    assert float(got) == pytest.approx(want, rel=1e-9) and got_acc == pytest.approx(acc)


def test_future_loss_gradients_and_empty_batch():
    user = torch.randn(2, 4, requires_grad=True)
    items = torch.randn(2, 3, 4, requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    loss, _ = future_loss(user, items, valid, torch.tensor([[1, 2, 0], [3, 0, 0]]), 0.1)
    loss.backward()
    assert user.grad.abs().sum() > 0 and items.grad[:, 2].abs().sum() == 0  # padding gets no gradient
    empty, acc = future_loss(user, items, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long), 0.1)
    assert float(empty.detach()) == 0.0 and acc == 0.0 and empty.requires_grad


# ---------------------------------------------------------------------------------------- next (userfm.objectives.next_event)


def test_next_loss_is_the_dense_loss_over_position_pairs_by_hand():
    from userfm.objectives.next_event import next_loss

    rng = np.random.default_rng(1)
    states = rng.normal(size=(2, 4, 3))
    items = rng.normal(size=(2, 4, 3))
    length = np.array([4, 2])
    keys = np.array([[5, 6, 5, 7], [6, 8, 0, 0]])
    # pairs (user, t) -> state[u, t] predicts item[u, t + 1]: (0,0)->6 (0,1)->5 (0,2)->7 (1,0)->8
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0)]
    user = np.stack([states[u, t] for u, t in pairs])
    targets = np.stack([items[u, t + 1] for u, t in pairs])[:, None]
    tkeys = np.array([keys[u, t + 1] for u, t in pairs])[:, None]
    want, acc = _loss_by_hand(user, targets, np.ones((4, 1), bool), tkeys, 0.2, True)
    got, got_acc = next_loss(torch.tensor(states), torch.tensor(items), torch.tensor(length), torch.tensor(keys), 0.2)
    assert float(got) == pytest.approx(want, rel=1e-9) and got_acc == pytest.approx(acc)


def test_causal_encoder_state_ignores_later_events_and_last_pooling():
    from userfm.models.encoders import EncoderConfig, UserEncoder

    torch.manual_seed(0)
    enc = UserEncoder(EncoderConfig(d_model=16, n_heads=2, d_ff=32, n_layers=2, max_events=8, dropout=0.0, causal=True,
                                    pooling="last")).eval()
    b, l = 2, 5
    batch = {"service": torch.ones(b, l, dtype=torch.long), "category": torch.randint(1, 50, (b, l, 4)),
             "time": torch.randint(1, 5, (b, l, 5)), "text_hash": torch.randint(1, 10**6, (b, l)),
             "length": torch.tensor([5, 3])}
    z, h, valid = enc(batch, return_hidden=True)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["category"][:, 3:] = torch.randint(1, 50, (b, 2, 4))  # events 3 and 4 (user 1 has 3 events: padding)
    z2, h2, _ = enc(changed, return_hidden=True)
    torch.testing.assert_close(h[:, :4], h2[:, :4])  # [CLS] and events 0-2 see only what came before
    assert not torch.allclose(h[0, 4:], h2[0, 4:])
    torch.testing.assert_close(z, h[torch.arange(2), torch.tensor([5, 3])])  # the state after each user's last event
    torch.testing.assert_close(z[1], z2[1])  # user 1's padding changed: its embedding did not


# ---------------------------------------------------------------------------------------- masked-item (userfm.objectives.masked_item)


def test_masked_item_loss_is_the_dense_loss_over_masked_positions_by_hand():
    from userfm.objectives.masked_item import masked_item_loss

    rng = np.random.default_rng(2)
    states = rng.normal(size=(2, 4, 3))
    items = rng.normal(size=(2, 4, 3))
    masked = np.array([[False, True, False, True], [True, False, False, False]])
    keys = np.array([[5, 6, 5, 7], [6, 8, 0, 0]])  # item 6 is masked twice: no negative of itself
    # pairs (user, t) -> state[u, t] predicts item[u, t] (the masked item itself): (0,1)->6 (0,3)->7 (1,0)->6
    pairs = [(0, 1), (0, 3), (1, 0)]
    user = np.stack([states[u, t] for u, t in pairs])
    targets = np.stack([items[u, t] for u, t in pairs])[:, None]
    tkeys = np.array([keys[u, t] for u, t in pairs])[:, None]
    for log_q in (True, False):
        want, acc = _loss_by_hand(user, targets, np.ones((3, 1), bool), tkeys, 0.3, log_q)
        got, got_acc = masked_item_loss(torch.tensor(states), torch.tensor(items), torch.tensor(masked),
                                        torch.tensor(keys), 0.3, log_q)
        assert float(got) == pytest.approx(want, rel=1e-9) and got_acc == pytest.approx(acc)
    s = torch.tensor(states, requires_grad=True)
    empty, acc = masked_item_loss(s, torch.tensor(items), torch.zeros(2, 4, dtype=torch.bool), torch.tensor(keys), 0.3)
    assert float(empty.detach()) == 0.0 and acc == 0.0 and empty.requires_grad


def test_masked_item_objective_hides_the_masked_items_and_scores_their_unmasked_vectors():
    """pretext_loss('masked-item'): the encoder's states at the masked positions (which show only [MASK],
    service and position) against the item vectors of the unmasked events, through the objective's head."""
    from userfm.models.encoders import EncoderConfig, UserEncoder
    from userfm.objectives.masked_item import masked_item_loss
    from userfm.objectives.pretext import ObjectiveConfig, build_head, pretext_loss

    torch.manual_seed(0)
    enc = UserEncoder(EncoderConfig(d_model=16, n_heads=2, d_ff=32, n_layers=2, max_events=8, dropout=0.0,
                                    item_id_buckets=64)).eval()
    b, l = 2, 5
    batch = {"service": torch.ones(b, l, dtype=torch.long), "category": torch.randint(1, 50, (b, l, 4)),
             "time": torch.randint(1, 5, (b, l, 5)), "text_hash": torch.randint(1, 10**6, (b, l)),
             "length": torch.tensor([5, 3]), "masked": torch.tensor([[False, True, False, False, True],
                                                                     [True, False, False, False, False]])}
    cfg = ObjectiveConfig("masked-item", temperature=0.2)
    head = build_head(cfg, enc.config)
    loss, metrics = pretext_loss(enc, head, batch, cfg)
    h, _ = enc.hidden(batch)
    want, _ = masked_item_loss(head(h[:, 1:]), enc.item_vectors(batch), batch["masked"], batch["text_hash"], 0.2)
    assert float(loss) == pytest.approx(float(want), rel=1e-6) and "masked-item/top1" in metrics
    changed = {k: v.clone() for k, v in batch.items()}
    changed["category"][0, 1] = torch.randint(1, 50, (4,))  # a masked event's item: the input does not show it
    changed["text_hash"][0, 1] += 1
    torch.testing.assert_close(enc.hidden(changed)[0], h)
    assert float(pretext_loss(enc, head, changed, cfg)[0]) != pytest.approx(float(loss), rel=1e-6)  # the target moved
