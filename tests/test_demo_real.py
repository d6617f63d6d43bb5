"""The demo's stage composition on real-data formats: tiny MovieLens copies in each layout the converter
accepts (100k, 1M, latest) and tiny Online Retail / Amazon / canonical-event files, written by the
tests. Every stage must finish and every task the data supports must have result rows, with user
counts worked out by hand from the files below."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from userfm.demo import DemoConfig, run_demo

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# One small MovieLens world, written in each layout.
#
# Splits come from ingest's user-id hash (0.8 / 0.1 / 0.1): users 2 3 4 5 6 8 9 train, 11 val,
# 1 7 10 test (tests/test_demo_real.py::test_split_of_the_tiny_users pins this).

MOVIES = {  # id -> (title, genres in ML-100K column order; the first one is the next_genre label)
    "1": ("Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
    "2": ("GoldenEye (1995)", ["Action", "Adventure", "Thriller"]),
    "3": ("Four Rooms (1995)", ["Thriller"]),
    "4": ("Get Shorty (1995)", ["Action", "Comedy", "Drama"]),
    "5": ("Copycat (1995)", ["Crime", "Drama", "Thriller"]),
    "6": ("Misérables, Les (1995)", ["Drama", "Musical"]),  # latin-1 in the 100k / 1M files
    "7": ("Unknown Film (1995)", []),  # no genre: no category, so no next_genre label
}
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
# user -> movies rated, oldest first; the last one is the held-out event of the last_event tasks
HISTORY = {
    "1": ["1", "2", "3", "4"],  # test, last: Action
    "2": ["1", "3", "5", "2"],  # train, Action
    "3": ["2", "4", "6", "1"],  # train, Animation
    "4": ["3", "5", "6"],  # train, Drama
    "5": ["1", "4", "3"],  # train, Thriller
    "6": ["2", "6", "1", "5"],  # train, Crime
    "7": ["5", "6", "2", "3", "1"],  # test, Animation
    "8": ["4", "1", "2"],  # train, Action
    "9": ["6", "7"],  # train, last movie has no genre: next_genre label null, next_item label "7"
    "10": ["3"],  # test, one event: no last_event label, nothing left after the hold-out
    "11": ["1", "2", "6"],  # val, Drama
}
# user -> (gender, age, occupation); user 10 has no attributes row, user 12 has attributes but no ratings
USERS = {
    "1": ("M", 30, "writer"), "2": ("F", 24, "programmer"), "3": ("M", 30, "writer"), "4": ("F", 40, "artist"),
    "5": ("M", 24, "programmer"), "6": ("F", 30, "writer"), "7": ("F", 40, "artist"), "8": ("M", 40, "programmer"),
    "9": ("F", 24, "artist"), "11": ("M", 30, "programmer"), "12": ("F", 24, "writer"),
}
ML1M_AGE = {24: "18", 30: "25", 40: "35"}  # users.dat age codes (README of ML-1M)
ML1M_OCCUPATION = {"artist": "2", "programmer": "12", "writer": "20"}


def _ratings():
    """(user, movie, rating, unix seconds) in time order per user."""
    for u, movies in HISTORY.items():
        for k, m in enumerate(movies):
            yield u, m, 1 + (int(u) + k) % 5, 880_000_000 + 1000 * int(u) + 10 * k


def write_movielens(folder: Path, layout: str) -> Path:
    folder.mkdir(parents=True)
    if layout == "100k":
        (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in _ratings()))
        lines = []
        for mid, (title, genres) in MOVIES.items():
            flags = ["1" if g in genres or (g == "unknown" and not genres) else "0" for g in ML100K_GENRES]
            lines.append(f"{mid}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?{mid}|" + "|".join(flags) + "\n")
        (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
        (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|0{u}000\n" for u, (g, a, o) in USERS.items()))
    elif layout == "1m":
        (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in _ratings()))
        (folder / "movies.dat").write_bytes("".join(
            f"{mid}::{title}::{'|'.join(genres) or '(no genres listed)'}\n" for mid, (title, genres) in MOVIES.items()
        ).encode("latin-1"))
        (folder / "users.dat").write_text("".join(
            f"{u}::{g}::{ML1M_AGE[a]}::{ML1M_OCCUPATION[o]}::0{u}000\n" for u, (g, a, o) in USERS.items()))
    else:  # ml-latest(-small): CSV, UTF-8, no users file, tags
        (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{m},{r}.0,{t}\n" for u, m, r, t in _ratings()))
        (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f'{mid},"{title}",{"|".join(genres) or "(no genres listed)"}\n' for mid, (title, genres) in MOVIES.items()))
        # tags sit between a user's ratings, never last: the held-out events stay the ones above
        (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n2,5,twisty,880002005\n7,6,musical,880007001\n")
    return folder


# ---------------------------------------------------------------------------------------------------
# The same users and items in the other formats the demo takes.

CATEGORY = {m: g[0] for m, (_, g) in MOVIES.items() if g}  # item -> its one-level category (item 7: none)
# user -> most frequent invoice country (Online Retail); user 10's rows have no Country: no attributes row
COUNTRY = {"1": "United Kingdom", "2": "United Kingdom", "3": "United Kingdom", "4": "France", "5": "United Kingdom",
           "6": "United Kingdom", "7": "France", "8": "United Kingdom", "9": "France", "11": "United Kingdom"}
SEARCHED = {"3", "5"}  # canonical events: these items are "search" events, the others "shop"


def write_online_retail(folder: Path) -> Path:
    """One invoice line per rating (each its own invoice, a minute apart), a return in user 2's history,
    a line without CustomerID (rejected)."""
    import datetime as dt

    folder.mkdir(parents=True)
    lines = ["InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"]
    for n, (u, m, r, t) in enumerate(_ratings()):
        when = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%m/%d/%Y %H:%M")
        lines.append(f'{536000 + n},2{m}000,"{MOVIES[m][0].upper()}",{r},{when},1.25,{u}.0,{COUNTRY.get(u, "")}')
    lines.append("C537000,21000,TOY STORY (1995),-1,11/12/1997 03:33,1.25,2.0,United Kingdom")  # between user 2's lines
    lines.append("537001,22000,GOLDENEYE (1995),1,11/12/1997 03:34,1.25,,United Kingdom")  # no customer: rejected
    (folder / "Online Retail.csv").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return folder


def write_amazon(folder: Path) -> Path:
    """2018-style JSON lines: reviewerID, asin, unixReviewTime, overall, summary, category path."""
    folder.mkdir(parents=True)
    recs = [{"reviewerID": u, "asin": f"B0{m}", "unixReviewTime": t, "overall": float(r), "summary": MOVIES[m][0],
             **({"category": ["Books", CATEGORY[m]]} if m in CATEGORY else {})} for u, m, r, t in _ratings()]
    (folder / "Books_5.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


def write_events(folder: Path) -> Path:
    """Canonical events (JSON lines): two services, a one-level category, item ids."""
    import datetime as dt

    folder.mkdir(parents=True)
    recs = [{"user_id": u, "ts": dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(),
             "service": "search" if m in SEARCHED else "shop", "text": MOVIES[m][0], "item_id": m,
             "category": [CATEGORY[m]] if m in CATEGORY else None} for u, m, r, t in _ratings()]
    (folder / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


# ---------------------------------------------------------------------------------------------------
# Hand-computed expectations.
#
# Users with an attributes row and a sequence: everyone but 10 (no row) -> train 7 / val 1 / test 2
# (user 12 has a row but no events). Last-event tasks need 2+ events: everyone but 10 -> next_item
# train 7 / val 1 / test 2; next_genre / next_category also lose user 9 (last item 7 has no category)
# -> train 6 / val 1 / test 2. Last categories of train users: Action Animation Drama Thriller Crime
# Action: the test users' (Action, Animation) and the val user's (Drama) are among them.
# Last services (events): train shop shop shop search search shop shop; test shop shop; val shop.

ATTR = {"train": 7, "val": 1, "test": 2}
NEXT_ITEM = {"train": 7, "val": 1, "test": 2}
NEXT_CATEGORY = {"train": 6, "val": 1, "test": 2}
MOVIELENS_USERS = {"gender": ATTR, "age_bracket": ATTR, "occupation": ATTR, "next_genre": NEXT_CATEGORY, "next_item": NEXT_ITEM}
# "attr": a task on the attributes table (full-history embeddings); the others are last_event tasks
MOVIELENS_KINDS = {"gender": "attr", "age_bracket": "attr", "occupation": "attr", "next_genre": "multiclass",
                   "next_item": "retrieval"}
HEADS = ("mlp", "logreg")


def _models(kind: str) -> set[str]:
    """The evaluation rows of a demo task: CLUE and random x both heads, + TF-IDF (classification) or popularity
    (with and without the user's own items)."""
    return {f"{e}/{h}" for e in ("clue", "random") for h in HEADS} | (
        {"popularity", "popularity-unseen"} if kind == "retrieval" else {"tfidf/logreg"})


def _tiny(out: Path, src: Path, fmt: str, **kw) -> DemoConfig:
    # category items, a tiny encoder and no mean-MiniLM baseline: nothing loads MiniLM in these tests
    base = dict(out=str(out), data=str(src), format=fmt, pretrain_steps=2, batch_size=2, num_workers=1, objectives=("clue",),
                item_encoder="category", size="tiny", eval_seeds=1, report=False, serve=False,
                baselines=("tfidf", "oracle", "popularity"), eval_folds=0)
    return DemoConfig(**{**base, **kw})


def _check_run(out: Path, printed: str, n_stages: int, users: dict[str, dict[str, int]], kinds: dict[str, str],
               skipped: list[str]) -> dict:
    """Every stage printed "done", every task kept has its rows and hand-computed users, the skipped ones
    are listed, and the held-out table lacks exactly user 10. Returns results.json."""
    done = re.findall(r"^\[demo (\d+)/(\d+)\] .+ done in [\d.]+s$", printed, re.M)
    assert done == [(str(k), str(n_stages)) for k in range(1, n_stages + 1)]
    assert "[demo] finished" in printed
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == list(users)  # task-file order
    assert {t["name"]: t["users"] for t in results["tasks"]} == users
    for task, kind in kinds.items():
        assert {r["model"] for r in results["rows"] if r["task"] == task} == _models(kind), task
        assert (out / "evaluate" / "heads" / task / "clue-mlp" / "seed0" / "head.json").is_file()
    assert [s["task"] for s in results["skipped_tasks"]] == skipped
    md = (out / "evaluate" / "results.md").read_text()
    assert all(f"## {t}" in md for t in users) and all(f"Skipped task {t}:" in md for t in skipped)
    last = [t for t in users if kinds[t] != "attr"]
    by_pass = {p["name"]: p["tasks"] for p in results["passes"]}
    assert by_pass == {**({"full_history": [t for t in users if t not in last]} if len(last) < len(users) else {}),
                       "last_event_held_out": last}
    # each pass evaluated the CLUE table it needs: the held-out one only for the last_event tasks
    tables = {p["name"]: (p["embeddings"]["clue"]["source"], p["embeddings"]["clue"]["holdout_last"]) for p in results["passes"]}
    assert tables == {**({"full_history": (str(out / "embeddings" / "clue"), 0)} if "full_history" in by_pass else {}),
                      "last_event_held_out": (str(out / "embeddings_heldout" / "clue"), 1)}
    summary = json.loads((out / "demo_summary.json").read_text())
    clue = summary["pretrain"]["clue"]
    assert (clue["users_embedded"], clue["users_embedded_heldout"]) == (11, 10)  # user 10 has nothing left
    # real data: the epoch budget (30 epochs of ~4 steps here), capped at pretrain_steps
    assert clue["max_steps"] == 2 and clue["budget"].startswith("at most 30 epochs and 2 steps") and not clue["early_stopped"]
    held = json.loads((out / "embeddings_heldout" / "clue" / "manifest.json").read_text())
    assert (held["holdout_last"], held["skipped_by_reason"]) == (1, {"no_events_after_holdout": 1})
    assert set(summary["evaluate"]["headline"]) >= set(users)
    return results


# ---------------------------------------------------------------------------------------------------
# Tests


def test_split_of_the_tiny_users():
    """The expectations above assume these splits (ingest hashes the user id; fractions 0.8/0.1/0.1)."""
    from userfm.data.sequences import assign_split

    ids = [str(i) for i in range(1, 13)]
    got = dict(zip(ids, assign_split(ids, (0.8, 0.1, 0.1))))
    assert {s: sorted((u for u in ids if got[u] == s), key=int) for s in ("train", "val", "test")} == {
        "train": ["2", "3", "4", "5", "6", "8", "9", "12"], "val": ["11"], "test": ["1", "7", "10"]}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["100k", pytest.param("latest", marks=pytest.mark.slow),
                                    pytest.param("1m", marks=pytest.mark.slow)])
