"""The package's layering, read from the source: no import circle (function-level imports
included), the core never imports the applications, and generic code never names a method."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import peftkit.registry as registry

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "peftkit"
# Where a method's name may appear in code: its own files and the registry that lists it.
METHOD_HOMES = ("methods/", "registry.py")


def module_name(path: Path) -> str:
    """peftkit.x.y for src/peftkit/x/y.py (a package's __init__ is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed."""
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules a module imports, anywhere in it (type-checking imports aside)."""
    found: set[str] = set()
    checking = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }
    package = name if name in known and any(k.startswith(name + ".") for k in known) else None
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = (package or name).split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_import_graph_has_no_circle() -> None:
    trees = modules()
    known = set(trees)
    graph = {name: imported(name, tree, known) for name, tree in trees.items()}
    # A package's __init__ re-exporting its modules is not a circle with them.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_core_never_imports_the_applications() -> None:
    trees = modules()
    known = set(trees)
    offenders = {
        name: sorted(t for t in imported(name, tree, known) if t.startswith("peftkit.apps"))
        for name, tree in trees.items()
        if not name.startswith(("peftkit.apps", "peftkit.cli"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def _code_words(tree: ast.Module) -> list[tuple[int, str, bool]]:
    """(line, word, is a string) for the identifiers and string constants of a module;
    docstrings are left out (they are docs)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words.append((node.lineno, node.value, True))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id, False))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr, False))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.arg | ast.alias):
            name = getattr(node, "name", None) or node.arg
            words.append((getattr(node, "lineno", 0), name, False))
    return words


def tokens(text: str) -> list[str]:
    """Lower-case word pieces of an identifier or text: snake_case, camelCase and prose alike."""
    return [t.lower() for t in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", text)]


def names_a_method(text: str, forms: list[list[str]]) -> bool:
    """Whether text holds a method name: its pieces in a row, or all of them run together."""
    pieces = tokens(text)
    for form in forms:
        joined = "".join(form)
        if joined in pieces or any(
            pieces[i : i + len(form)] == form for i in range(len(pieces) - len(form) + 1)
        ):
            return True
    return False


def test_generic_code_never_names_a_method() -> None:
    names = [m.name for m in registry.METHODS]
    names += [m.config_cls.__name__.removesuffix("Config") for m in registry.METHODS]
    # "full" is also an English word (and torch.full): only the exact string literal counts.
    forms = [tokens(name) for name in names if name.lower() != "full"]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(METHOD_HOMES):
            continue
        for line, word, is_string in _code_words(ast.parse(path.read_text())):
            if (is_string and word == "full") or names_a_method(word, forms):
                found.append(f"{relative}:{line}: {word!r}")
    assert not found, "method names in generic code:\n" + "\n".join(found)
