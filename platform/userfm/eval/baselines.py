"""The yardsticks that need no pretraining, as evaluate runs them: popularity, item-kNN and SASRec ranks,
TF-IDF, bag-of-items, mean-MiniLM, concat features, and ShopperBERT's T-Trans trained from scratch."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from userfm.eval import metrics as M
from userfm.eval.embeddings import EmbeddingTable
from userfm.eval.heads import _fit_sklearn_linear, _standardize_stats, retrieval_ranks
from userfm.eval.task_data import TaskData
from userfm.eval.tasks import EvalConfig, MINILM_MEAN, _num


def _item_counts(td: TaskData) -> np.ndarray:
    """(n_items,) float64 item counts over the training users' events, held-out ones included."""
    return np.bincount(np.concatenate([*td.history["train"], td.y["train"]]).astype(np.int64),
                       minlength=len(td.classes)).astype(np.float64)


def _popularity_ranks(td: TaskData, seen: list[np.ndarray] | None,
                      remove_seen: bool = False) -> tuple[np.ndarray, float, float]:
    """Popularity baseline: item counts over training users' events (held-out ones included) -> test ranks.

    ``remove_seen``: the scorer itself drops each user's history items (score -inf, so a held-out repeat
    ranks last); ``seen`` is the protocol's masking (the target never masked), applied to every model.
    """
    t0 = time.perf_counter()
    n_items = len(td.classes)
    pop = _item_counts(td)
    t1 = time.perf_counter()
    hist = td.history["test"]

    def score(rows):
        s = np.repeat(pop[None, :], len(rows), axis=0)
        if remove_seen:
            for j, r in enumerate(rows):
                s[j, hist[r]] = -np.inf
        return s

    ranks = retrieval_ranks(score, len(td.y["test"]), td.y["test"], seen)
    return ranks, t1 - t0, time.perf_counter() - t1


def _sasrec_ranks(td: TaskData, seen: list[np.ndarray] | None, cfg: EvalConfig) -> tuple[np.ndarray, float, float, dict]:
    """SASRec from scratch (``userfm.eval.sasrec``) on the training users' sequences (held-out item last; every window),
    early-stopped on the val users' held-out items -> (test ranks, fit s, infer s, info)."""
    from userfm.eval.sasrec import SASRecConfig, fit_sasrec, sasrec_scorer

    t0 = time.perf_counter()
    scfg = SASRecConfig(max_len=cfg.sasrec_max_len, dim=cfg.sasrec_dim, layers=cfg.sasrec_layers,
                        max_epochs=cfg.sasrec_max_epochs, patience=cfg.sasrec_patience, select=cfg.sasrec_select,
                        windows=cfg.sasrec_windows, seed=cfg.seed)
    model, info = fit_sasrec([np.append(h, y) for h, y in zip(td.history["train"], td.y["train"])],
                             td.history["val"], td.y["val"], len(td.classes), scfg)
    t1 = time.perf_counter()
    ranks = retrieval_ranks(sasrec_scorer(model, td.history["test"], scfg.max_len), len(td.y["test"]), td.y["test"], seen)
    key = f"val_{scfg.select}"
    info[key] = _num(info[key]) if info[key] is not None else None
    return ranks, t1 - t0, time.perf_counter() - t1, info


def _item_knn_ranks(td: TaskData, seen: list[np.ndarray] | None, cfg: EvalConfig) -> tuple[np.ndarray, float, float, dict]:
    """Item-kNN baseline (``userfm.eval.item_knn``): cosine over the training users' whole histories; the number
    of last items read is chosen on the val users' HR@10 (their held-out items) -> (test ranks, fit s,
    infer s, {"last", "val_hr@10" per candidate})."""
    from userfm.eval.item_knn import item_cosine, knn_scorer

    t0 = time.perf_counter()
    n_items = len(td.classes)
    pop = _item_counts(td)
    sim = item_cosine([np.append(h, y) for h, y in zip(td.history["train"], td.y["train"])], n_items)
    val_seen = td.excluded("val", cfg.retrieval_mask_seen)
    val = {}
    for m in cfg.item_knn_last:
        ranks = retrieval_ranks(knn_scorer(sim, td.history["val"], m, pop), len(td.y["val"]), td.y["val"], val_seen)
        val[m] = M.hit_rate_at_k(ranks, 10)
    best = max(cfg.item_knn_last, key=lambda m: val[m])  # the first of equals: the order given
    t1 = time.perf_counter()
    ranks = retrieval_ranks(knn_scorer(sim, td.history["test"], best, pop), len(td.y["test"]), td.y["test"], seen)
    return ranks, t1 - t0, time.perf_counter() - t1, {"last": best, "val_hr@10": {str(m): _num(v) for m, v in val.items()},
                                                      "similar_pairs": int(sim.nnz)}