def test_demo_movielens_layouts(layout, tmp_path, ray_local, capsys):
    """`userfm demo --format movielens` on each layout: every stage finishes; 100k / 1M evaluate the
    user-attribute tasks on the full-history table and next_genre / next_item on a second table embedded
    without each user's last event; latest has no users file, so its attribute tasks are listed as
    skipped. The 100k run also writes the report and serves the gender head.

    1M and latest are marked slow to keep the default suite short: test_movielens_1m_converts_like_100k
    shows 1M's conversion gives the 100k run's events and labels, and test_plan_other_sources plans it;
    test_convert converts latest, and the 100k run covers every stage the latest run does."""
    src = write_movielens(tmp_path / f"ml-{layout}", layout)
    out = tmp_path / "demo"
    full = layout == "100k"
    run_demo(_tiny(out, src, "movielens", report=full, serve=full))
    printed = capsys.readouterr().out
    attrs = layout != "latest"
    users = {t: u for t, u in MOVIELENS_USERS.items() if attrs or t.startswith("next_")}
    results = _check_run(out, printed, 8 + 2 * full, users, {t: MOVIELENS_KINDS[t] for t in users},
                         [] if attrs else ["gender", "age_bracket", "occupation"])
    # Seven movies, fewer than ten: the held-out one is always in the top 10
    assert {r["test"]["value"] for r in results["rows"] if r["task"] == "next_item"} == {1.0}
    info = {t["name"]: t for t in results["tasks"]}
    assert info["next_genre"]["left_out"] == {"null_label": 2}  # user 10 (one event), user 9 (genre-less movie)
    assert info["next_item"]["n_items"] == 7 and info["next_genre"]["holdout_last"] == 1
    if attrs:
        assert info["gender"]["left_out"] == {"no_sequence": 1} and info["gender"]["holdout_last"] == 0  # user 12
        assert info["age_bracket"]["classes"] == ["18-24", "25-34", "35-44"]
        assert info["occupation"]["classes"] == ["artist", "programmer", "writer"]
    if full:
        summary = json.loads((out / "demo_summary.json").read_text())
        assert summary["serve"]["head"] == "gender"  # the first task on a user-attribute table
        calls = [(c["method"], c["path"].split("?")[0], c["status"]) for c in summary["serve"]["calls"]]
        uid = summary["serve"]["user_id"]
        assert calls == [("GET", "/healthz", 200), ("POST", "/v1/embed", 200), ("GET", f"/v1/users/{uid}/embedding", 200),
                         ("GET", f"/v1/users/{uid}/similar", 200), ("GET", "/v1/heads", 200),
                         ("POST", "/v1/heads/gender/predict", 200), ("POST", "/v1/heads/gender/predict", 200),
                         ("GET", "/docs", 200)]
        html = (out / "report" / "report.html").read_text()
        assert 'id="task-next_genre"' in html and 'id="task-next_item"' in html


