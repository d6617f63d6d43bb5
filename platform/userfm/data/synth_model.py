"""The synthetic generator's model of users (``userfm.data.synth``): its config (``SynthConfig``), the
attribute, service and latent-mode parameters, the users' draws, and the exact posteriors that give the
Bayes-optimal answers (the oracle)."""


from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from userfm.data.synth_world import KNOWN_SERVICES, TOPICS


# --- attribute model (the known answers) ---------------------------------------------------------
AGE_BRACKETS: tuple[str, ...] = ("18-24", "25-34", "35-54", "55+")
AGE_PRIOR = np.array([0.2, 0.3, 0.3, 0.2])
# Multiplier on the Dirichlet concentration of each topic, per age bracket (rows follow AGE_BRACKETS,
# columns follow TOPICS). A tiny concentration makes a topic nearly absent, so age leaves a footprint
# in behaviour that a model can pick up, but not a deterministic one.
#                     spo  coo  tec  fas  tra  mus  gam  gar  fin  pet  boo  fit
AGE_TILT = np.array([[1.5, 0.5, 1.5, 2.0, 1.0, 2.5, 3.0, 0.2, 0.3, 0.7, 0.7, 1.5],
                     [1.2, 1.0, 1.5, 1.5, 1.5, 1.2, 1.2, 0.5, 1.0, 1.0, 0.8, 1.8],
                     [1.0, 1.8, 1.0, 0.8, 1.2, 0.7, 0.5, 1.5, 1.5, 1.2, 1.0, 1.0],
                     [0.6, 1.8, 0.5, 0.6, 1.5, 0.6, 0.2, 3.0, 1.8, 1.2, 2.0, 0.5]])
# is_parent ~ Bernoulli(sigmoid(PARENT_BIAS + PARENT_W . theta + PARENT_AGE[age])).
PARENT_BIAS = -0.3
PARENT_W = np.array([0.0, 3.5, -0.5, -1.5, -2.0, -1.5, -2.0, 3.0, 1.0, 2.0, 0.5, -0.5])
PARENT_AGE = np.array([-2.5, 0.0, 1.0, -0.5])

# --- service model ---------------------------------------------------------------------------------
SERVICE_POPULARITY = {"shopping": 0.4, "search": 0.35, "news": 0.25}  # share of users / events


def _bumps(*peaks: tuple[float, float, float], base: float) -> np.ndarray:
    """24 hour-of-day weights: ``base`` plus circular Gaussian bumps ``(hour, width_h, height)``."""
    h = np.arange(24.0)
    w = np.full(24, base)
    for mu, sd, amp in peaks:
        d = np.minimum(np.abs(h - mu), 24 - np.abs(h - mu))
        w += amp * np.exp(-0.5 * (d / sd) ** 2)
    return w / w.sum()


# Hour-of-day (UTC) and weekday (Mon..Sun) rhythms, normalised to probabilities.
HOUR_PROFILE = {
    "shopping": _bumps((12.5, 1.5, 0.5), (20.5, 2.0, 1.0), base=0.05),
    "search": _bumps((10.0, 2.5, 0.7), (15.0, 2.5, 0.6), (21.0, 2.0, 0.6), base=0.05),
    "news": _bumps((7.5, 1.2, 1.0), (12.5, 1.2, 0.6), (19.0, 2.0, 0.5), base=0.05),
}
_WEEKDAY = {
    "shopping": [0.9, 0.9, 0.9, 1.0, 1.1, 1.5, 1.4],
    "search": [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9],
    "news": [1.2, 1.1, 1.1, 1.1, 1.0, 0.7, 0.8],
}
WEEKDAY_PROFILE = {s: np.array(w) / np.sum(w) for s, w in _WEEKDAY.items()}