# --------------------------------------------------------------------------------------------------
# TF-IDF baseline
# --------------------------------------------------------------------------------------------------


def _event_texts(data: str | Path, holdout: int = 0, service: str = "") -> pa.Table:
    """user_id and text (list of the user's event texts, oldest first) without each user's last ``holdout``
    (and, ``service`` set, only that service's events)."""
    from userfm.infer.embed import read_history

    return read_history(data, ["user_id", "text"], holdout, service)


def user_texts(data: str | Path, holdout: int = 0, service: str = "") -> dict[str, str]:
    """user id -> the texts of the user's kept events (scope "all"), one per line, without the last ``holdout``
    (``service``: that service's events only)."""
    t = _event_texts(data, holdout, service)
    return {u: "\n".join(x or []) for u, x in zip(t.column("user_id").to_pylist(), t.column("text").to_pylist())}


def minilm_mean_table(data: str | Path, holdout: int = 0, cache_dir: str | Path = "", encoder=None,
                      progress: Callable[[str], None] = print, service: str = "") -> EmbeddingTable:
    """The mean-MiniLM baseline table: each user's mean of the frozen all-MiniLM-L6-v2 vectors of their
    event texts (every event counts, repeated texts as often as they occur), without the last ``holdout``
    events (``service``: only that service's). A user with no event left gets the zero vector.

    Vectors come from the MiniLM cache (:mod:`userfm.models.minilm`; ``cache_dir`` "" = ``<data>/minilm_cache``);
    texts missing from it are encoded (``encoder``, default the packaged model, loaded only then) and
    appended to it, so a second call encodes nothing. Returns an (n_users, 384) float32 table.
    """
    import scipy.sparse as sp

    from userfm.models.features import text_hash
    from userfm.models.minilm import VectorCache, build_cache

    cache_dir = Path(cache_dir or Path(data) / "minilm_cache")
    t = _event_texts(data, holdout, service)
    lists = t.column("text").combine_chunks()
    flat = lists.flatten()  # (n_events,) the kept events' texts
    uniq = pc.unique(flat)  # (U,) distinct texts
    col = pc.index_in(flat, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)  # event -> distinct text
    texts = uniq.to_pylist()
    stats = build_cache(texts, cache_dir, encoder=encoder)
    progress(f"[evaluate] {MINILM_MEAN} (holdout {holdout}{f', {service} events only' if service else ''}): {len(flat):,} events, {stats['n_unique']:,} distinct texts, "
             f"{stats['n_reused']:,} from {cache_dir}, {stats['n_new']:,} encoded now")
    vectors = VectorCache.load(cache_dir).lookup(text_hash(texts), strict=True)  # (U, 384)
    off = lists.offsets.to_numpy()
    off = (off - off[0]).astype(np.int64)
    n_ev = np.diff(off)
    # (n_users, U) averaging matrix: row u puts 1/n_u on the distinct text of each of its n_u events
    avg = sp.csr_matrix((np.repeat(1.0 / np.maximum(n_ev, 1), n_ev), col, off), shape=(len(n_ev), len(texts)))
    x = np.asarray(avg @ vectors.astype(np.float64), dtype=np.float32)
    return EmbeddingTable(MINILM_MEAN, MINILM_MEAN, t.column("user_id").combine_chunks(), x, holdout, service)


@dataclass
class TfidfFeatures:
    """TF-IDF of each labelled user's texts, fitted on the task's training users."""

    x: dict[str, Any]  # split -> (n, vocab) scipy CSR float32, unit-norm rows
    vocab: int  # number of terms kept (columns)
    fit_s: float  # seconds to fit the vectorizer and transform train + val
    transform_test_s: float  # seconds to transform the test users' texts


