"""The package's shape: no import cycle between userfm modules (lazy imports inside functions included),
and every relative link in the README and docs/ resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "platform" / "userfm"


def import_graph(pkg: Path) -> dict[str, set[str]]:
    """module -> the userfm modules it imports anywhere in its body (dotted names relative to ``pkg``)."""
    mods = {".".join(p.relative_to(pkg).with_suffix("").parts): p for p in pkg.rglob("*.py")}
    mods = {m.removesuffix(".__init__") if m != "__init__" else "": p for m, p in mods.items()}
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("userfm."):
                base = node.module[len("userfm."):] if node.module != "userfm" else ""
                for alias in node.names:  # "from userfm.x import y": y may be the module x.y
                    sub = f"{base}.{alias.name}".lstrip(".")
                    deps.add(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len("userfm."):] for a in node.names if a.name.startswith("userfm.")}
        graph[mod] = {d for d in deps if d in mods and d != mod and d != ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_by_hand():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_userfm_has_no_import_cycle():
    graph = import_graph(PKG)
    assert {"infer.embed", "train.pretrain", "data.sequences", "models.minilm"} <= set(graph)
    assert "train.pretrain" not in graph["infer.embed"] and "infer.embed" not in graph["train.pretrain"]
    assert cycles(graph) == []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


MAX_MODULE_LINES = 700  # docs/architecture.md: a module a reader takes in at one sitting


def test_every_module_is_under_the_size_limit():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert len(sizes) > 40  # the walk found the subpackages
    assert {k: n for k, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_one_subpackage_per_stage():
    """The pipeline's stages are the top-level subpackages; only cli, demo (with its stage runner) and the
    shared pieces sit beside them (docs/architecture.md)."""
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert subpackages == {"data", "models", "objectives", "train", "infer", "eval", "serve", "report"}
    assert {p.stem for p in PKG.glob("*.py")} == {"__init__", "cli", "demo", "stages", "config", "runtime", "errors"}