def test_movielens_1m_converts_like_100k(tmp_path):
    """The 1M files above hold the 100k files' ratings, movies and users: same events, same labels (ML-1M's
    age is a bracket code, so only the "age" column differs)."""
    import pyarrow.parquet as pq

    from userfm.data.convert import convert

    got = {}
    for layout in ("100k", "1m"):
        convert("movielens", write_movielens(tmp_path / layout, layout), tmp_path / f"raw-{layout}")
        got[layout] = (pq.read_table(tmp_path / f"raw-{layout}" / "events.parquet"),
                       pq.read_table(tmp_path / f"raw-{layout}" / "attributes.parquet").drop_columns(["age"]))
    assert got["1m"][0].equals(got["100k"][0]) and got["1m"][0].num_rows == 36
    assert got["1m"][1].to_pylist() == got["100k"][1].to_pylist() and got["1m"][1].num_rows == 11


OTHER = {  # format -> (writer, task -> users, task -> kind, skipped)
    "online-retail": (write_online_retail, {"country": ATTR, "next_item": NEXT_ITEM},
                      {"country": "attr", "next_item": "retrieval"}, []),
    "amazon-reviews": (write_amazon, {"next_category": NEXT_CATEGORY, "next_item": NEXT_ITEM},
                       {"next_category": "multiclass", "next_item": "retrieval"}, []),
    "events": (write_events, {"next_service": NEXT_ITEM, "next_category": NEXT_CATEGORY, "next_item": NEXT_ITEM},
               {"next_service": "multiclass", "next_category": "multiclass", "next_item": "retrieval"}, []),
}


