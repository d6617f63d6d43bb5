"""Synthetic multi-service user logs with known answers (``userfm synth``).

Every user has a latent **persona**: a mixture ``theta`` over 12 interest topics, drawn from a
Dirichlet whose concentration is tilted by the user's age bracket. The same ``theta`` drives the
user's events on every service (shopping, search, news), which is exactly the signal the CLUE
contrastive model (arXiv 2111.11294) learns from: one user's shopping, search and news logs share
topics. Item text comes from hand-written per-topic vocabularies; products carry a 4-level category
path (as in ShopperBERT, arXiv 2106.00573) and a price.

Generative story, per user ``u``::

    age_u        ~ Categorical(AGE_PRIOR)
    theta_u      ~ Dirichlet(topic_concentration * AGE_TILT[age_u])            (12 topics)
    parent_u     ~ Bernoulli(sigmoid(PARENT_BIAS + PARENT_W . theta_u + PARENT_AGE[age_u]))
    segment_u    =  argmax theta_u
    services_u   =  one service (prob single_service_frac) or Dirichlet(service_concentration * pop)
    rate_u       ~  LogNormal(0, activity_sigma), rescaled to mean events_per_user over users
    n_history_u  =  max(1, Poisson(rate_u));  n_future_u = Poisson(rate_u * future_days / days)
    each event:  service ~ services_u; topic ~ theta_u (uniform with prob topic_noise);
                 item ~ Zipf within (service, topic); day ~ weekday rhythm; hour ~ hour-of-day rhythm
    observed label = true label, or with prob label_noise a uniformly random *other* class

The logs depend on the attributes only through ``theta``, so the Bayes-optimal predictor from
``theta`` (the **oracle**, reported in ``ground_truth.json``) is a ceiling for any model of the logs.

Output layout of :func:`generate` (``OUT`` = ``out_dir``)::

    OUT/events/part-00000.parquet ...         history [start, cutoff), EVENT_SCHEMA, sorted by user, ts
    OUT/future_events/part-00000.parquet ...  future window [cutoff, cutoff + future_days), same schema
    OUT/attributes.parquet                    user_id, age_bracket, is_parent, segment (observed, noisy)
    OUT/future_labels.parquet                 user_id, buy_<dept> per department, next_service, n_future_events
    OUT/latent.parquet                        the answer key: persona, noise-free labels, service mix, rate
    OUT/catalog.parquet                       every item with its service and topic
    OUT/ground_truth.json                     see :func:`generate`

Users are generated in chunks of ``users_per_file`` users, one part file per chunk and table, so
memory stays bounded by the chunk size; each chunk draws from its own seeded stream, so the output
depends only on the config (same config -> byte-identical files).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userfm.config import to_dict
from userfm.data.schema import CATEGORY_TYPE, EVENT_SCHEMA, SCHEMA_VERSION, TS_TYPE
from userfm.data.synth_model import AGE_BRACKETS, AGE_PRIOR, AGE_TILT, HOUR_PROFILE, LIFESTYLES, LIFESTYLE_HOURS, PARENT_AGE, PARENT_BIAS, PARENT_W, PERSIST_CONC, ROUTINE_CONC, ROUTINE_REPEAT, ROUTINE_WEEKEND, SynthConfig, TASTE_CLASSES, TASTE_SERVICES, WEEKDAY_PROFILE, _US_PER_DAY, _US_PER_HOUR, _Users, _age_alpha, _make_users, _parse_start, _rng, _sample_rows, age_posterior, attribute_classes, latent_posteriors, parent_posterior, persist_mean, routine_mean, taste_given_age
from userfm.data.synth_world import DEPARTMENTS, TOPICS, _HEADLINE_SUFFIXES, _QUERY_TEMPLATES, _TOPIC_SPECS


# ---------------------------------------------------------------------------------------------
# Catalog: every item of every (service, topic), built once; events only sample indices into it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    table: pa.Table  # service, topic, text, item_id, category, value; one row per item
    offset: np.ndarray  # (n_services,) first row of each service's block
    size: np.ndarray  # (n_services,) items per topic within each service's block (topic-major)
    zipf_cdf: tuple[np.ndarray, ...]  # per service: (size,) popularity CDF over a topic's items
    taste: np.ndarray  # (n_items,) taste class of each item, -1 = in no taste set (every search query)

    def taste_rows(self, s: int, topic: int, taste: int) -> np.ndarray:
        """Catalog rows of service ``s``'s items of ``topic`` whose taste class is ``taste``."""
        lo = self.offset[s] + topic * self.size[s]
        return lo + np.nonzero(self.taste[lo:lo + self.size[s]] == taste)[0]