# --- latent mode: structure that a bag of words does not expose --------------------------------------
MODES = ("latent", "topics")
# segment (latent mode) = a lifestyle: when in the day the user is active, on every service alike.
LIFESTYLES: tuple[str, ...] = ("early_bird", "commuter", "lunch_break", "evening", "night_owl", "all_day")
LIFESTYLE_HOURS = {
    "early_bird": _bumps((6.5, 1.0, 1.0), base=0.02),
    "commuter": _bumps((8.0, 0.8, 1.0), (18.0, 0.8, 1.0), base=0.02),
    "lunch_break": _bumps((12.5, 0.8, 1.0), base=0.02),
    "evening": _bumps((20.5, 1.0, 1.0), base=0.02),
    "night_owl": _bumps((1.5, 1.2, 1.0), base=0.02),
    "all_day": _bumps((9.0, 3.0, 0.3), (15.0, 3.0, 0.3), (21.0, 3.0, 0.3), base=0.02),
}
# Topic persistence (probability an event stays on the previous event's topic) ~ Beta with this mean
# per age bracket (young users hop between interests, older ones stay): an order-only signal, since the
# stationary topic mix of the chain is still theta.
PERSIST_MEAN = np.array([0.1, 0.35, 0.6, 0.85])
PERSIST_CONC = 12.0
# Routine (parents: weekend-heavy, re-buying the same items) ~ Beta with this mean for (non-parent, parent).
ROUTINE_MEAN = np.array([0.15, 0.6])
ROUTINE_CONC = 8.0
ROUTINE_WEEKEND = 0.6  # share of a routine=1 user's events moved onto weekend days
ROUTINE_REPEAT = 0.6  # probability a routine=1 user's event repeats their previous item on that service
# Taste (item identity): every user has a taste class in 0..3, equal to their age bracket with prob
# TASTE_MATCH and uniform otherwise (so P(taste = age) = TASTE_MATCH + (1 - TASTE_MATCH) / 4). With prob
# item_signal a shopping or news event takes a uniformly drawn item of its topic from the user's taste set.
# An item's taste class is a function of two words that are never adjacent in its title, (brand + size)
# mod 4 for products (first 4 brands x first 4 sizes; other products belong to no taste set) and
# (subject + suffix) mod 4 for headlines, chosen so that every unigram and every bigram occurs equally
# often in each class's set: the set is visible to a model of whole items (or of item co-occurrence),
# not to a bag of words or bigrams.
TASTE_CLASSES = 4
TASTE_MATCH = 0.6
TASTE_SERVICES = ("shopping", "news")