def tfidf_features(td: TaskData, texts: dict[str, str], cfg: EvalConfig) -> TfidfFeatures:
    """Unigram + bigram TF-IDF (sublinear tf) fitted on train users only, applied to every split."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = {s: [texts.get(u, "") for u in td.ids[s]] for s in td.ids}
    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=min(cfg.tfidf_min_df, len(docs["train"])),
                          max_features=cfg.tfidf_max_features, dtype=np.float32)
    x = {"train": vec.fit_transform(docs["train"]), "val": vec.transform(docs["val"])}
    t1 = time.perf_counter()
    x["test"] = vec.transform(docs["test"])
    return TfidfFeatures(x, len(vec.vocabulary_), t1 - t0, time.perf_counter() - t1)


def _linear_scores(td: TaskData, x: dict[str, Any], cfg: EvalConfig, seed: int, weights: tuple[float, ...] = (1.0,),
                   weigh: Callable[[dict, float], dict] | None = None) -> tuple[np.ndarray, float, float, dict]:
    """Logistic regression (ridge) on features ``x`` (split -> dense or sparse matrix), C chosen on the val
    loss; with ``weigh``, jointly with a factor ``w`` of ``weights`` (``weigh(x, w)`` builds its features).

    Returns (test scores: (n, k) probabilities or (n,) values, fit s, predict s,
    {"C", "val_loss", and "tfidf_weight" (the factor) with ``weigh``}).
    """
    t0 = time.perf_counter()
    regression = td.task.type == "regression"
    best = (None, None, None, math.inf, None)  # model, C, factor, val loss, test features
    for w in weights if weigh else (1.0,):
        xw = weigh(x, w) if weigh else x
        model, c, loss = _fit_sklearn_linear(xw["train"], td.y["train"], xw["val"], td.y["val"], regression,
                                             cfg.logreg_c, cfg.logreg_max_iter, seed)
        if best[0] is None or loss < best[3]:
            best = (model, c, w, loss, xw["test"])
    model, c, w, loss, x_te = best
    t1 = time.perf_counter()
    if regression:
        scores = model.predict(x_te)
    else:
        scores = np.zeros((x_te.shape[0], len(td.classes)))
        scores[:, model.classes_] = model.predict_proba(x_te)
    info = {"C": c, "val_loss": _num(loss)}
    if weigh:
        info["tfidf_weight"] = w
    return scores, t1 - t0, time.perf_counter() - t1, info


def _tfidf_scores(td: TaskData, feats: TfidfFeatures, cfg: EvalConfig, seed: int) -> tuple[np.ndarray, float, float, dict]:
    """TF-IDF + logistic regression (ridge), C on val -> (test scores, train s, infer s, info)."""
    scores, fit_s, pred_s, info = _linear_scores(td, feats.x, cfg, seed)
    return scores, feats.fit_s + fit_s, feats.transform_test_s + pred_s, {"features": feats.vocab, **info}


@dataclass
class BagFeatures:
    """The binary user x item matrix of each split (``userfm.eval.bag_of_items``), columns = the training users' items."""

    x: dict[str, Any]  # split -> (n, items) scipy CSR float32
    items: int  # columns
    build_s: float  # seconds to build every split's matrix


def bag_features(td: TaskData, items: dict[str, list[str]]) -> BagFeatures:
    """The task's bag-of-items matrices, built once for every head that reads them."""
    from userfm.eval.bag_of_items import bag_of_items

    t0 = time.perf_counter()
    x, n_items = bag_of_items({s: [items.get(u, []) for u in td.ids[s]] for s in td.ids})
    return BagFeatures(x, n_items, time.perf_counter() - t0)


def _bag_of_items_scores(td: TaskData, bag: BagFeatures, cfg: EvalConfig,
                         seed: int) -> tuple[np.ndarray, float, float, dict]:
    """Binary user x item matrix + logistic regression (ridge), C on val."""
    scores, fit_s, pred_s, info = _linear_scores(td, bag.x, cfg, seed)
    return scores, bag.build_s + fit_s, pred_s, {"features": bag.items, **info}


def concat_features(emb: dict[str, np.ndarray], feats: TfidfFeatures, weight: float = 1.0) -> dict[str, Any]:
    """split -> CSR (n, D + vocab): [standardised embedding | weight * sqrt(D) * TF-IDF].

    The embedding is standardised with the train split's mean and std (constant dims stay constant), so
    its rows have norm ~ sqrt(D); TF-IDF rows have norm 1: at ``weight`` 1 both blocks weigh the same.
    """
    import scipy.sparse as sp

    mean, std = _standardize_stats(emb["train"])
    scale = np.float32(weight * math.sqrt(emb["train"].shape[1]))
    return {s: sp.hstack([sp.csr_matrix((emb[s] - mean) / std), feats.x[s] * scale], format="csr") for s in emb}


