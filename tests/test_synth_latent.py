"""Tests for the default "latent" story of userfm.data.synth: attributes live in timing, order and repeats.

Each channel is checked against the number the generative story predicts (computed here from the
written latent table), and the oracle is recomputed with scipy's densities, independently of synth.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from userfm.data.synth import _forward_fill, generate_tables
from userfm.data.synth_model import (
    AGE_BRACKETS,
    LIFESTYLE_HOURS,
    LIFESTYLES,
    ROUTINE_REPEAT,
    ROUTINE_WEEKEND,
    WEEKDAY_PROFILE,
    TASTE_CLASSES,
    TASTE_MATCH,
    SynthConfig,
)
from userfm.data.synth_world import DEPARTMENTS, NEWS_SECTIONS, TOPICS, _TOPIC_SPECS

CFG = SynthConfig(n_users=3000, events_per_user=30.0, users_per_file=1000, seed=11)


@pytest.fixture(scope="module")
def data() -> dict:
    return generate_tables(CFG)


@pytest.fixture(scope="module")
def events(data) -> pd.DataFrame:
    ev = data["events"].to_pandas()
    lat = data["latent"].to_pandas().set_index("user_id")
    ev["hour"] = ev.ts.dt.hour
    ev["weekend"] = ev.ts.dt.day_of_week >= 5
    for c in ("segment", "age_bracket", "is_parent", "routine", "topic_persistence"):
        ev[c] = lat[c].reindex(ev.user_id).to_numpy()
    return ev


def test_forward_fill_by_hand():
    keep = np.array([True, False, False, True, False, True])
    assert _forward_fill(keep).tolist() == [0, 0, 0, 3, 3, 5]


def test_latent_is_the_default_and_segment_is_a_lifestyle(data):
    assert SynthConfig().mode == "latent"
    gt = data["ground_truth"]
    assert gt["mode"] == "latent" and gt["attributes"]["segment"]["classes"] == list(LIFESTYLES)
    assert set(data["attributes"].column("segment").to_pylist()) == set(LIFESTYLES)
    assert {"topic_persistence", "routine"} <= set(data["latent"].column_names)
    with pytest.raises(ValueError, match="mode"):
        SynthConfig(mode="words")
    with pytest.raises(ValueError, match="time_signal"):
        SynthConfig(time_signal=1.5)


def test_hours_follow_the_lifestyle_on_every_service(events):
    # P(hour = h) for a user of lifestyle L on service s = t * LIFE[L][h] + (1 - t) * SERVICE[s][h].
    from userfm.data.synth_model import HOUR_PROFILE

    t = CFG.time_signal
    for life in LIFESTYLES:
        peak = int(np.argmax(LIFESTYLE_HOURS[life]))
        for svc in CFG.services:
            e = events[(events.segment == life) & (events.service == svc)]
            expected = t * LIFESTYLE_HOURS[life][peak] + (1 - t) * HOUR_PROFILE[svc][peak]
            se = np.sqrt(expected * (1 - expected) / len(e))
            assert abs((e.hour == peak).mean() - expected) < 5 * se + 0.005, (life, svc)


def test_weekend_share_follows_routine(events, data):
    # P(weekend) = w r + (1 - w r) * q_s, q_s = the service rhythm's weekend mass over the window's days.
    start = pd.Timestamp(data["ground_truth"]["period"]["start"])
    weekday = (start.day_of_week + np.arange(CFG.days)) % 7
    q = {s: WEEKDAY_PROFILE[s][weekday][weekday >= 5].sum() / WEEKDAY_PROFILE[s][weekday].sum() for s in CFG.services}
    m = ROUTINE_WEEKEND * events.routine.to_numpy()
    expected = m + (1 - m) * events.service.map(q).to_numpy()
    for parent in (False, True):
        sel = (events.is_parent == parent).to_numpy()
        assert events.weekend.to_numpy()[sel].mean() == pytest.approx(expected[sel].mean(), abs=0.01)
    assert events[events.is_parent].weekend.mean() > events[~events.is_parent].weekend.mean() + 0.1


def test_repeats_follow_routine(events):
    # An event repeats the previous item on its service with prob ROUTINE_REPEAT * routine, plus the
    # (small) chance that a fresh draw lands on the same item: at least the former, at most a little more.
    same = events.groupby(["user_id", "service"]).text.transform(lambda t: t.eq(t.shift()))
    first = events.groupby(["user_id", "service"]).cumcount() == 0
    rate = same[~first].mean()
    floor = (ROUTINE_REPEAT * events.routine[~first]).mean()
    assert floor <= rate <= floor + 0.08
    by_parent = same[~first].groupby(events.is_parent[~first]).mean()
    assert by_parent[True] > by_parent[False] + 0.1


def _words_and_bigrams(texts) -> Counter:
    out: Counter = Counter()
    for t in texts:
        w = t.split()
        out.update(w)
        out.update(zip(w, w[1:]))
    return out


def test_taste_sets_share_every_word_and_bigram(data):
    # The item-identity channel: within a (service, topic), the TASTE_CLASSES taste sets have equal size and
    # the very same multiset of words and of adjacent bigrams, so a bag of words or bigrams cannot tell them
    # apart; products' taste is (brand + size) mod 4, headlines' (subject + suffix) mod 4.
    cat = data["catalog"].to_pandas()
    assert set(cat[cat.service == "search"].taste) == {-1}
    for (svc, topic), g in cat[cat.service != "search"].groupby(["service", "topic"]):
        sets = [g.text[g.taste == c] for c in range(TASTE_CLASSES)]
        assert len({len(x) for x in sets}) == 1 and len(sets[0]) >= 32, (svc, topic)
        counts = [_words_and_bigrams(x) for x in sets]
        assert all(c == counts[0] for c in counts[1:]), (svc, topic)
    spec = {t["name"]: t for t in _TOPIC_SPECS}["sports"]
    prod = cat[(cat.service == "shopping") & (cat.topic == "sports") & (cat.taste >= 0)]
    for text, taste in zip(prod.text, prod.taste):
        brand = next(i for i, b in enumerate(spec["brands"]) if text.startswith(b + " "))
        size = next(i for i, z in enumerate(spec["sizes"]) if text.endswith(" " + z))
        assert taste == (brand + size) % TASTE_CLASSES, text


def test_taste_draws_follow_item_signal(data):
    # P(a shopping/news event's item is in the user's taste set) = s + (1 - s) * z, z = the Zipf mass of
    # that set among the event's (service, topic) items (rank = position in the topic's catalog block).
    cat = data["catalog"].to_pandas()
    cat["rank"] = cat.groupby(["service", "topic"]).cumcount()
    cat["w"] = (cat["rank"] + 1.0) ** -CFG.item_zipf
    cat["w"] /= cat.groupby(["service", "topic"]).w.transform("sum")
    mass = cat[cat.taste >= 0].groupby(["service", "topic", "taste"]).w.sum()
    ev = data["events"].to_pandas()
    ev = ev[ev.service != "search"].merge(cat[["service", "text", "topic", "taste"]], on=["service", "text"])
    lat = data["latent"].to_pandas().set_index("user_id")
    ev["user_taste"] = lat.taste.reindex(ev.user_id).to_numpy()
    z = mass.reindex(pd.MultiIndex.from_arrays([ev.service, ev.topic, ev.user_taste])).fillna(0.0).to_numpy()
    s = CFG.item_signal
    assert (ev.taste == ev.user_taste).mean() == pytest.approx((s + (1 - s) * z).mean(), abs=0.01)
    # and taste follows age: P(taste = age) = TASTE_MATCH + (1 - TASTE_MATCH) / 4
    match = (lat.taste.to_numpy() == lat.age_bracket.map(AGE_BRACKETS.index).to_numpy()).mean()
    assert match == pytest.approx(TASTE_MATCH + (1 - TASTE_MATCH) / TASTE_CLASSES, abs=0.03)


def test_item_signal_zero_changes_only_the_items():
    on = generate_tables(SynthConfig(n_users=800, seed=6))
    off = generate_tables(SynthConfig(n_users=800, seed=6, item_signal=0.0))
    for col in ("user_id", "ts", "service"):
        assert on["events"].column(col).equals(off["events"].column(col)), col
    assert "taste" not in off["latent"].column_names
    assert on["latent"].drop_columns(["taste"]).equals(off["latent"])
    assert set(off["catalog"].column("taste").to_pylist()) == {-1}
    with pytest.raises(ValueError, match="item_signal"):
        SynthConfig(item_signal=-0.1)


def _topics(ev: pd.DataFrame) -> pd.Series:
    """Topic index of shopping (department) and news (section) events; search has no category."""
    dept = {d: i for i, d in enumerate(DEPARTMENTS)}
    sect = {s: i for i, s in enumerate(NEWS_SECTIONS)}
    return ev.category.map(lambda c: dept.get(c[0]) if c is not None and c[0] != "News" else
                           (sect.get(c[1]) if c is not None else None))


def _stay_rate_by_age(cfg: SynthConfig) -> pd.Series:
    """Share of consecutive shopping/news event pairs of one user on the same topic, by age bracket."""
    d = generate_tables(cfg)
    ev = d["events"].to_pandas()
    ev = ev[ev.service != "search"].copy()  # search queries carry no topic label
    ev["topic"] = _topics(ev)
    prev_same_user = ev.user_id.eq(ev.user_id.shift())
    stay = (ev.topic == ev.topic.shift())[prev_same_user]
    age = d["latent"].to_pandas().set_index("user_id").age_bracket
    return stay.groupby(age.reindex(ev.user_id[prev_same_user]).to_numpy()).mean().reindex(list(AGE_BRACKETS))


def test_topic_order_carries_age_only_when_order_signal_is_on():
    on = _stay_rate_by_age(SynthConfig(n_users=2000, seed=3))
    off = _stay_rate_by_age(SynthConfig(n_users=2000, seed=3, order_signal=0.0))
    assert np.all(np.diff(on.to_numpy()) > 0.03), on  # older brackets stay on a topic more
    assert on.iloc[-1] - on.iloc[0] > 0.3
    assert off.max() - off.min() < 0.12, off  # what is left: age's weak word tilt


def test_word_signal_zero_makes_the_topic_mix_independent_of_age():
    d = generate_tables(SynthConfig(n_users=4000, seed=4, word_signal=0.0))
    lat = d["latent"].to_pandas()
    persona = np.stack(lat.persona.to_numpy())
    means = np.stack([persona[(lat.age_bracket == a).to_numpy()].mean(0) for a in AGE_BRACKETS])
    assert np.abs(means - persona.mean(0)).max() < 0.03
    tilted = generate_tables(SynthConfig(n_users=4000, seed=4, word_signal=1.0))["latent"].to_pandas()
    p1 = np.stack(tilted.persona.to_numpy())
    gaming = TOPICS.index("gaming")
    assert p1[(tilted.age_bracket == "18-24").to_numpy(), gaming].mean() > 3 * p1[(tilted.age_bracket == "55+").to_numpy(), gaming].mean()


def test_oracle_recomputed_with_scipy_densities(data):
    gt = data["ground_truth"]["attributes"]
    lat = data["latent"].to_pandas()
    obs = data["attributes"].to_pandas()
    persona = np.clip(np.stack(lat.persona.to_numpy()), 1e-300, None)
    persona = persona / persona.sum(1, keepdims=True)
    ma, mp = gt["age_bracket"]["model"], gt["is_parent"]["model"]
    n, n_age = len(lat), len(AGE_BRACKETS)
    log_joint = np.zeros((n, n_age, 2))
    for a in range(n_age):
        alpha = np.asarray(ma["dirichlet_alpha"][a])
        # scipy's dirichlet.logpdf wants one point per call on the simplex
        ld = np.array([stats.dirichlet.logpdf(x, alpha) for x in persona])
        m, c = ma["persistence_beta_mean"][a], ma["persistence_beta_concentration"]
        lb = stats.beta.logpdf(lat.topic_persistence.clip(1e-12, 1 - 1e-12), m * c, (1 - m) * c)
        lb = lb + np.log(np.asarray(ma["taste_given_age"])[a, lat.taste.to_numpy()])  # taste ~ P(taste | age)
        logit = mp["bias"] + persona @ np.asarray(mp["topic_weights"]) + mp["age_effect"][a]
        for p in (0, 1):
            mr, cr = mp["routine_beta_mean"][p], mp["routine_beta_concentration"]
            lr = stats.beta.logpdf(lat.routine.clip(1e-12, 1 - 1e-12), mr * cr, (1 - mr) * cr)
            lpp = -np.logaddexp(0, -logit) if p else -np.logaddexp(0, logit)
            log_joint[:, a, p] = np.log(ma["prior"][a]) + ld + lb + lpp + lr
    post = np.exp(log_joint - log_joint.reshape(n, -1).max(1)[:, None, None])
    post /= post.sum((1, 2), keepdims=True)
    age_pred = np.array(AGE_BRACKETS)[post.sum(2).argmax(1)]
    parent_pred = post[:, :, 1].sum(1) > 0.5
    assert gt["age_bracket"]["oracle_accuracy"] == pytest.approx((age_pred == obs.age_bracket).mean())
    assert gt["is_parent"]["oracle_accuracy"] == pytest.approx((parent_pred == obs.is_parent).mean())
    assert gt["segment"]["oracle_accuracy"] == pytest.approx((lat.segment == obs.segment).mean())
    for name, a in gt.items():
        assert a["oracle_accuracy"] > a["majority_accuracy"] + 0.2, name
        assert a["oracle_accuracy"] == pytest.approx(a["oracle_accuracy_expected"], abs=0.03), name


def test_a_channel_switched_off_leaves_the_oracle_at_the_prior():
    gt = generate_tables(SynthConfig(n_users=1500, seed=5, time_signal=0.0))["ground_truth"]["attributes"]
    seg = gt["segment"]
    assert seg["oracle_accuracy_noise_free"] == pytest.approx(max(seg["prior"]), abs=0.02)
    # with every channel off, is_parent is left with its age effect alone (age unknown): near the majority
    gt = generate_tables(SynthConfig(n_users=1500, seed=5, word_signal=0.0, order_signal=0.0,
                                     routine_signal=0.0, item_signal=0.0))["ground_truth"]["attributes"]
    assert gt["is_parent"]["oracle_accuracy"] == pytest.approx(gt["is_parent"]["majority_accuracy"], abs=0.02)
    assert gt["age_bracket"]["oracle_accuracy"] == pytest.approx(gt["age_bracket"]["majority_accuracy"], abs=0.02)


def test_latent_mode_is_deterministic_and_topics_mode_unchanged(data):
    again = generate_tables(CFG)
    assert again["events"].equals(data["events"]) and again["latent"].equals(data["latent"])
    # The topics story draws exactly what it drew before the latent story existed (same counts).
    old = generate_tables(SynthConfig(n_users=3000, events_per_user=30.0, seed=0, mode="topics"))
    assert old["events"].num_rows == 89_754
    assert old["ground_truth"]["attributes"]["segment"]["oracle_accuracy"] == pytest.approx(0.906, abs=5e-4)
