"""Tests for the default "latent" story of userfm.synth: attributes live in timing, order and repeats.

Each channel is checked against the number the generative story predicts (computed here from the
written latent table), and the oracle is recomputed with scipy's densities, independently of synth.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from userfm.synth import (
    AGE_BRACKETS,
    DEPARTMENTS,
    LIFESTYLE_HOURS,
    LIFESTYLES,
    NEWS_SECTIONS,
    ROUTINE_REPEAT,
    ROUTINE_WEEKEND,
    TOPICS,
    WEEKDAY_PROFILE,
    SynthConfig,
    _forward_fill,
    generate_tables,
)

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
    from userfm.synth import HOUR_PROFILE

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
                                     routine_signal=0.0))["ground_truth"]["attributes"]
    assert gt["is_parent"]["oracle_accuracy"] == pytest.approx(gt["is_parent"]["majority_accuracy"], abs=0.02)
    assert gt["age_bracket"]["oracle_accuracy"] == pytest.approx(gt["age_bracket"]["majority_accuracy"], abs=0.02)


def test_latent_mode_is_deterministic_and_topics_mode_unchanged(data):
    again = generate_tables(CFG)
    assert again["events"].equals(data["events"]) and again["latent"].equals(data["latent"])
    # The topics story draws exactly what it drew before the latent story existed (same counts).
    old = generate_tables(SynthConfig(n_users=3000, events_per_user=30.0, seed=0, mode="topics"))
    assert old["events"].num_rows == 89_754
    assert old["ground_truth"]["attributes"]["segment"]["oracle_accuracy"] == pytest.approx(0.906, abs=5e-4)