@pytest.mark.parametrize("fmt", ["movielens-1m"] + list(OTHER))
def test_plan_other_sources(fmt, tmp_path, ray_local):
    """Which tasks of experiments/tasks/<format>.yaml the demo runs on each source's tiny copy, on
    which table, with how many users (what the demo decides after ingest, before pretraining)."""
    from userfm.data.convert import convert
    from userfm.demo import _default_tasks, _plan_tasks
    from userfm.data.ingest import IngestConfig, run_ingest

    if fmt == "movielens-1m":
        fmt, src = "movielens", write_movielens(tmp_path / "src", "1m")
        users, kinds, skipped = MOVIELENS_USERS, MOVIELENS_KINDS, []
    else:
        writer, users, kinds, skipped = OTHER[fmt]
        src = writer(tmp_path / "src")
    if fmt == "events":
        inputs, attributes = (str(src),), ()
    else:
        convert(fmt, src, tmp_path / "raw")
        inputs = (str(tmp_path / "raw" / "events.parquet"),)
        attributes = tuple(str(p) for p in [tmp_path / "raw" / "attributes.parquet"] if p.exists())
    run_ingest(IngestConfig(inputs=inputs, out=str(tmp_path / "ds"), attributes=attributes))
    plan = _plan_tasks(_default_tasks(DemoConfig(data=str(src), format=fmt)), tmp_path / "ds")
    assert plan.users == users
    assert plan.passes == {**({(0, ""): tuple(t for t, k in kinds.items() if k == "attr")} if "attr" in kinds.values() else {}),
                           (1, ""): tuple(t for t, k in kinds.items() if k != "attr")}
    assert [s["task"] for s in plan.skipped] == skipped