def _concat_scores(td: TaskData, emb: dict[str, np.ndarray], feats: TfidfFeatures, cfg: EvalConfig,
                   seed: int) -> tuple[np.ndarray, float, float, dict]:
    """Embedding + TF-IDF, logistic regression (ridge); C and the TF-IDF block's factor chosen on val."""
    scores, fit_s, pred_s, info = _linear_scores(td, emb, cfg, seed, cfg.concat_tfidf_weights,
                                                 lambda e, w: concat_features(e, feats, w))
    dim = int(emb["train"].shape[1])
    return scores, feats.fit_s + fit_s, feats.transform_test_s + pred_s, {
        "embedding_dim": dim, "tfidf_features": feats.vocab, "n_features": dim + feats.vocab, **info}


# --------------------------------------------------------------------------------------------------
# T-Trans baseline (ShopperBERT's task-specific transformer trained from scratch)
# --------------------------------------------------------------------------------------------------

SEQ_COLUMNS = ["user_id", "ts", "service", "text", "category"]


def _take_rows(seqs: pa.Table, ids: np.ndarray) -> pa.Table:
    idx = pc.index_in(pa.array(ids, pa.string()), value_set=seqs.column("user_id").combine_chunks())
    return seqs.take(idx)


def _slice_batch(batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``idx`` of a padded batch, with the event axis cut to the longest of those rows."""
    width = max(int(batch["length"][idx].max()), 1)
    return {k: (v[idx] if v.ndim == 1 else v[idx, :width]) for k, v in batch.items()}


@dataclass
class _TTransInputs:
    """A task's users featurized once for every T-Trans fit (each seed, each learning rate)."""

    batches: dict[str, dict[str, np.ndarray]]  # split -> padded batch (features.make_batch)
    target: dict[str, Any]  # split -> (n,) torch int64 class index, or float32 standardised value
    enc_cfg: Any  # encoders.EncoderConfig
    n_out: int  # classifier outputs: classes (catalog items for retrieval), 1 for regression
    t_mean: float  # regression target mean / std on train (0 / 1 otherwise)
    t_std: float
    featurize_s: float  # seconds spent fitting vocabularies / BPE and building the batches


def _ttrans_inputs(td: TaskData, seqs: pa.Table, cfg: EvalConfig) -> _TTransInputs:
    """Featurize the task's users. Vocabularies (and the BPE tokenizer for the "text" item encoder) are
    fitted on the training users only, so nothing about val/test users leaks in.

    ``seqs`` must already lack the held-out events of a last_event task (see ``run_evaluate``).
    """
    import torch

    from userfm.models.encoders import config_for
    from userfm.models.features import FeatureConfig, fit_vocabs, make_batch
    from userfm.models.tokenizer import TextTokenizer

    t0 = time.perf_counter()
    rows = {s: _take_rows(seqs, td.ids[s]) for s in td.ids}
    fcfg = FeatureConfig(max_events=cfg.t_trans_max_events, max_text_tokens=cfg.t_trans_max_text_tokens)
    vocabs = fit_vocabs(rows["train"], fcfg)
    tok = None
    if cfg.t_trans_item_encoder == "text":
        texts = [t for lst in rows["train"].column("text").to_pylist() for t in (lst or [])]
        tok = TextTokenizer.fit(texts, vocab_size=cfg.t_trans_text_vocab)
    batches = {s: make_batch(rows[s], vocabs, tok) for s in rows}
    regression = td.task.type == "regression"
    y = td.y
    t_mean, t_std = (float(y["train"].mean()), float(y["train"].std() or 1.0)) if regression else (0.0, 1.0)
    if regression:
        target = {s: torch.from_numpy(((y[s] - t_mean) / t_std).astype(np.float32)) for s in y}
    else:
        target = {s: torch.from_numpy(y[s].astype(np.int64)) for s in y}
    enc_cfg = config_for(cfg.t_trans_size, vocabs, tok, item_encoder=cfg.t_trans_item_encoder)
    return _TTransInputs(batches, target, enc_cfg, 1 if regression else len(td.classes), t_mean, t_std,
                         time.perf_counter() - t0)


def _ttrans_fit(inp: _TTransInputs, td: TaskData, cfg: EvalConfig, seed: int, lr: float) -> tuple[np.ndarray, float, float, dict]:
    """Train UserEncoder + Linear end to end on the task's train users at learning rate ``lr``, early-stopped
    on the val loss (best epoch's weights restored), and score the test users.

    A retrieval task is a classification over the catalog (held-out item only); its "scores" are ranks.
    Returns (test scores, train s (without featurizing), infer s, info incl. the best ``val_loss``).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from userfm.models.encoders import UserEncoder, num_params
    from userfm.models.features import to_torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    regression = td.task.type == "regression"
    retrieval = td.task.type == "retrieval"
    loss_fn = (lambda out, t: F.mse_loss(out[:, 0], t)) if regression else F.cross_entropy  # noqa: E731
    model = nn.ModuleDict({"encoder": UserEncoder(inp.enc_cfg), "head": nn.Linear(inp.enc_cfg.embed_dim, inp.n_out)})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def forward(split: str, idx: np.ndarray):
        return model["head"](model["encoder"](to_torch(_slice_batch(inp.batches[split], idx))))

    def predict(split: str) -> torch.Tensor:
        model.eval()
        n = len(td.ids[split])
        with torch.no_grad():
            return torch.cat([forward(split, np.arange(i, min(i + 256, n))) for i in range(0, n, 256)])

    best_loss, best_state, best_epoch, bad, epochs = math.inf, None, 0, 0, 0
    for epoch in range(cfg.t_trans_max_epochs):
        epochs = epoch + 1
        model.train()
        for idx in torch.randperm(len(td.ids["train"]), generator=gen).split(cfg.t_trans_batch_size):
            loss = loss_fn(forward("train", idx.numpy()), inp.target["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = float(loss_fn(predict("val"), inp.target["val"]))
        if val < best_loss - 1e-6:
            best_loss, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.t_trans_patience:
                break
    model.load_state_dict(best_state or model.state_dict())  # None only if every val loss was NaN
    t1 = time.perf_counter()
    out = predict("test").double()
    if retrieval:  # what the metrics read: the held-out item's rank in the catalog
        logits = out.numpy()
        scores = retrieval_ranks(lambda r: logits[r], len(logits), td.y["test"],
                                 td.excluded("test", cfg.retrieval_mask_seen))
    else:
        scores = (out[:, 0] * inp.t_std + inp.t_mean).numpy() if regression else torch.softmax(out, dim=1).numpy()
    info = {"params": num_params(model), "best_epoch": best_epoch, "epochs": epochs, "val_loss": best_loss, "lr": lr,
            "encoder": dataclasses.asdict(inp.enc_cfg)}
    return scores, t1 - t0, time.perf_counter() - t1, info


def _ttrans_runs(td: TaskData, seqs: pa.Table, cfg: EvalConfig, seeds: list[int]) -> tuple[list, list, list, dict]:
    """T-Trans tuned on val: the first seed trains once per learning rate of ``t_trans_lrs``; the rate with
    the lowest early-stopped val loss wins and the other seeds train at it only.

    Returns (test scores per seed, train s per seed (featurizing + one fit at the chosen rate), infer s
    per seed, info: params, encoder, epochs / best_epoch per seed, ``lr`` chosen, ``lr_grid`` (each rate's
    val loss) and ``lr_search_s`` (all first-seed fits)).
    """
    inp = _ttrans_inputs(td, seqs, cfg)
    t0 = time.perf_counter()
    grid = [_ttrans_fit(inp, td, cfg, seeds[0], lr) for lr in cfg.t_trans_lrs]
    search_s = time.perf_counter() - t0
    losses = [g[3]["val_loss"] for g in grid]
    best = min(range(len(grid)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    lr = cfg.t_trans_lrs[best]
    runs = [grid[best]] + [_ttrans_fit(inp, td, cfg, s, lr) for s in seeds[1:]]
    info = {"params": runs[0][3]["params"], "encoder": runs[0][3]["encoder"], "lr": lr,
            "lr_grid": [{"lr": g[3]["lr"], "val_loss": _num(g[3]["val_loss"]), "best_epoch": g[3]["best_epoch"],
                         "epochs": g[3]["epochs"]} for g in grid],
            "lr_search_s": round(search_s, 4),
            "epochs": [r[3]["epochs"] for r in runs], "best_epoch": [r[3]["best_epoch"] for r in runs]}
    return ([r[0] for r in runs], [inp.featurize_s + r[1] for r in runs], [r[2] for r in runs], info)