def _products(spec: dict, rng: np.random.Generator, n: int,
              taste_grid: bool = False) -> list[tuple[str, list[str], float, int]]:
    """``n`` products of a topic: (title, category path, price, taste class or -1).

    Without ``taste_grid``: random (brand, adjective, leaf, size) combinations, no taste sets. With it:
    about half the products are whole grids, for a few (adjective, leaf) templates, of the first
    TASTE_CLASSES brands x first TASTE_CLASSES sizes, taste = (brand + size) mod TASTE_CLASSES, so each taste
    set holds every brand, size, adjective and leaf (and every bigram) equally often; the rest are random
    combinations outside that brand x size block (taste -1). The order is shuffled: popularity ranks are random.
    """
    leaves = [(l2, l3, l4) for l2, sub in spec["taxonomy"].items() for l3, l4s in sub.items() for l4 in l4s]
    # Per-leaf base price around the topic's typical price, then per-product jitter.
    leaf_price = spec["price"] * rng.lognormal(0.0, 0.6, len(leaves))
    nb, na, nl, ns = len(spec["brands"]), len(spec["adjectives"]), len(leaves), len(spec["sizes"])
    k = TASTE_CLASSES
    if taste_grid and nb >= k and ns >= k:
        n_t = min(n // (2 * k * k), na * nl)  # templates
        tpl = np.repeat(rng.choice(na * nl, size=n_t, replace=False), k * k)
        cell = np.tile(np.arange(k * k), n_t)
        gb, gs = np.divmod(cell, k)
        free = np.array([(bb, ss) for bb in range(nb) for ss in range(ns) if not (bb < k and ss < k)])
        f = rng.choice(na * nl * len(free), size=n - n_t * k * k, replace=n - n_t * k * k > na * nl * len(free))
        ftpl, fcell = np.divmod(f, len(free))
        order = rng.permutation(n)
        b = np.r_[gb, free[fcell, 0]][order]
        s = np.r_[gs, free[fcell, 1]][order]
        a, leaf = np.divmod(np.r_[tpl, ftpl][order], nl)
        taste = np.r_[(gb + gs) % k, np.full(len(f), -1)][order]
    else:
        combos = rng.choice(nb * na * nl * ns, size=n, replace=n > nb * na * nl * ns)
        b, rest = np.divmod(combos, na * nl * ns)
        a, rest = np.divmod(rest, nl * ns)
        leaf, s = np.divmod(rest, ns)
        taste = np.full(n, -1)
    jitter = rng.lognormal(0.0, 0.25, n)
    out = []
    for i in range(n):
        l2, l3, l4 = leaves[leaf[i]]
        title = f"{spec['brands'][b[i]]} {spec['adjectives'][a[i]]} {l4.lower()} {spec['sizes'][s[i]]}"
        price = max(float(np.round(leaf_price[leaf[i]] * jitter[i])) - 0.01, 0.99)
        out.append((title, [spec["department"], l2, l3, l4], round(price, 2), int(taste[i])))
    return out


def _query_pool(spec: dict) -> list[str]:
    """Every distinct query of a topic: templated terms, how-to questions, brand + product noun."""
    leaves = [l4.lower() for sub in spec["taxonomy"].values() for l4s in sub.values() for l4 in l4s]
    pool = [tpl.format(t=t) for tpl in _QUERY_TEMPLATES for t in spec["terms"]]
    pool += list(spec["howto"])
    pool += [f"{brand.lower()} {leaf}" for brand in spec["brands"] for leaf in leaves]
    return sorted(set(pool))


def _headline_pool(spec: dict) -> list[str]:
    return [f"{s} {p}{x}" for s in spec["subjects"] for p in spec["predicates"] for x in _HEADLINE_SUFFIXES]


def _headlines(spec: dict, rng: np.random.Generator, m: int, taste_grid: bool) -> tuple[list[str], np.ndarray]:
    """``m`` headlines of a topic and their taste classes (-1 = none).

    Without ``taste_grid``: a random subset of the pool, no taste sets. With it: every subject x suffix
    headline of as many whole predicates as fit in ``m`` (taste = (subject + suffix) mod TASTE_CLASSES, so
    each taste set holds every subject, predicate and suffix equally often), then random others (taste -1),
    in shuffled order.
    """
    pool = _headline_pool(spec)
    n_pred, n_suf = len(spec["predicates"]), len(_HEADLINE_SUFFIXES)
    if not taste_grid or len(spec["subjects"]) % TASTE_CLASSES or n_suf % TASTE_CLASSES:
        return [pool[i] for i in rng.permutation(len(pool))[:m]], np.full(m, -1)
    subject, rest = np.divmod(np.arange(len(pool)), n_pred * n_suf)
    predicate, suffix = np.divmod(rest, n_suf)
    whole = rng.permutation(n_pred)[:min(m // (len(spec["subjects"]) * n_suf), n_pred)]
    in_grid = np.isin(predicate, whole)
    pick = np.r_[np.nonzero(in_grid)[0], rng.permutation(np.nonzero(~in_grid)[0])[:m - int(in_grid.sum())]]
    pick = pick[rng.permutation(len(pick))]
    taste = np.where(in_grid, (subject + suffix) % TASTE_CLASSES, -1)
    return [pool[i] for i in pick], taste[pick]


def _catalog_size(cfg: SynthConfig, service: str) -> int:
    """Items per topic of ``service``: the configured count, capped by the smallest vocabulary.

    Every topic of a service gets the same number of items so an item's row is just
    ``offset + topic * size + rank``.
    """
    if service == "shopping":
        return cfg.products_per_topic
    if service == "search":
        return min(cfg.queries_per_topic, min(len(_query_pool(t)) for t in _TOPIC_SPECS))
    return min(cfg.articles_per_topic, min(len(_headline_pool(t)) for t in _TOPIC_SPECS))


def _build_catalog(cfg: SynthConfig) -> _Catalog:
    rng = _rng(cfg, 0)
    service, topic, text, item_id, category, value, taste = [], [], [], [], [], [], []
    offset, size, cdfs = [], [], []
    grid = cfg.mode == "latent" and cfg.item_signal > 0  # taste sets only where they are drawn from
    for svc in cfg.services:
        m = _catalog_size(cfg, svc)
        offset.append(len(text))
        size.append(m)
        # Popularity rank r has weight (r + 1) ** -item_zipf; the catalog order is already random.
        w = np.arange(1, m + 1, dtype=np.float64) ** -cfg.item_zipf
        cdf = np.cumsum(w / w.sum())
        cdf[-1] = 1.0
        cdfs.append(cdf)
        for k, spec in enumerate(_TOPIC_SPECS):
            start_row = len(text)
            if svc == "shopping":
                for j, (title, cat, price, t) in enumerate(_products(spec, rng, m, grid)):
                    taste.append(t)
                    text.append(title)
                    category.append(cat)
                    value.append(price)
                    item_id.append(f"p{k:02d}{j:05d}")
            elif svc == "search":
                pool = _query_pool(spec)
                text.extend(pool[i] for i in rng.permutation(len(pool))[:m])
                taste.extend([-1] * m)
                category.extend([None] * m)
                value.extend([None] * m)
                item_id.extend([None] * m)
            else:
                heads, tastes = _headlines(spec, rng, m, grid)
                text.extend(heads)
                taste.extend(tastes.tolist())
                category.extend([["News", spec["section"]]] * m)
                value.extend([None] * m)
                item_id.extend(f"n{k:02d}{j:05d}" for j in range(m))
            service.extend([svc] * (len(text) - start_row))
            topic.extend([spec["name"]] * (len(text) - start_row))
    table = pa.table(
        {
            "service": pa.array(service, pa.string()),
            "topic": pa.array(topic, pa.string()),
            "text": pa.array(text, pa.string()),
            "item_id": pa.array(item_id, pa.string()),
            "category": pa.array(category, CATEGORY_TYPE),
            "value": pa.array(value, pa.float64()),
            "taste": pa.array(taste, pa.int8()),
        }
    )
    return _Catalog(table, np.array(offset, np.int64), np.array(size, np.int64), tuple(cdfs),
                    np.array(taste, np.int64))


# ---------------------------------------------------------------------------------------------
# Events: vectorised per chunk of users.
# ---------------------------------------------------------------------------------------------


def _service_day_hour(rng: np.random.Generator, cnt: int, name: str, weekday: np.ndarray,
                      n_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Day index in [0, n_days) and hour of ``cnt`` events of service ``name`` from its weekday and hour rhythm."""
    day_cdf = np.cumsum(WEEKDAY_PROFILE[name][weekday])
    day = np.minimum(np.searchsorted(day_cdf / day_cdf[-1], rng.random(cnt), side="right"), n_days - 1)
    hour = np.minimum(np.searchsorted(np.cumsum(HOUR_PROFILE[name]), rng.random(cnt), side="right"), 23)
    return day, hour


def _event_times(rng: np.random.Generator, svc: np.ndarray, services: tuple[str, ...], t0_us: int,
                 first_weekday: int, n_days: int) -> np.ndarray:
    """Microsecond UTC timestamps in [t0, t0 + n_days) with each service's weekday and hour rhythm."""
    ts = np.empty(svc.shape[0], np.int64)
    weekday = (first_weekday + np.arange(n_days)) % 7
    for s, name in enumerate(services):
        m = svc == s
        cnt = int(m.sum())
        if cnt == 0:
            continue
        day, hour = _service_day_hour(rng, cnt, name, weekday, n_days)
        ts[m] = t0_us + day * _US_PER_DAY + hour * _US_PER_HOUR + rng.integers(0, _US_PER_HOUR, cnt)
    return ts


def _latent_times(cfg: SynthConfig, users: _Users, lo: int, row: np.ndarray, svc: np.ndarray,
                  rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int) -> np.ndarray:
    """Latent mode timestamps: the service's rhythm, except that with probability ``time_signal`` the hour
    follows the user's lifestyle, and with probability ``ROUTINE_WEEKEND * routine`` the day is a
    uniformly drawn weekend day of the window."""
    n = row.shape[0]
    weekday = (first_weekday + np.arange(n_days)) % 7
    day, hour = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for s, name in enumerate(cfg.services):
        m = svc == s
        day[m], hour[m] = _service_day_hour(rng, int(m.sum()), name, weekday, n_days)
    life = users.lifestyle[lo:][row]
    by_life = rng.random(n) < cfg.time_signal
    for k, name in enumerate(LIFESTYLES):
        m = by_life & (life == k)
        hour[m] = np.minimum(np.searchsorted(np.cumsum(LIFESTYLE_HOURS[name]), rng.random(int(m.sum())), side="right"), 23)
    weekend = np.nonzero(weekday >= 5)[0]
    moved = rng.random(n) < ROUTINE_WEEKEND * users.routine[lo:][row]
    if weekend.size:
        day[moved] = rng.choice(weekend, int(moved.sum()))
    return t0_us + day * _US_PER_DAY + hour * _US_PER_HOUR + rng.integers(0, _US_PER_HOUR, n)


def _forward_fill(keep: np.ndarray) -> np.ndarray:
    """Index of the last position <= i where ``keep`` is True (``keep[0]`` must be True)."""
    return np.maximum.accumulate(np.where(keep, np.arange(keep.shape[0]), 0))


def _draw_items(cfg: SynthConfig, cat: _Catalog, svc: np.ndarray, topic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Catalog row of each event: Zipf-popular item of its (service, topic)."""
    item = np.empty(svc.shape[0], np.int64)
    for s in range(len(cfg.services)):
        m = svc == s
        rank = np.searchsorted(cat.zipf_cdf[s], rng.random(int(m.sum())), side="right")
        item[m] = cat.offset[s] + topic[m] * cat.size[s] + np.minimum(rank, cat.size[s] - 1)
    return item


def _draw_taste_items(cfg: SynthConfig, cat: _Catalog, taste: np.ndarray, svc: np.ndarray, topic: np.ndarray,
                      item: np.ndarray, rng: np.random.Generator) -> None:
    """With prob ``item_signal``, replace a shopping/news event's item (in place) by a uniformly drawn item
    of its topic from the user's taste set (``taste``: (n_events,) the user's taste class)."""
    hit = rng.random(svc.shape[0]) < cfg.item_signal
    u = rng.random(svc.shape[0])
    hit &= np.isin(svc, [s for s, name in enumerate(cfg.services) if name in TASTE_SERVICES])
    ev = np.nonzero(hit)[0]
    key = (svc[ev] * len(TOPICS) + topic[ev]) * TASTE_CLASSES + taste[ev]  # (service, topic, taste) of each draw
    for g in np.unique(key):
        m = ev[key == g]
        st, c = divmod(int(g), TASTE_CLASSES)
        rows = cat.taste_rows(*divmod(st, len(TOPICS)), c)
        if rows.size:
            item[m] = rows[np.minimum((u[m] * rows.size).astype(np.int64), rows.size - 1)]


def _event_table(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, hi: int, row: np.ndarray,
                 svc: np.ndarray, item: np.ndarray, ts: np.ndarray) -> pa.Table:
    items = cat.table.take(pa.array(item))
    return pa.Table.from_arrays(
        [
            users.user_id.slice(lo, hi - lo).take(pa.array(row)),
            pa.array(ts, TS_TYPE),
            pa.array(cfg.services, pa.string()).take(pa.array(svc)),
            items.column("text").combine_chunks(),
            items.column("item_id").combine_chunks(),
            items.column("category").combine_chunks(),
            items.column("value").combine_chunks(),
        ],
        schema=EVENT_SCHEMA,
    )


def _events(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, counts: np.ndarray,
            rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int):
    """Events of users ``lo .. lo + len(counts)``; returns (EVENT_SCHEMA table, local user, service, topic)."""
    hi = lo + counts.shape[0]
    row = np.repeat(np.arange(counts.shape[0]), counts)  # (n_events,) user index within the chunk
    svc = _sample_rows(rng, row, users.service_w[lo:hi])
    if cfg.mode == "latent":
        return _latent_events(cfg, cat, users, lo, hi, row, svc, rng, t0_us, first_weekday, n_days)
    topic = _sample_rows(rng, row, users.persona[lo:hi])
    noise = rng.random(row.shape[0]) < cfg.topic_noise
    topic[noise] = rng.integers(0, len(TOPICS), int(noise.sum()))
    item = _draw_items(cfg, cat, svc, topic, rng)
    ts = _event_times(rng, svc, cfg.services, t0_us, first_weekday, n_days) if n_days > 0 else item * 0

    order = np.lexsort((ts, row))  # by user, then time
    row, svc, topic, item, ts = row[order], svc[order], topic[order], item[order], ts[order]
    return _event_table(cfg, cat, users, lo, hi, row, svc, item, ts), row, svc, topic


def _latent_events(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, hi: int, row: np.ndarray,
                   svc: np.ndarray, rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int):
    """Latent mode: times first (lifestyle hours, routine weekends), then, in time order, a topic chain that
    stays on the previous event's topic with the user's persistence (else draws from the persona), items
    from the topics, and repeats: with probability ``ROUTINE_REPEAT * routine`` an event takes the item of
    the user's previous event on the same service."""
    n = row.shape[0]
    ts = _latent_times(cfg, users, lo, row, svc, rng, t0_us, first_weekday, n_days) if n_days > 0 else np.zeros(n, np.int64)
    order = np.lexsort((ts, row))  # by user, then time
    row, svc, ts = row[order], svc[order], ts[order]
    fresh = _sample_rows(rng, row, users.persona[lo:hi])
    noise = rng.random(n) < cfg.topic_noise
    fresh[noise] = rng.integers(0, len(TOPICS), int(noise.sum()))
    first = np.r_[True, row[1:] != row[:-1]] if n else np.zeros(0, bool)
    stay = (rng.random(n) < users.persist[lo:hi][row]) & ~first
    topic = fresh[_forward_fill(~stay)] if n else fresh
    item = _draw_items(cfg, cat, svc, topic, rng)
    if users.taste is not None:
        _draw_taste_items(cfg, cat, users.taste[lo:hi][row], svc, topic, item, rng)
    repeat = rng.random(n) < ROUTINE_REPEAT * users.routine[lo:hi][row]
    by_svc = np.lexsort((np.arange(n), svc, row))  # (user, service), time order kept within
    r, s = row[by_svc], svc[by_svc]
    opens = np.r_[True, (r[1:] != r[:-1]) | (s[1:] != s[:-1])] if n else np.zeros(0, bool)
    src = by_svc[_forward_fill(~(repeat[by_svc] & ~opens))] if n else by_svc
    item[by_svc], topic[by_svc] = item[src], topic[src]
    return _event_table(cfg, cat, users, lo, hi, row, svc, item, ts), row, svc, topic


def _future_labels(cfg: SynthConfig, users: _Users, lo: int, n: int, row: np.ndarray, svc: np.ndarray,
                   topic: np.ndarray) -> pa.Table:
    """Behaviour labels from the future window: buy_<dept>, next_service, n_future_events."""
    cols: dict[str, pa.Array] = {"user_id": users.user_id.slice(lo, n)}
    bought = np.zeros((n, len(DEPARTMENTS)), bool)
    if "shopping" in cfg.services:
        shop = svc == cfg.services.index("shopping")
        bought[row[shop], topic[shop]] = True
    for d, dept in enumerate(DEPARTMENTS):
        cols[f"buy_{dept.lower()}"] = pa.array(bought[:, d])
    n_fut = np.bincount(row, minlength=n)
    has = n_fut > 0
    nxt = np.zeros(n, np.int64)
    nxt[has] = svc[(np.cumsum(n_fut) - n_fut)[has]]  # rows are sorted by user, then time: first = next
    cols["next_service"] = pa.array(cfg.services, pa.string()).take(pa.array(nxt, mask=~has))
    cols["n_future_events"] = pa.array(n_fut.astype(np.int64))
    return pa.table(cols)


def _periods(cfg: SynthConfig) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    start = _parse_start(cfg.start)
    cutoff = start + dt.timedelta(days=cfg.days)
    return start, cutoff, cutoff + dt.timedelta(days=cfg.future_days)


def _iter_chunks(cfg: SynthConfig, cat: _Catalog, users: _Users) -> Iterator[tuple]:
    """Per chunk of ``users_per_file`` users: (events, future_events, future_labels, per-service counts
    of events, of future events)."""
    start, cutoff, _ = _periods(cfg)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    t0, t1 = ((t - epoch) // dt.timedelta(microseconds=1) for t in (start, cutoff))
    n_svc = len(cfg.services)
    for c, lo in enumerate(range(0, cfg.n_users, cfg.users_per_file)):
        hi = min(lo + cfg.users_per_file, cfg.n_users)
        rng = _rng(cfg, 2, c)
        hist, _, hsvc, _ = _events(cfg, cat, users, lo, users.n_hist[lo:hi], rng, t0, start.weekday(), cfg.days)
        fut, row, fsvc, topic = _events(cfg, cat, users, lo, users.n_fut[lo:hi], rng, t1, cutoff.weekday(),
                                        cfg.future_days)
        labels = _future_labels(cfg, users, lo, hi - lo, row, fsvc, topic)
        yield hist, fut, labels, np.bincount(hsvc, minlength=n_svc), np.bincount(fsvc, minlength=n_svc)


# ---------------------------------------------------------------------------------------------
# Tables and ground truth.
# ---------------------------------------------------------------------------------------------


def _attribute_tables(cfg: SynthConfig, users: _Users) -> tuple[pa.Table, pa.Table]:
    """(attributes = observed noisy labels, latent = persona and noise-free labels)."""

    segments = np.array(attribute_classes(cfg)["segment"], dtype=object)

    def labels(y: dict[str, np.ndarray]) -> dict[str, pa.Array]:
        return {
            "age_bracket": pa.array(np.array(AGE_BRACKETS, dtype=object)[y["age_bracket"]], pa.string()),
            "is_parent": pa.array(y["is_parent"].astype(bool)),
            "segment": pa.array(segments[y["segment"]], pa.string()),
        }

    attributes = pa.table({"user_id": users.user_id, **labels(users.observed)})
    n_topics, n_svc = len(TOPICS), len(cfg.services)
    latent = pa.table(
        {
            "user_id": users.user_id,
            **labels(users.true),
            "persona": pa.FixedSizeListArray.from_arrays(pa.array(users.persona.ravel()), n_topics),
            "service_mix": pa.FixedSizeListArray.from_arrays(pa.array(users.service_w.ravel()), n_svc),
            "activity_rate": pa.array(users.rate),
            "n_events": pa.array(users.n_hist.astype(np.int64)),
            "n_future_events": pa.array(users.n_fut.astype(np.int64)),
        }
    )
    if cfg.mode == "latent":
        latent = latent.append_column("topic_persistence", pa.array(users.persist)).append_column(
            "routine", pa.array(users.routine))
        if users.taste is not None:
            latent = latent.append_column("taste", pa.array(users.taste.astype(np.int64)))
    return attributes, latent


def _oracle(cfg: SynthConfig, users: _Users) -> dict[str, dict[str, Any]]:
    """Per attribute: class priors, and accuracy of the Bayes-optimal predictor that knows the persona."""
    eps = cfg.label_noise
    if cfg.mode == "latent":
        p_age, p1 = latent_posteriors(cfg, users.persona, users.persist, users.routine, users.taste)
        n_life = len(LIFESTYLES)
        # hours reveal the lifestyle given enough events when time_signal > 0; else nothing does
        p_seg = np.eye(n_life)[users.lifestyle] if cfg.time_signal > 0 else np.full((cfg.n_users, n_life), 1 / n_life)
        post = {"age_bracket": p_age, "is_parent": np.stack([1.0 - p1, p1], axis=1), "segment": p_seg}
        pm, rm = persist_mean(cfg), routine_mean(cfg)
        model = {
            "age_bracket": {"prior": AGE_PRIOR.tolist(),
                            "dirichlet_alpha": _age_alpha(cfg.topic_concentration, cfg.word_signal).tolist(),
                            "persistence_beta_mean": pm.tolist(), "persistence_beta_concentration": PERSIST_CONC,
                            "taste_given_age": taste_given_age().tolist(), "item_signal": cfg.item_signal,
                            "rule": "theta ~ Dirichlet(dirichlet_alpha[age]); persistence ~ Beta(mean[age], conc); "
                                    "each event keeps the previous event's topic with prob persistence; "
                                    "taste ~ taste_given_age[age]; a shopping/news event takes a uniform item of "
                                    "its topic from the taste set (catalog column taste) with prob item_signal"},
            "is_parent": {"bias": PARENT_BIAS, "topic_weights": (cfg.word_signal * PARENT_W).tolist(),
                          "age_effect": PARENT_AGE.tolist(), "routine_beta_mean": rm.tolist(),
                          "routine_beta_concentration": ROUTINE_CONC, "routine_weekend": ROUTINE_WEEKEND,
                          "routine_repeat": ROUTINE_REPEAT,
                          "rule": "P(parent) = sigmoid(bias + topic_weights . theta + age_effect[age]); routine ~ "
                                  "Beta(mean[parent], conc); an event falls on a weekend day with prob "
                                  "routine_weekend * routine and repeats the user's previous item on that service "
                                  "with prob routine_repeat * routine"},
            "segment": {"rule": "segment = lifestyle ~ Uniform; an event's hour follows the lifestyle's hour "
                                "profile with prob time_signal, else the service's",
                        "hour_profiles": {k: v.tolist() for k, v in LIFESTYLE_HOURS.items()}},
        }
    else:
        p1 = parent_posterior(users.persona, cfg.topic_concentration)
        post = {
            "age_bracket": age_posterior(users.persona, cfg.topic_concentration),
            "is_parent": np.stack([1.0 - p1, p1], axis=1),
            "segment": np.eye(len(TOPICS))[users.persona.argmax(axis=1)],  # segment is a function of persona
        }
        model = {
            "age_bracket": {"prior": AGE_PRIOR.tolist(), "dirichlet_alpha": (cfg.topic_concentration * AGE_TILT).tolist(),
                            "rule": "theta ~ Dirichlet(dirichlet_alpha[age])"},
            "is_parent": {"bias": PARENT_BIAS, "topic_weights": PARENT_W.tolist(), "age_effect": PARENT_AGE.tolist(),
                          "rule": "P(parent) = sigmoid(bias + topic_weights . theta + age_effect[age])"},
            "segment": {"rule": "segment = argmax theta"},
        }
    out = {}
    for name, classes in attribute_classes(cfg).items():
        k = len(classes)
        p = post[name]  # (n, k) P(true class | persona)
        pred = p.argmax(axis=1)
        p_pred = p[np.arange(p.shape[0]), pred]
        obs, true = users.observed[name], users.true[name]
        out[name] = {
            "classes": list(classes),
            "num_classes": k,
            "prior": (np.bincount(true, minlength=k) / len(true)).tolist(),
            "observed_prior": (np.bincount(obs, minlength=k) / len(obs)).tolist(),
            "majority_accuracy": float(np.bincount(obs, minlength=k).max() / len(obs)),
            "oracle_accuracy": float(np.mean(pred == obs)),
            "oracle_accuracy_noise_free": float(np.mean(pred == true)),
            # E[accuracy against noisy labels | persona], averaged over users: no sampling noise of labels.
            "oracle_accuracy_expected": float(np.mean((1 - eps) * p_pred + eps / (k - 1) * (1 - p_pred))),
            "observed_noise_rate": float(np.mean(obs != true)),
            "model": model[name],
        }
    return out


def _ground_truth(cfg: SynthConfig, cat: _Catalog, users: _Users, svc_counts: dict, fut_svc_counts: dict,
                  label_rates: dict) -> dict[str, Any]:
    start, cutoff, end = _periods(cfg)
    n = users.n_hist
    return {
        "generator": "userfm.synth",
        "schema_version": SCHEMA_VERSION,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "period": {"start": start.isoformat(), "cutoff": cutoff.isoformat(), "end": end.isoformat(),
                   "history_days": cfg.days, "future_days": cfg.future_days},
        "topics": [{"name": t["name"], "department": t["department"], "news_section": t["section"]}
                   for t in _TOPIC_SPECS],
        "services": list(cfg.services),
        "label_noise": cfg.label_noise,
        "mode": cfg.mode,
        # where each attribute's signal lives (latent mode), so a reader knows which model should see it
        "channels": ({"age_bracket": ["topic mix (word_signal)", "topic persistence = event order (order_signal)",
                                      "taste set = item identity, not words (item_signal)"],
                      "is_parent": ["topic mix (word_signal)", "weekend share + repeated items (routine_signal)"],
                      "segment": ["hour of day on every service (time_signal)"]}
                     if cfg.mode == "latent" else
                     {"age_bracket": ["topic mix"], "is_parent": ["topic mix"], "segment": ["topic mix (argmax)"]}),
        "attributes": _oracle(cfg, users),
        "activity": {
            "n_users": cfg.n_users,
            "n_events": int(n.sum()),
            "n_future_events": int(users.n_fut.sum()),
            "mean_events_per_user": float(n.mean()),
            "median_events_per_user": float(np.median(n)),
            "max_events_per_user": int(n.max()),
            "frac_users_le_5_events": float(np.mean(n <= 5)),
            "frac_users_ge_100_events": float(np.mean(n >= 100)),
            "frac_single_service_users": float(np.mean(users.service_w.max(axis=1) == 1.0)),
            "events_per_service": svc_counts,
            "future_events_per_service": fut_svc_counts,
        },
        "future_labels": {"positive_rate": label_rates},
        "catalog": {"items_per_service": {s: int(cat.size[i]) * len(TOPICS) for i, s in enumerate(cfg.services)}},
        "rhythm": {"hour_of_day_utc": {s: HOUR_PROFILE[s].tolist() for s in cfg.services},
                   "weekday_mon_first": {s: WEEKDAY_PROFILE[s].tolist() for s in cfg.services}},
    }


def _run(cfg: SynthConfig, sink: Callable[[int, pa.Table, pa.Table], None],
         progress: Callable[[str], None] | None) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Generate everything; hand each chunk's (events, future_events) to ``sink``; return the
    user-level tables and the ground truth."""
    say = progress or (lambda _msg: None)
    cat = _build_catalog(cfg)
    users = _make_users(cfg)
    say(f"catalog {cat.table.num_rows} items; {cfg.n_users} users, {int(users.n_hist.sum())} history events")
    svc_counts = np.zeros(len(cfg.services), np.int64)
    fut_counts = np.zeros(len(cfg.services), np.int64)
    labels = []
    n_chunks = -(-cfg.n_users // cfg.users_per_file)
    for c, (hist, fut, lab, h_cnt, f_cnt) in enumerate(_iter_chunks(cfg, cat, users)):
        svc_counts += h_cnt
        fut_counts += f_cnt
        labels.append(lab)
        sink(c, hist, fut)
        say(f"chunk {c + 1}/{n_chunks}: {hist.num_rows} events, {fut.num_rows} future events")
    svc_counts = dict(zip(cfg.services, svc_counts.tolist()))
    fut_counts = dict(zip(cfg.services, fut_counts.tolist()))
    future_labels = pa.concat_tables(labels)
    rates = {name: float(np.mean(future_labels.column(name).to_numpy(zero_copy_only=False)))
             for name in future_labels.column_names if name.startswith("buy_")}
    rates["has_future_event"] = float(np.mean(users.n_fut > 0))
    attributes, latent = _attribute_tables(cfg, users)
    gt = _ground_truth(cfg, cat, users, svc_counts, fut_counts, rates)
    small = {"attributes": attributes, "future_labels": future_labels, "latent": latent, "catalog": cat.table}
    return small, gt


def generate_tables(cfg: SynthConfig) -> dict[str, Any]:
    """Generate the whole dataset in memory (for tests and small experiments).

    Returns a dict with the tables ``events``, ``future_events`` (EVENT_SCHEMA), ``attributes``,
    ``future_labels``, ``latent``, ``catalog`` (``pa.Table``), and ``ground_truth`` (the dict that
    :func:`generate` writes as ``ground_truth.json``, without its ``files`` entry). The tables are
    identical to the concatenation of the files :func:`generate` writes for the same config.
    """
    hist, fut = [], []
    small, gt = _run(cfg, lambda _c, h, f: (hist.append(h), fut.append(f)), None)
    return {"events": pa.concat_tables(hist), "future_events": pa.concat_tables(fut), **small, "ground_truth": gt}


def generate(cfg: SynthConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """Write the dataset under ``out_dir``, return the ground-truth dict (also ``ground_truth.json``).

    Ground-truth keys: ``generator``, ``schema_version``, ``seed``, ``config``, ``period`` (start, cutoff,
    end, history_days, future_days), ``topics`` (name, department, news_section), ``services``,
    ``label_noise``, ``attributes`` (per attribute: classes, num_classes, prior, observed_prior,
    majority_accuracy, oracle_accuracy, oracle_accuracy_noise_free, oracle_accuracy_expected,
    observed_noise_rate, model), ``activity`` (n_users, n_events, n_future_events, mean/median/max events
    per user, frac_users_le_5_events, frac_users_ge_100_events, frac_single_service_users,
    events_per_service, future_events_per_service), ``future_labels`` (positive_rate), ``catalog``,
    ``rhythm`` (hour and weekday profiles per service), ``files`` (paths relative to ``out_dir``).
    """
    out = Path(out_dir)
    for sub in ("events", "future_events"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("part-*.parquet"):  # a rerun with fewer chunks must not leave strays
            old.unlink()
    files: dict[str, list[str]] = {"events": [], "future_events": []}

    def sink(c: int, hist: pa.Table, fut: pa.Table) -> None:
        for sub, t in (("events", hist), ("future_events", fut)):
            rel = f"{sub}/part-{c:05d}.parquet"
            # Non-"compliant" list naming keeps the list child called "item", so the file's schema reads
            # back exactly as EVENT_SCHEMA (the compliant name "element" differs under check_metadata).
            pq.write_table(t, out / rel, use_compliant_nested_type=False)
            files[sub].append(rel)

    small, gt = _run(cfg, sink, progress)
    for name, table in small.items():
        pq.write_table(table, out / f"{name}.parquet", use_compliant_nested_type=False)
        files[name] = [f"{name}.parquet"]
    gt["files"] = files
    (out / "ground_truth.json").write_text(json.dumps(gt, indent=2, sort_keys=True) + "\n")
    return gt