def _write_recbole(folder: Path, ordered: bool) -> Path:
    """Users 1-12, three items each over two domains; ``ordered``: a timestamp of positions (the Amazon set's
    layout, ordinal), else none plus a .user file of age groups (the Tenrec set's)."""
    folder.mkdir(parents=True)
    head = "user_id:token\titem_id:token" + ("\ttimestamp:float" if ordered else "")
    rows = [f"{u}\ti{(u + k) % 5}" + (f"\t{k}" if ordered else "") for u in range(1, 13) for k in range(3)]
    (folder / "rb.inter").write_text("\n".join([head, *rows]) + "\n")
    items = [f"i{i}\t{'arts' if i < 3 else 'office'}\ttitle {i}" for i in range(5)]
    (folder / "rb.item").write_text("\n".join(["item_id:token\tdomain:token\ttitle:token_seq", *items]) + "\n")
    if not ordered:
        (folder / "rb.user").write_text("\n".join(["user_id:token\tage_group:token",
                                                    *(f"{u}\t{u % 2}" for u in range(1, 13))]) + "\n")
    return folder


@pytest.mark.parametrize("ordered", [True, False])
def test_plan_recbole(ordered, tmp_path, ray_local):
    """experiments/tasks/recbole.yaml on both shared layouts: positions as time (Amazon) run next_service and
    next_item and skip age_group (no .user file); no timestamp (Tenrec) runs age_group and skips the last-event
    tasks, whose "last" event would be arbitrary. Splits: users 1-12 -> train 8 / val 1 / test 3."""
    from userfm.data.convert import convert
    from userfm.demo import _default_tasks, _plan_tasks
    from userfm.data.ingest import IngestConfig, run_ingest

    src = _write_recbole(tmp_path / "src", ordered)
    m = convert("recbole", src, tmp_path / "raw", service_field="domain")
    assert m["time"] == ("ordinal" if ordered else "none")
    attrs = tuple(str(p) for p in [tmp_path / "raw" / "attributes.parquet"] if p.exists())
    ds = run_ingest(IngestConfig(inputs=(str(tmp_path / "raw" / "events.parquet"),), out=str(tmp_path / "ds"),
                                 attributes=attrs, overwrite=True), progress=lambda s: None)
    assert (ds["rows_kept"], ds["time"]) == (36, m["time"])  # the order-only clock is inside ingest's valid range
    from userfm.demo import _has_categories

    assert not _has_categories(tmp_path / "ds")  # ids and titles only: the demo's default then skips MLM
    plan = _plan_tasks(_default_tasks(DemoConfig(data=str(src), format="recbole")), tmp_path / "ds")  # order: from the manifest
    split = {"train": 8, "val": 1, "test": 3}
    if ordered:
        assert plan.passes == {(1, ""): ("next_service", "next_item")}
        assert plan.users == {"next_service": split, "next_item": split}
        assert [s["task"] for s in plan.skipped] == ["age_group"] and "no attributes table" in plan.skipped[0]["reason"]
    else:
        assert plan.passes == {(0, ""): ("age_group",)} and plan.users == {"age_group": split}
        assert {s["task"]: s["reason"] for s in plan.skipped} == dict.fromkeys(
            ("next_service", "next_item"), "the source has no event order (time: none): a user's last event is an "
                                           "arbitrary one, not the next")


