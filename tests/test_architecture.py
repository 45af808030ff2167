"""Architecture rules, checked by reading the source (ast), not by importing it.

(a) No module of ``toolkit`` imports a ``_private`` name of another toolkit module: a helper two
    modules need is public and documented where it lives.
(b) No import cycle among toolkit modules, counting imports inside functions too: a lazy import
    hides a cycle from the interpreter, not from a reader.
(c) No project history ("issue 4", "issue #4") in the product: code, docs, notebooks, benchmarks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "toolkit"


def module_files(package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(node: ast.ImportFrom, module: str, files: dict[str, Path]) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, files):
        base = base[:-1]  # a module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, files: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """Every import in a module, at any depth: (imported toolkit module, imported name or None, line).

    ``from pkg import sub`` where ``pkg.sub`` is a module counts as importing the module ``sub``.
    """
    tree = ast.parse(files[module].read_text(), filename=str(files[module]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in files:
                    out.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, files)
            if target not in files:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in files:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return out


def module_aliases(module: str, files: dict[str, Path]) -> dict[str, str]:
    """Names bound to toolkit modules in a module (``from . import generation as G`` -> {"G": ...})."""
    tree = ast.parse(files[module].read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in files and alias.asname:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, files)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in files:
                    out[alias.asname or alias.name] = sub
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(files: dict[str, Path] | None = None) -> list[str]:
    """'module:line imports other._name' for each private name one toolkit module takes from another."""
    files = files or module_files()
    found = []
    for module in files:
        for target, name, line in imports(module, files):
            if target != module and name is not None and _private(name):
                found.append(f"{module}:{line} imports {target}.{name}")
        aliases = module_aliases(module, files)
        for node in ast.walk(ast.parse(files[module].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != module and _private(node.attr)):
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> toolkit modules it imports (module-level and inside functions), self-imports left out."""
    files = files or module_files()
    return {m: {t for t, _, _ in imports(m, files) if t != m} for m in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


HISTORY = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)
PRODUCT_DIRS = ("toolkit", "docs", "notebooks", "benchmarks")
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".sh", ".txt", ".rst", ".toml", ".yml", ".yaml", ".json", ".html", ".cfg"}


def history_mentions() -> list[str]:
    """'path:line: text' for each "issue N" in the product's text files."""
    found = []
    for folder in PRODUCT_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in TEXT_SUFFIXES or not path.is_file() or "__pycache__" in path.parts:
                continue
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                m = HISTORY.search(line)
                if m:
                    found.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)}")
    return found


# ---- the checkers themselves, on hand-made packages ----

def _package(tmp_path, sources: dict[str, str]) -> dict[str, Path]:
    for rel, text in sources.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    files = {}
    for path in sorted(tmp_path.rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def test_checkers_find_private_imports_and_function_level_cycles(tmp_path):
    files = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import public, _helper\nfrom . import c as C\nx = C._hidden\n",
        "pkg/b.py": "def f():\n    from .a import something\n",
        "pkg/c.py": "from pkg.sub import d\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from .. import c\nfrom ..c import __all__\n",
    })
    assert private_imports(files) == ["pkg.a:1 imports pkg.b._helper", "pkg.a:3 uses pkg.c._hidden"]
    graph = import_graph(files)
    assert graph["pkg.a"] == {"pkg.b", "pkg.c"}
    assert graph["pkg.sub.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]


def test_history_pattern():
    assert HISTORY.search("see issue 4 items 6, 7")
    assert HISTORY.search("(Issue #12)")
    assert not HISTORY.search("tissue 4") and not HISTORY.search("issues with 4-bit quantization")


# ---- the rules, on the real package ----

def test_the_package_is_found():
    files = module_files()
    assert {"toolkit", "toolkit.moe", "toolkit.moe.offload", "toolkit.errors"} <= set(files)


def test_no_private_name_imported_across_modules():
    offenders = private_imports()
    assert not offenders, "make these helpers public (and documented) or move them:\n" + "\n".join(offenders)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_issue_numbers_in_the_product():
    found = history_mentions()
    assert not found, "project history belongs in commit messages:\n" + "\n".join(found)