_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Config of :func:`generate`; YAML keys in ``experiments/synth/*.yaml`` are these field names."""

    n_users: int = 2000  # users
    events_per_user: float = 30.0  # mean history events per user (heavy-tailed, every user has >= 1)
    start: str = "2024-01-01"  # ISO date (UTC midnight) where the history period begins
    days: int = 180  # history period length in days; cutoff = start + days
    future_days: int = 30  # length in days of the future window [cutoff, cutoff + future_days)
    label_noise: float = 0.1  # probability an observed attribute is a uniformly random other class
    services: tuple[str, ...] = ("shopping", "search", "news")  # any non-empty subset of KNOWN_SERVICES
    seed: int = 0  # master seed; every random stream derives from it
    users_per_file: int = 50_000  # users per chunk = per Parquet part file (bounds memory)
    activity_sigma: float = 1.4  # lognormal sigma (log-scale sd) of per-user activity; larger = heavier tail
    max_events_per_user: int = 5000  # cap on a user's expected history events (keeps chunks bounded)
    topic_concentration: float = 0.3  # Dirichlet concentration per topic before the age tilt; small = focused users
    topic_noise: float = 0.1  # probability an event's topic is uniform instead of drawn from the persona
    single_service_frac: float = 0.3  # fraction of users active on one service only
    service_concentration: float = 2.0  # Dirichlet concentration (x popularity) of multi-service users' mix
    products_per_topic: int = 400  # products in the catalog per topic
    queries_per_topic: int = 150  # distinct search queries per topic (capped by the vocabulary)
    articles_per_topic: int = 200  # news articles per topic (capped by the vocabulary)
    item_zipf: float = 1.0  # Zipf exponent of item popularity within a topic (0 = uniform)
    # Which generative story (module docstring). "latent" (default): attributes live mostly in when,
    # in what order and how repetitively users act, on every service alike; words carry a weak share.
    # "topics": the original story, where the attributes act only through the topic (= word) mix, so a
    # bag of words is nearly the sufficient statistic.
    mode: str = "latent"
    word_signal: float = 0.3  # latent: attribute -> topic link in [0, 1] (exponent on the age tilt, scale on parent weights; 1 = topics mode)
    time_signal: float = 0.7  # latent: probability an event's hour follows the user's lifestyle (= segment) profile rather than the service's
    order_signal: float = 1.0  # latent: in [0, 1], spread of the age brackets' topic-persistence means around their average (0 = no order signal)
    routine_signal: float = 1.0  # latent: in [0, 1], spread of parents' vs non-parents' routine means (weekend share, repeat purchases)
    item_signal: float = 0.5  # latent: probability a shopping/news event's item comes from the user's taste set (taste ~ age; 0 = off)

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {self.n_users}")
        if not self.events_per_user > 0:
            raise ValueError(f"events_per_user must be > 0, got {self.events_per_user}")
        if self.days < 1 or self.future_days < 0:
            raise ValueError(f"days must be >= 1 and future_days >= 0, got {self.days}, {self.future_days}")
        # Below 0.5 the noisy label stays most likely equal to the true one for every class count, so
        # the Bayes-optimal predictor of the observed label is the one of the true label.
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if not self.services or len(set(self.services)) != len(self.services):
            raise ValueError(f"services must be a non-empty list without repeats, got {self.services}")
        unknown = [s for s in self.services if s not in KNOWN_SERVICES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {list(KNOWN_SERVICES)}")
        _parse_start(self.start)
        for name in ("users_per_file", "max_events_per_user", "products_per_topic", "queries_per_topic",
                     "articles_per_topic"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("topic_noise", "single_service_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.activity_sigma < 0 or self.topic_concentration <= 0 or self.service_concentration <= 0:
            raise ValueError("activity_sigma must be >= 0; topic_concentration, service_concentration > 0")
        if self.item_zipf < 0:
            raise ValueError(f"item_zipf must be >= 0, got {self.item_zipf}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        for name in ("word_signal", "time_signal", "order_signal", "routine_signal", "item_signal"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def _parse_start(start: str) -> dt.datetime:
    try:
        d = dt.date.fromisoformat(str(start))
    except ValueError as exc:
        raise ValueError(f"start must be an ISO date like 2024-01-01, got {start!r}") from exc
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc)


def _rng(cfg: SynthConfig, *key: int) -> np.random.Generator:
    """An independent stream per purpose: (0,) catalog, (1,) users, (2, chunk) events of a chunk."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


# ---------------------------------------------------------------------------------------------
# Users: persona, attributes, service mix, activity. Global (n_users x 12 floats), cheap.
# ---------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _noisy(rng: np.random.Generator, y: np.ndarray, k: int, eps: float) -> np.ndarray:
    """Replace each label, with probability ``eps``, by a uniformly random *other* class of ``k``."""
    flip = rng.random(y.shape[0]) < eps
    shift = rng.integers(1, k, y.shape[0])
    return np.where(flip, (y + shift) % k, y)


def _age_alpha(topic_concentration: float, word_signal: float = 1.0) -> np.ndarray:
    """Dirichlet parameters of the persona per age bracket, (n_ages, n_topics)."""
    return topic_concentration * AGE_TILT ** word_signal


def _log_dirichlet(persona: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log Dirichlet(persona | alpha[k]) for every user and row k of ``alpha``: (n_users, n_rows)."""
    log_norm = np.array([math.lgamma(a.sum()) - sum(math.lgamma(x) for x in a) for a in alpha])
    log_theta = np.log(np.clip(persona, 1e-300, None))
    return log_theta @ (alpha - 1.0).T + log_norm


def _log_beta(x: np.ndarray, mean: np.ndarray, conc: float) -> np.ndarray:
    """log Beta(x | mean[k] * conc, (1 - mean[k]) * conc) for every x and k: (len(x), len(mean))."""
    a, b = mean * conc, (1.0 - mean) * conc
    norm = np.array([math.lgamma(aa + bb) - math.lgamma(aa) - math.lgamma(bb) for aa, bb in zip(a, b)])
    x = np.clip(x, 1e-12, 1 - 1e-12)[:, None]
    return (a - 1) * np.log(x) + (b - 1) * np.log1p(-x) + norm


def _normalize_log(loglik: np.ndarray) -> np.ndarray:
    loglik = loglik - loglik.max(axis=-1, keepdims=True)
    p = np.exp(loglik)
    return p / p.sum(axis=-1, keepdims=True)


def age_posterior(persona: np.ndarray, topic_concentration: float, word_signal: float = 1.0) -> np.ndarray:
    """P(age bracket | persona) under the topics-mode model, shape (n_users, len(AGE_BRACKETS)).

    Args:
        persona: (n_users, n_topics) topic mixtures (rows sum to 1).
        topic_concentration: ``SynthConfig.topic_concentration``.
        word_signal: exponent on the age tilt (1 in topics mode).
    """
    loglik = _log_dirichlet(persona, _age_alpha(topic_concentration, word_signal)) + np.log(AGE_PRIOR)
    return _normalize_log(loglik)


def _parent_given_age(persona: np.ndarray, word_signal: float = 1.0) -> np.ndarray:
    """P(is_parent | persona, age) for every age bracket: (n_users, n_ages)."""
    return _sigmoid(PARENT_BIAS + word_signal * (persona @ PARENT_W)[:, None] + PARENT_AGE[None, :])


def parent_posterior(persona: np.ndarray, topic_concentration: float) -> np.ndarray:
    """P(is_parent | persona), shape (n_users,): the age-conditional logistic marginalised over age."""
    p_age = age_posterior(persona, topic_concentration)
    return (p_age * _parent_given_age(persona)).sum(axis=1)


def persist_mean(cfg: "SynthConfig") -> np.ndarray:
    """Mean topic persistence per age bracket (latent mode): PERSIST_MEAN pulled to its average by order_signal."""
    avg = float(PERSIST_MEAN.mean())
    return avg + cfg.order_signal * (PERSIST_MEAN - avg)


def routine_mean(cfg: "SynthConfig") -> np.ndarray:
    """Mean routine of (non-parents, parents) (latent mode), pulled to their average by routine_signal."""
    avg = float(ROUTINE_MEAN.mean())
    return avg + cfg.routine_signal * (ROUTINE_MEAN - avg)


def taste_given_age() -> np.ndarray:
    """P(taste | age bracket), (n_ages, TASTE_CLASSES): TASTE_MATCH on the diagonal plus uniform."""
    return TASTE_MATCH * np.eye(len(AGE_BRACKETS), TASTE_CLASSES) + (1 - TASTE_MATCH) / TASTE_CLASSES


def latent_posteriors(cfg: "SynthConfig", persona: np.ndarray, persist: np.ndarray,
                      routine: np.ndarray, taste: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latent mode: (P(age | latents) (n, n_ages), P(parent | latents) (n,)) for a model that knows every
    latent the logs are drawn from (persona, topic persistence, routine, taste), by exact enumeration of the
    joint P(age, parent | latents) ∝ P(age) Dir(persona | age) Beta(persist | age) P(taste | age)
    P(parent | persona, age) Beta(routine | parent). A channel whose signal is 0 leaves no trace in the
    logs and is left out."""
    log_age = np.log(AGE_PRIOR) + _log_dirichlet(persona, _age_alpha(cfg.topic_concentration, cfg.word_signal))
    if cfg.order_signal > 0:
        log_age = log_age + _log_beta(persist, persist_mean(cfg), PERSIST_CONC)
    if cfg.item_signal > 0 and taste is not None:
        log_age = log_age + np.log(taste_given_age()).T[taste]
    pa_ = _parent_given_age(persona, cfg.word_signal)  # (n, n_ages)
    log_routine = _log_beta(routine, routine_mean(cfg), ROUTINE_CONC) if cfg.routine_signal > 0 else np.zeros((len(routine), 2))
    # joint (n, n_ages, 2): parent = 0 / 1
    joint = log_age[:, :, None] + np.stack([np.log1p(-pa_), np.log(pa_)], axis=2) + log_routine[:, None, :]
    flat = _normalize_log(joint.reshape(len(persona), -1)).reshape(joint.shape)
    return flat.sum(axis=2), flat[:, :, 1].sum(axis=1)


@dataclass(frozen=True)
class _Users:
    user_id: pa.Array  # (n,) strings "u0000001"...
    persona: np.ndarray  # (n, n_topics)
    true: dict[str, np.ndarray]  # attribute -> (n,) int class index, noise-free
    observed: dict[str, np.ndarray]  # attribute -> (n,) int class index, after label noise
    service_w: np.ndarray  # (n, n_services) service mix, rows sum to 1
    rate: np.ndarray  # (n,) expected history events
    n_hist: np.ndarray  # (n,) history events
    n_fut: np.ndarray  # (n,) future-window events
    lifestyle: np.ndarray | None = None  # latent mode: (n,) index into LIFESTYLES (= the true segment)
    persist: np.ndarray | None = None  # latent mode: (n,) topic persistence in [0, 1]
    routine: np.ndarray | None = None  # latent mode: (n,) routine in [0, 1]
    taste: np.ndarray | None = None  # latent mode with item_signal > 0: (n,) taste class in 0..TASTE_CLASSES-1


ATTRIBUTE_CLASSES: dict[str, tuple] = {"age_bracket": AGE_BRACKETS, "is_parent": (False, True), "segment": TOPICS}


def attribute_classes(cfg: "SynthConfig") -> dict[str, tuple]:
    """Class names of each attribute; the segment is a topic (topics mode) or a lifestyle (latent mode)."""
    return {**ATTRIBUTE_CLASSES, "segment": TOPICS if cfg.mode == "topics" else LIFESTYLES}


def _make_users(cfg: SynthConfig) -> _Users:
    rng = _rng(cfg, 1)
    n, n_topics = cfg.n_users, len(TOPICS)
    width = max(7, len(str(n)))
    user_id = pa.array([f"u{i:0{width}d}" for i in range(1, n + 1)], pa.string())

    latent = cfg.mode == "latent"
    ws = cfg.word_signal if latent else 1.0
    age = rng.choice(len(AGE_BRACKETS), size=n, p=AGE_PRIOR)
    g = rng.standard_gamma(_age_alpha(cfg.topic_concentration, ws)[age])  # (n, n_topics) -> Dirichlet rows
    persona = g / g.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(persona).all(axis=1)  # all gammas underflowed to 0 (vanishingly rare)
    persona[bad] = 1.0 / n_topics
    parent = rng.random(n) < _sigmoid(PARENT_BIAS + ws * (persona @ PARENT_W) + PARENT_AGE[age])
    lifestyle = persist = routine = None
    if latent:
        lifestyle = rng.integers(0, len(LIFESTYLES), n)
        m = persist_mean(cfg)[age]
        persist = rng.beta(m * PERSIST_CONC, (1 - m) * PERSIST_CONC)
        m = routine_mean(cfg)[parent.astype(np.int64)]
        routine = rng.beta(m * ROUTINE_CONC, (1 - m) * ROUTINE_CONC)
    segment = lifestyle if latent else persona.argmax(axis=1)
    true = {"age_bracket": age, "is_parent": parent.astype(np.int64), "segment": segment}
    classes = attribute_classes(cfg)
    observed = {k: _noisy(rng, v, len(classes[k]), cfg.label_noise) for k, v in true.items()}

    n_svc = len(cfg.services)
    pop = np.array([SERVICE_POPULARITY[s] for s in cfg.services])
    pop /= pop.sum()
    service_w = rng.standard_gamma(cfg.service_concentration * np.broadcast_to(pop, (n, n_svc)))
    service_w /= np.clip(service_w.sum(axis=1, keepdims=True), 1e-300, None)
    single = rng.random(n) < cfg.single_service_frac
    only = rng.choice(n_svc, size=n, p=pop)
    service_w[single] = np.eye(n_svc)[only[single]]
    service_w[~np.isfinite(service_w).all(axis=1)] = pop

    # Heavy-tailed activity: lognormal, rescaled so these users' mean rate is exactly events_per_user
    # (a heavy tail makes the sample mean of a few thousand users wander ~5% otherwise).
    x = rng.lognormal(0.0, cfg.activity_sigma, n)
    rate = np.minimum(cfg.events_per_user * x / x.mean(), cfg.max_events_per_user)
    n_hist = np.maximum(rng.poisson(rate), 1)
    n_fut = rng.poisson(rate * cfg.future_days / cfg.days)
    taste = None
    if latent and cfg.item_signal > 0:  # drawn last, so item_signal = 0 leaves every other draw as it was
        taste = _sample_rows(rng, np.arange(n), taste_given_age()[age])
    return _Users(user_id, persona, true, observed, service_w, rate, n_hist, n_fut, lifestyle, persist, routine,
                  taste)


def _sample_rows(rng: np.random.Generator, row: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per event from its user's row of ``probs`` (n_rows, k), no (n_events, k) array.

    Rows' CDFs are laid end to end, each shifted by its row index, so a single ``searchsorted`` of
    ``row + u`` over the flat, non-decreasing array finds every draw at once.
    """
    k = probs.shape[1]
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(probs.shape[0])[:, None]).ravel()
    idx = np.searchsorted(flat, row + rng.random(row.shape[0]), side="right") - row * k
    return np.minimum(idx, k - 1)