def _write_amazon(src: Path) -> Path:
    """A tiny copy of the Amazon Arts <-> Office layout: 60 users, each Arts, Office, Office target, Arts target."""
    src.mkdir()
    rows = [f"u{u}\t{i}\t{k}" for u in range(60) for k, i in enumerate((f"a{u % 4}", f"o{u % 3}", f"o{3 + u % 2}", f"a{4 + u % 3}"))]
    (src / "az.inter").write_text("\n".join(["user_id:token\titem_id:token\ttimestamp:float", *rows]) + "\n")
    items = ([f"a{i}\tarts\tart {i}\tarts crafts sewing {'painting' if i % 2 else 'beading'} brand{i}" for i in range(7)]
             + [f"o{i}\toffice\toffice {i}\toffice products office school supplies {'paper' if i % 2 else 'tape'}"
                for i in range(5)])
    (src / "az.item").write_text("\n".join(["item_id:token\tdomain:token\ttitle:token_seq\tcategories:token_seq", *items]) + "\n")
    return src


def test_plan_amazon_tasks(tmp_path, ray_local):
    """experiments/tasks/amazon-arts-office.yaml on a tiny copy of the Amazon layout (every user: Arts, Office,
    Office target, Arts target): the Arts tasks read the last event, the Office tasks the 2nd last, in a pass
    of its own (holdout 2); the category tasks read category word 3 (Arts) and 5 (Office); the transfer tasks
    read one service's history, each in a pass of its own."""
    from userfm.data.convert import convert
    from userfm.demo import _plan_tasks, embeddings_key, pass_name
    from userfm.data.ingest import IngestConfig, run_ingest

    src = _write_amazon(tmp_path / "src")
    convert("recbole", src, tmp_path / "raw", service_field="domain")
    run_ingest(IngestConfig(inputs=(str(tmp_path / "raw" / "events.parquet"),), out=str(tmp_path / "ds")), progress=lambda s: None)
    plan = _plan_tasks(REPO / "experiments/tasks/amazon-arts-office.yaml", tmp_path / "ds")
    assert plan.skipped == ()
    from userfm.demo import _has_categories

    assert _has_categories(tmp_path / "ds")  # the .item categories: the demo's default keeps MLM
    assert plan.passes == {(1, ""): ("next_item", "next_item_arts", "next_category_arts"),
                           (1, "office"): ("arts_from_office", "arts_category_from_office"),
                           (2, ""): ("next_item_office", "next_category_office"),
                           (2, "arts"): ("office_from_arts", "office_category_from_arts")}
    assert {sum(u.values()) for u in plan.users.values()} == {60}  # every user is labelled in every task
    assert (pass_name(2), embeddings_key(2), embeddings_key(1)) == ("last_2_events_held_out", "embeddings_heldout2", "embeddings_heldout")
    assert (pass_name(2, "arts"), embeddings_key(2, "arts")) == ("last_2_events_held_out_arts_history", "embeddings_heldout2_arts")


