"""Tests for userfm.data.synth: the synthetic multi-service log generator and its known answers."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from userfm.config import ConfigError, load_config
from userfm.data.schema import EVENT_SCHEMA
from userfm.data.synth import generate, generate_tables
from userfm.data.synth_model import SynthConfig
from userfm.data.synth_world import DEPARTMENTS, NEWS_SECTIONS, TOPICS

REPO = Path(__file__).resolve().parents[1]
# 3 chunks of 1000 users, ~90k events: big enough for statistics, small enough to run in a second.
# This file tests the "topics" story (attributes act through the topic mix); tests/test_synth_latent.py
# tests the default "latent" story.
CFG = SynthConfig(n_users=3000, events_per_user=30.0, users_per_file=1000, seed=7, mode="topics")
TABLES = ("events", "future_events", "attributes", "future_labels", "latent", "catalog")


@pytest.fixture(scope="module")
def data() -> dict:
    t = time.perf_counter()
    out = generate_tables(CFG)
    n = out["events"].num_rows + out["future_events"].num_rows
    print(f"\nsynth: {n} events in {time.perf_counter() - t:.2f}s")
    return out


@pytest.fixture(scope="module")
def events(data) -> pd.DataFrame:
    return data["events"].to_pandas()


@pytest.fixture(scope="module")
def future(data) -> pd.DataFrame:
    return data["future_events"].to_pandas()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    messages: list[str] = []
    gt = generate(CFG, out, progress=messages.append)
    assert len(messages) == 1 + 3  # catalog/users line, then one per chunk
    return out, gt


def _gt_json(gt: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in gt.items() if k != "files"}))


# --------------------------------------------------------------------------------------------- files


def test_written_files_have_the_event_schema_and_equal_the_in_memory_tables(written, data):
    out, gt = written
    for sub in ("events", "future_events"):
        parts = sorted((out / sub).glob("part-*.parquet"))
        assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        assert gt["files"][sub] == [f"{sub}/{p.name}" for p in parts]
        for p in parts:
            assert pq.read_schema(p).equals(EVENT_SCHEMA, check_metadata=True)
        assert pa.concat_tables(pq.read_table(p) for p in parts).equals(data[sub])
    for name in ("attributes", "future_labels", "latent", "catalog"):
        assert pq.read_table(out / f"{name}.parquet").equals(data[name]), name
    on_disk = json.loads((out / "ground_truth.json").read_text())
    assert on_disk == json.loads(json.dumps(gt))
    assert _gt_json(on_disk) == _gt_json(data["ground_truth"])


def test_rows_sorted_by_user_then_time_and_each_user_in_one_file(written):
    out, _ = written
    seen: set[str] = set()
    for p in sorted((out / "events").glob("part-*.parquet")):
        df = pq.read_table(p, columns=["user_id", "ts"]).to_pandas()
        assert df.equals(df.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True))
        users = set(df.user_id)
        assert not users & seen
        seen |= users
    assert len(seen) == CFG.n_users


def test_same_seed_same_tables_different_seed_different(data):
    again = generate_tables(CFG)
    for name in TABLES:
        assert again[name].equals(data[name]), name
    assert _gt_json(again["ground_truth"]) == _gt_json(data["ground_truth"])

    other = generate_tables(dataclasses.replace(CFG, seed=8))
    assert other["events"].num_rows != data["events"].num_rows
    assert not other["attributes"].equals(data["attributes"])
    assert not other["events"].slice(0, 100).equals(data["events"].slice(0, 100))


def test_same_seed_byte_identical_files(tmp_path):
    cfg = SynthConfig(n_users=200, users_per_file=80, seed=3)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 3 + 5  # 3 event parts, 3 future parts, 4 tables + ground_truth.json
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------ activity


def test_heavy_tailed_activity_every_user_active(events, data):
    n = events.groupby("user_id").size()
    assert len(n) == CFG.n_users and n.min() >= 1
    assert 0.15 < (n <= 5).mean() < 0.5  # many cold users
    assert 0.02 < (n >= 100).mean() < 0.15  # some heavy users
    assert n.max() >= 300
    assert abs(len(events) / (CFG.n_users * CFG.events_per_user) - 1) < 0.03
    # The ground truth reports what the tables hold.
    act = data["ground_truth"]["activity"]
    assert act["n_users"] == CFG.n_users
    assert act["n_events"] == len(events)
    assert act["n_future_events"] == data["future_events"].num_rows
    assert act["frac_users_le_5_events"] == pytest.approx((n <= 5).mean())
    assert act["frac_users_ge_100_events"] == pytest.approx((n >= 100).mean())
    assert act["events_per_service"] == events.service.value_counts().to_dict()
    assert np.array_equal(data["latent"].column("n_events").to_numpy(), n.sort_index().to_numpy())


def test_service_propensity_some_users_single_service(events, data):
    per_user = events.groupby("user_id").service.nunique()
    n = events.groupby("user_id").size()
    busy = per_user[n >= 20]
    assert 0.2 < (busy == 1).mean() < 0.45  # single_service_frac = 0.3 of users use one service only
    assert (busy == 3).mean() > 0.3
    assert set(events.service) == {"shopping", "search", "news"}
    assert data["ground_truth"]["activity"]["frac_single_service_users"] == pytest.approx(0.3, abs=0.03)


# -------------------------------------------------------------------------------------- item columns


def test_products_have_four_level_categories_consistent_per_item(events):
    shop = events[events.service == "shopping"]
    assert shop.category.map(len).eq(4).all()
    assert shop.category.map(lambda c: all(isinstance(x, str) and x for x in c)).all()
    assert set(shop.category.map(lambda c: c[0])) == set(DEPARTMENTS)
    assert shop.item_id.notna().all() and (shop.value > 0).all()
    key = shop.assign(path=shop.category.map("/".join))
    per_item = key.groupby("item_id").agg(path=("path", "nunique"), text=("text", "nunique"),
                                          value=("value", "nunique"))
    assert (per_item == 1).all().all()  # same item_id -> same category, title and price
    # The taxonomy is a tree: a leaf (level 4) has exactly one parent path.
    assert key.groupby(shop.category.map(lambda c: c[3])).path.nunique().max() == 1
    assert shop.item_id.nunique() > 1000


def test_search_and_news_columns(events):
    search = events[events.service == "search"]
    assert search.item_id.isna().all() and search.category.isna().all() and search.value.isna().all()
    assert (search.text.str.len() > 2).all()
    news = events[events.service == "news"]
    assert news.item_id.notna().all() and news.value.isna().all()
    assert news.category.map(lambda c: len(c) == 2 and c[0] == "News" and c[1] in NEWS_SECTIONS).all()
    assert news.groupby("item_id").text.nunique().max() == 1


# ------------------------------------------------------------------------------------------ persona


def _topic_hist(df: pd.DataFrame, topic_of) -> pd.DataFrame:
    t = df.category.map(topic_of)
    return df.groupby([df.user_id, t]).size().unstack(fill_value=0).reindex(columns=range(len(TOPICS)),
                                                                            fill_value=0)


def test_cross_service_persona_consistency(events):
    shop = _topic_hist(events[events.service == "shopping"], lambda c: DEPARTMENTS.index(c[0]))
    news = _topic_hist(events[events.service == "news"], lambda c: NEWS_SECTIONS.index(c[1]))
    users = shop.index.intersection(news.index)
    users = users[(shop.loc[users].sum(axis=1) >= 5).to_numpy() & (news.loc[users].sum(axis=1) >= 5).to_numpy()]
    assert len(users) > 200
    a = shop.loc[users].to_numpy(float)
    b = news.loc[users].to_numpy(float)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    same = float((a * b).sum(axis=1).mean())
    shuffled = float((a * np.random.default_rng(0).permutation(b)).sum(axis=1).mean())
    assert same > 0.65
    assert same > shuffled + 0.3


def test_age_leaves_a_footprint_in_behaviour(events, data):
    # AGE_TILT gives gaming 3.0 for 18-24 and 0.2 for 55+: the gaming share of shopping should differ.
    shop = events[events.service == "shopping"]
    gaming = shop.category.map(lambda c: c[0] == "Games").groupby(shop.user_id).mean()
    age = data["latent"].to_pandas().set_index("user_id").age_bracket
    by_age = gaming.groupby(age.reindex(gaming.index)).mean()
    assert by_age["18-24"] > 3 * by_age["55+"]


# ----------------------------------------------------------------------------------------------- time


def test_timestamps_inside_history_and_future_windows(events, future, data):
    start = pd.Timestamp(CFG.start, tz="UTC")
    cutoff = start + pd.Timedelta(days=CFG.days)
    end = cutoff + pd.Timedelta(days=CFG.future_days)
    assert events.ts.min() >= start and events.ts.max() < cutoff
    assert future.ts.min() >= cutoff and future.ts.max() < end
    assert events.ts.max() > cutoff - pd.Timedelta(days=2)  # the whole period is used
    period = data["ground_truth"]["period"]
    assert (period["start"], period["cutoff"], period["end"]) == (start.isoformat(), cutoff.isoformat(),
                                                                 end.isoformat())


def test_daily_and_weekly_rhythm(events, data):
    hours = np.bincount(events.ts.dt.hour, minlength=24)
    assert hours.max() > 5 * hours.min()  # not flat: nights are quiet
    rhythm = data["ground_truth"]["rhythm"]
    for svc in CFG.services:
        sub = events[events.service == svc]
        h = np.bincount(sub.ts.dt.hour, minlength=24) / len(sub)
        assert np.corrcoef(h, rhythm["hour_of_day_utc"][svc])[0, 1] > 0.95, svc
    # Days are counted per calendar day: 180 days from Monday 2024-01-01 hold 26 Sat/Sun weekends.
    days = pd.date_range(CFG.start, periods=CFG.days, freq="D")
    weekend_day_share = (days.dayofweek >= 5).mean()
    weekend = {s: (events[events.service == s].ts.dt.dayofweek >= 5).mean() for s in CFG.services}
    assert weekend["shopping"] > 1.15 * weekend_day_share
    assert weekend["news"] < 0.9 * weekend_day_share


# --------------------------------------------------------------------------------------- attributes


def test_label_noise_rate(data):
    obs = data["attributes"].to_pandas()
    true = data["latent"].to_pandas()
    assert list(obs.columns) == ["user_id", "age_bracket", "is_parent", "segment"]
    assert obs.user_id.equals(true.user_id)
    for name in ("age_bracket", "is_parent", "segment"):
        rate = (obs[name] != true[name]).mean()
        assert abs(rate - CFG.label_noise) < 0.025, (name, rate)
        assert data["ground_truth"]["attributes"][name]["observed_noise_rate"] == pytest.approx(rate)
    # Noisy labels are spread over every other class, not one neighbour.
    flipped = obs[obs.age_bracket != true.age_bracket]
    assert flipped.groupby(true.age_bracket[flipped.index]).age_bracket.nunique().min() == 3


def test_zero_label_noise_keeps_true_labels():
    d = generate_tables(SynthConfig(n_users=300, label_noise=0.0, seed=1))
    obs, true = d["attributes"], d["latent"]
    for name in ("age_bracket", "is_parent", "segment"):
        assert obs.column(name).equals(true.column(name))
        assert d["ground_truth"]["attributes"][name]["observed_noise_rate"] == 0.0


def _age_posterior_by_hand(persona: np.ndarray, model: dict) -> np.ndarray:
    """P(age | theta) from the Dirichlet densities written in the ground truth."""
    logp = []
    for prior, alpha in zip(model["prior"], model["dirichlet_alpha"]):
        alpha = np.asarray(alpha)
        log_norm = math.lgamma(alpha.sum()) - sum(math.lgamma(a) for a in alpha)
        logp.append(math.log(prior) + log_norm + np.log(persona) @ (alpha - 1))
    logp = np.stack(logp, axis=1)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_oracle_accuracy_recomputed_from_the_written_model(data):
    gt = data["ground_truth"]["attributes"]
    latent = data["latent"].to_pandas()
    obs = data["attributes"].to_pandas()
    persona = np.stack(latent.persona.to_numpy())
    assert np.allclose(persona.sum(axis=1), 1.0)

    p_age = _age_posterior_by_hand(persona, gt["age_bracket"]["model"])
    classes = np.array(gt["age_bracket"]["classes"])
    assert gt["age_bracket"]["oracle_accuracy"] == pytest.approx((classes[p_age.argmax(1)] == obs.age_bracket).mean())

    m = gt["is_parent"]["model"]
    logit = m["bias"] + (persona @ np.asarray(m["topic_weights"]))[:, None] + np.asarray(m["age_effect"])[None, :]
    p_parent = (p_age / (1 + np.exp(-logit))).sum(axis=1)
    assert gt["is_parent"]["oracle_accuracy"] == pytest.approx(((p_parent > 0.5) == obs.is_parent).mean())

    seg = np.array(TOPICS)[persona.argmax(1)]
    assert gt["segment"]["oracle_accuracy"] == pytest.approx((seg == obs.segment).mean())
    assert gt["segment"]["oracle_accuracy_noise_free"] == 1.0

    for name, a in gt.items():
        k = a["num_classes"]
        assert 1 / k < a["oracle_accuracy"] <= 1, name
        assert a["oracle_accuracy"] > a["majority_accuracy"] + 0.05, name  # behaviour carries the label
        assert a["oracle_accuracy"] == pytest.approx(a["oracle_accuracy_expected"], abs=0.03), name
        assert a["oracle_accuracy"] <= a["oracle_accuracy_noise_free"], name
        assert sum(a["prior"]) == pytest.approx(1.0) and len(a["prior"]) == k
        assert a["observed_prior"] == pytest.approx(
            (obs[name].value_counts(normalize=True).reindex(a["classes"], fill_value=0)).tolist())


# ---------------------------------------------------------------------------------------- future labels


def test_future_labels_match_future_events(data, future):
    labels = data["future_labels"].to_pandas().set_index("user_id")
    buy_cols = [f"buy_{d.lower()}" for d in DEPARTMENTS]
    assert list(labels.columns) == buy_cols + ["next_service", "n_future_events"]
    assert len(labels) == CFG.n_users

    shop = future[future.service == "shopping"]
    bought = pd.crosstab(shop.user_id, shop.category.map(lambda c: f"buy_{c[0].lower()}")) > 0
    expected = bought.reindex(index=labels.index, columns=buy_cols, fill_value=False).astype(bool)
    assert labels[buy_cols].equals(expected)
    assert 0.02 < labels[buy_cols].to_numpy().mean() < 0.3

    first = future.sort_values(["user_id", "ts"]).groupby("user_id").service.first()
    assert labels.next_service.equals(first.reindex(labels.index).rename("next_service"))
    counts = future.groupby("user_id").size().reindex(labels.index, fill_value=0)
    assert (labels.n_future_events == counts).all()
    idle = labels[labels.n_future_events == 0]
    assert len(idle) > 0 and idle.next_service.isna().all() and not idle[buy_cols].any().any()

    rates = data["ground_truth"]["future_labels"]["positive_rate"]
    for col in buy_cols:
        assert rates[col] == pytest.approx(labels[col].mean())


def test_future_behaviour_follows_the_persona(data, future):
    # Users whose observed segment is X buy in X's department far more often than others do.
    labels = data["future_labels"].to_pandas()
    seg = data["latent"].to_pandas().segment
    for topic, dept in (("gaming", "Games"), ("gardening", "Garden")):
        col = labels[f"buy_{dept.lower()}"]
        assert col[seg == topic].mean() > 3 * col[seg != topic].mean()


# --------------------------------------------------------------------------------------------- config


def test_example_config_and_overrides():
    path = REPO / "experiments" / "synth" / "default.yaml"
    assert load_config(SynthConfig, path) == SynthConfig()
    cfg = load_config(SynthConfig, path, ["services=shopping,news", "seed=3", "label_noise=0.2"])
    assert cfg.services == ("shopping", "news") and cfg.seed == 3 and cfg.label_noise == 0.2
    with pytest.raises(ConfigError, match="video"):
        load_config(SynthConfig, path, ["services=shopping,video"])
    with pytest.raises(ValueError, match="label_noise"):
        SynthConfig(label_noise=0.5)
    with pytest.raises(ValueError, match="start"):
        SynthConfig(start="January")


def test_single_service_config():
    d = generate_tables(SynthConfig(n_users=200, services=("news",), seed=2))
    assert set(d["events"].column("service").to_pylist()) == {"news"}
    labels = d["future_labels"].to_pandas()
    assert not labels.filter(like="buy_").any().any()
    assert set(labels.next_service.dropna()) == {"news"}
    assert d["ground_truth"]["activity"]["events_per_service"] == {"news": d["events"].num_rows}


def test_cli_writes_dataset(tmp_path):
    from userfm.cli import main

    assert main(["synth", "--out", str(tmp_path), "--set", "n_users=50", "--seed", "5"]) == 0
    gt = json.loads((tmp_path / "ground_truth.json").read_text())
    assert gt["config"]["n_users"] == 50 and gt["seed"] == 5
    assert json.loads((tmp_path / "ground_truth.json").read_text())["activity"]["n_users"] == 50
    assert pq.read_table(tmp_path / "attributes.parquet").num_rows == 50