def test_plan_skips_what_the_data_cannot_support(tmp_path, ray_local):
    """Canonical events with one service and no categories: next_service (one class) and next_category
    (no labels at all) are skipped with the evaluator's reasons; next_item still runs."""
    from userfm.demo import _default_tasks, _plan_tasks
    from userfm.data.ingest import IngestConfig, run_ingest

    src = tmp_path / "src"
    src.mkdir()
    recs = [{"user_id": u, "ts": t, "service": "shop", "text": MOVIES[m][0], "item_id": m} for u, m, r, t in _ratings()]
    (src / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run_ingest(IngestConfig(inputs=(str(src),), out=str(tmp_path / "ds"), numeric_ts_unit="s"))
    plan = _plan_tasks(_default_tasks(DemoConfig(data=str(src), format="events")), tmp_path / "ds")
    assert plan.passes == {(1, ""): ("next_item",)} and plan.users == {"next_item": NEXT_ITEM}
    reasons = {s["task"]: s["reason"] for s in plan.skipped}
    assert list(reasons) == ["next_service", "next_category"]
    assert reasons == {
        "next_service": "task 'next_service': target 'service' has fewer than 2 classes among training users",
        "next_category": "task 'next_category': target 'category_top' has fewer than 2 classes among training users"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("fmt", list(OTHER))
def test_demo_other_formats(fmt, tmp_path, ray_local, capsys):
    """The whole demo on the other formats: their last_event tasks (and Online Retail's country) get rows."""
    writer, users, kinds, skipped = OTHER[fmt]
    out = tmp_path / "demo"
    run_demo(_tiny(out, writer(tmp_path / "src"), fmt))
    _check_run(out, capsys.readouterr().out, 8, users, kinds, skipped)


def test_pretrain_recipe(tmp_path):
    from userfm.demo import REAL_EPOCHS, pretrain_recipe

    synth, why = pretrain_recipe(DemoConfig())
    # synthetic data: SYNTH_STEPS (150) steps; real data: an epoch budget capped at REAL_STEPS (400)
    assert synth == {"max_steps": 150, "eval_every": 37, "checkpoint_every": 75, "log_every": 15, "export": "last"}
    assert why == "150 steps, the last weights (synthetic data: a fresh sample every user)"
    assert pretrain_recipe(DemoConfig(pretrain_steps=7))[0]["max_steps"] == 7
    real, why = pretrain_recipe(DemoConfig(data=str(tmp_path), format="events"))
    assert (real["epochs"], real["early_stop"], real["eval_every"], real["export"], real["max_steps"]) == (REAL_EPOCHS, 3, 0, "best", 400)
    assert why.startswith("at most 30 epochs and 400 steps, validated every epoch, stopped after 3 epochs") and "real data" in why
    fixed, why = pretrain_recipe(DemoConfig(data=str(tmp_path), format="events", pretrain_epochs=0, pretrain_steps=80))
    assert "epochs" not in fixed and fixed["max_steps"] == 80 and why == "80 steps, the last weights (set in the config)"
    mine, _ = pretrain_recipe(DemoConfig(pretrain_epochs=5, pretrain_patience=2))
    assert (mine["epochs"], mine["early_stop"]) == (5, 2)


def test_demo_objectives(tmp_path):
    """Synthetic data: CLUE alone; real data: CLUE and every REAL_OBJECTIVES one (each task gets a val-chosen row);
    a config's own list wins (CLUE always first, once); --compare adds MLM and SimCLR."""
    from userfm.demo import REAL_OBJECTIVES, demo_objectives

    assert demo_objectives(DemoConfig())[0] == ("clue",)
    objectives, why = demo_objectives(DemoConfig(data=str(tmp_path), format="events"))
    assert objectives == ("clue", "simclr", "mlm", "next", "future") == ("clue", *REAL_OBJECTIVES)
    assert "val-chosen" in why and "objectives=[clue]" in why
    assert demo_objectives(DemoConfig(data=str(tmp_path), format="events", objectives=("clue",)))[0] == ("clue",)
    assert demo_objectives(DemoConfig(data=str(tmp_path), format="events", objectives=()))[0] == ("clue",)
    assert demo_objectives(DemoConfig(objectives=("future", "clue")))[0] == ("clue", "future")
    both, why = demo_objectives(DemoConfig(compare=True, objectives=("future",)))
    assert both == ("clue", "mlm", "simclr", "future") and "--compare" in why
    # once ingest has run: no order, no next; no categories, no MLM (its loss is 0 on id-only logs)
    real = DemoConfig(data=str(tmp_path), format="events")
    assert demo_objectives(real, "ordinal", True)[0] == ("clue", *REAL_OBJECTIVES)
    ids_only, why = demo_objectives(real, "none", False)
    assert ids_only == ("clue", "simclr", "future") and "not next: the data has no event order" in why
    assert "not mlm: the data has no categories" in why
    assert demo_objectives(DemoConfig(data=str(tmp_path), format="events", objectives=("mlm",)), "none", False)[0] == ("clue", "mlm")


def test_eval_folds_config(tmp_path):
    """eval_folds: 0 (the dataset's split) or k >= 3 (cross-fitting); pretraining holds out the last event
    only when cross-fitted last_event tasks run (checked in run_demo, see the quality benchmark). None = auto:
    real data with a task under 2,000 test users is cross-fitted in 5 folds, synthetic data never."""
    from userfm.demo import eval_folds_for

    assert DemoConfig(eval_folds=5).eval_folds == 5
    for k in (1, 2, -3):
        with pytest.raises(ValueError, match="eval_folds must be 0"):
            DemoConfig(eval_folds=k)
    real = DemoConfig(data=str(tmp_path), format="events")
    assert eval_folds_for(real, {"gender": 95, "next_item": 2_500})[0] == 5
    assert "task gender has 95 test users (< 2,000)" in eval_folds_for(real, {"gender": 95, "next_item": 2_500})[1]
    assert eval_folds_for(real, {"next_item": 2_000}) == (0, "every task has >= 2,000 test users")
    assert eval_folds_for(DemoConfig(), {"age_bracket": 1_011})[0] == 0  # synthetic: the test split
    assert eval_folds_for(DemoConfig(data=str(tmp_path), format="events", eval_folds=0), {"gender": 95})[0] == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_amazon_transfer_passes(tmp_path, ray_local, capsys):
    """The whole demo on the tiny Amazon layout and its task file: the transfer tasks are evaluated on tables
    embedded from one service's events (the Office target from the Arts event before it, and the reverse)."""
    out = tmp_path / "demo"
    run_demo(_tiny(out, _write_amazon(tmp_path / "src"), "recbole", service_field="domain",
                   tasks=str(REPO / "experiments/tasks/amazon-arts-office.yaml")))
    results = json.loads((out / "evaluate" / "results.json").read_text())
    passes = {p["name"]: (p["tasks"], p["embeddings"]["clue"]["source"], p.get("history_service", "")) for p in results["passes"]}
    assert passes["last_2_events_held_out_arts_history"] == (
        ["office_from_arts", "office_category_from_arts"], str(out / "embeddings_heldout2_arts" / "clue"), "arts")
    assert passes["last_event_held_out_office_history"] == (
        ["arts_from_office", "arts_category_from_office"], str(out / "embeddings_heldout_office" / "clue"), "office")
    m = json.loads((out / "embeddings_heldout2_arts" / "clue" / "manifest.json").read_text())
    assert (m["holdout_last"], m["history_service"], m["users_embedded"]) == (2, "arts", 60)
    info = {t["name"]: t for t in results["tasks"]}
    assert info["office_from_arts"]["history"] == "service:arts" and info["office_from_arts"]["n_items_ranked"] == [5]
    assert {r["model"] for r in results["rows"] if r["task"] == "arts_from_office"} == _models("retrieval")
    assert "Every model reads the user's arts events only." in (out / "evaluate" / "results.md").read_text()
