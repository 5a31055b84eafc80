"""The package's layering, read from the source, by module path:

- no import circle (imports inside functions and under TYPE_CHECKING included);
- nothing outside methods/ and registry.py imports peftkit.methods or a module under it, and
  no identifier or string there names a method (matched whole, in any case: "LoRA" is lora);
- nothing outside apps/ and cli/applications.py imports peftkit.apps or names an application or
  one of the data sets the applications register.

Imports count wherever they are: in functions, under TYPE_CHECKING, and as module paths written
in strings (importlib.import_module("peftkit.methods.x")). Docstrings are docs and not checked."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import peftkit.registry as registry

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "peftkit"
# Where a method's name may appear in code: its own files and the registry that lists it.
METHOD_HOMES = ("methods/", "registry.py")


def module_file(name: str) -> Path:
    """The source file of peftkit.x.y (a package's __init__.py)."""
    folder = PACKAGE.parent.joinpath(*name.split("."))
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def module_name(path: Path) -> str:
    """peftkit.x.y for src/peftkit/x/y.py (a package's __init__ is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed."""
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """The ids of every node under an `if TYPE_CHECKING:` block."""
    return {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }


def imported_paths(name: str, tree: ast.Module, type_checking: bool = True) -> set[str]:
    """Every dotted module path a module imports, resolved (relative imports included), in
    functions too; `from a import b` counts as a and a.b. With type_checking, imports under
    TYPE_CHECKING count as well."""
    skipped = set() if type_checking else _type_checking_nodes(tree)
    is_package = module_file(name).name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


# A dotted module path of the package written in a string, e.g. importlib.import_module's.
MODULE_STRING = re.compile(r"\bpeftkit(?:\.[A-Za-z_]\w*)+")


def string_paths(tree: ast.Module) -> set[str]:
    """The package's module paths named in string constants (docstrings left out)."""
    docstrings = _docstrings(tree)
    return {
        match.group(0)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
        for match in MODULE_STRING.finditer(node.value)
    }  # fmt: skip


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules a module imports, anywhere in it (type-checking imports too)."""
    return {t for t in imported_paths(name, tree) if t in known and t != name}


def test_the_import_graph_has_no_circle() -> None:
    """Imports inside functions and under TYPE_CHECKING count: a circle of type hints is still
    a circle a reader has to follow."""
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


# The one module outside peftkit.apps that may import it: the applications' own commands, which
# also register their data sets for every command (peftkit.apps.register).
APPS_GATE = "peftkit.cli.applications"


def _reaches(paths: set[str], package: str) -> list[str]:
    """The paths that are the package or a module inside it."""
    return sorted(p for p in paths if p == package or p.startswith(package + "."))


def test_the_core_never_imports_the_applications() -> None:
    """Nothing outside apps/ (and the gate) imports peftkit.apps, in a function, under
    TYPE_CHECKING or through a module path in a string."""
    offenders = {}
    for name, tree in modules().items():
        if name.startswith("peftkit.apps") or name == APPS_GATE:
            continue
        found = _reaches(imported_paths(name, tree) | string_paths(tree), "peftkit.apps")
        # `from peftkit import apps` names the package as peftkit.apps too.
        if found:
            offenders[name] = found
    assert not offenders, f"the core reaches the applications: {offenders}"


def test_only_the_methods_and_the_registry_import_a_method_module() -> None:
    """Generic code reaches a method through its record in the registry, never its module:
    no import of peftkit.methods or a module under it (in a function, under TYPE_CHECKING, or
    as a module path in a string) outside methods/ and registry.py."""
    offenders = {}
    for name, tree in modules().items():
        if name.startswith("peftkit.methods") or name == "peftkit.registry":
            continue
        found = _reaches(imported_paths(name, tree) | string_paths(tree), "peftkit.methods")
        if found:
            offenders[name] = found
    assert not offenders, f"generic code imports a method's module: {offenders}"


def test_module_paths_are_resolved_and_found_in_strings() -> None:
    source = """
from typing import TYPE_CHECKING
from .. import methods
from ..methods.lora import fast
if TYPE_CHECKING:
    from peftkit.methods.bitfit import BitFitConfig
def f():
    import importlib
    return importlib.import_module("peftkit.apps.tabular"), "peftkit.methods"
"""
    tree = ast.parse(source)
    paths = imported_paths("peftkit.ui.example", tree) | string_paths(tree)
    assert _reaches(paths, "peftkit.methods") == [
        "peftkit.methods", "peftkit.methods.bitfit", "peftkit.methods.bitfit.BitFitConfig",
        "peftkit.methods.lora", "peftkit.methods.lora.fast",
    ]  # fmt: skip
    assert _reaches(paths, "peftkit.apps") == ["peftkit.apps.tabular"]
    # A package's relative import resolves against the package itself.
    assert imported_paths("peftkit", ast.parse("from . import methods")) == {
        "peftkit", "peftkit.methods",
    }  # fmt: skip


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of a module's docstring constants (module, class and function docstrings)."""
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _code_words(tree: ast.Module) -> list[tuple[int, str, bool]]:
    """(line, word, is a string) for the identifiers, imported module paths and string
    constants of a module; docstrings are left out (they are docs)."""
    docstrings = _docstrings(tree)
    words: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words.append((node.lineno, node.value, True))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id, False))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr, False))
        elif isinstance(node, ast.ImportFrom) and node.module:
            words.append((node.lineno, node.module, False))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.arg | ast.alias):
            name = getattr(node, "name", None) or node.arg
            words.append((getattr(node, "lineno", 0), name, False))
    return words


def pieces(name: str) -> list[str]:
    """A name's lower-case word pieces: snake_case, kebab-case and CamelCase (LoHa: lo, ha)."""
    return [p.lower() for p in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]


def name_pattern(form: list[str]) -> re.Pattern[str]:
    """A form's pieces in a row, in any case, with or without a separator between them."""
    return re.compile(r"[\s_-]?".join(re.escape(piece) for piece in form), re.IGNORECASE)


def _word_starts(text: str, i: int) -> bool:
    """Whether a word starts at text[i]: after a non-letter, or at a lower-to-upper change."""
    return i == 0 or not text[i - 1].isalpha() or (text[i - 1].islower() and text[i].isupper())


def _word_ends(text: str, match: str, j: int) -> bool:
    """Whether a word that reads `match` ends before text[j]: at a non-letter, after a digit,
    or where a capital starts a new word (LoRAConfig, IA3Config, OFTConfig; not OFTEN)."""
    if j == len(text) or not text[j].isalpha() or match[-1].isdigit():
        return True
    if not text[j].isupper():
        return False
    return any(c.islower() for c in match) or (j + 1 < len(text) and text[j + 1].islower())


def names_one_of(text: str, patterns: list[re.Pattern[str]]) -> bool:
    """Whether text holds one of the names as a word of its own (a plural "s" allowed), in
    any case: "LoRA", "lora_rank", "useLoRA", "LoRAs" do; "floral", "soft", "OFTEN" do not."""
    for pattern in patterns:
        for found in pattern.finditer(text):
            i, j = found.span()
            if not _word_starts(text, i):
                continue
            if _word_ends(text, found.group(0), j) or (
                j < len(text) and text[j] in "sS" and _word_ends(text, found.group(0), j + 1)
            ):
                return True
    return False


def method_patterns() -> list[re.Pattern[str]]:
    """Every registered method's name and config class name, as patterns."""
    names = [m.name for m in registry.METHODS]
    names += [m.config_cls.__name__.removesuffix("Config") for m in registry.METHODS]
    # "full" is also an English word (and torch.full): only the exact string literal counts.
    forms = {tuple(pieces(name)) for name in names if name.lower() != "full"}
    return [name_pattern(list(form)) for form in sorted(forms)]


def test_method_names_are_matched_whole_in_any_case() -> None:
    patterns = method_patterns()
    named = [
        "LoRA", "lora", "LORA_RANK", "lora_rank", "useLoRA", "LoRAConfig", "LoRAs", "rsLoRA",
        "RS-LoRA", "AdaLoRA", "DoRA", "IA3Config", "ia3", "OFTConfig",
        "oft", "child-tuning", "ChildTuning", "CHILD_TUNING", "prefix tuning", "LoHa", "lokr",
        "VeRA", "BitFit", "bit_fit", "bottleneck", "a LoRA adapter",
    ]  # fmt: skip
    assert [w for w in named if not names_one_of(w, patterns)] == []
    unnamed = ["floral", "soft", "often", "OFTEN", "explorable", "several", "lorax", "FLORA"]
    assert [w for w in unnamed if names_one_of(w, patterns)] == []


def test_generic_code_never_names_a_method() -> None:
    patterns = method_patterns()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(METHOD_HOMES):
            continue
        for line, word, is_string in _code_words(ast.parse(path.read_text())):
            if (is_string and word.lower() == "full") or names_one_of(word, patterns):
                found.append(f"{relative}:{line}: {word!r}")
    assert not found, "method names in generic code:\n" + "\n".join(found)


def test_the_core_never_names_an_application() -> None:
    """Outside apps/ and the gate, no identifier or string names an application or one of the
    data sets the applications register (docstrings aside)."""
    import peftkit.apps

    names = ["text_to_sql", "tabllm", "chatterbot", *peftkit.apps.DATASETS]
    patterns = [name_pattern(pieces(name)) for name in names]
    gate = module_file(APPS_GATE).relative_to(PACKAGE).as_posix()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("apps/") or relative == gate:
            continue
        for line, word, _ in _code_words(ast.parse(path.read_text())):
            if names_one_of(word, patterns) or _reaches({word}, "peftkit.apps"):
                found.append(f"{relative}:{line}: {word!r}")
    assert not found, "the core names an application:\n" + "\n".join(found)


def test_the_task_records_name_nothing_of_training() -> None:
    """training/ sits above the task records and imports them; a task record says which
    objective it trains with, and training/task_trainers.py maps it to a builder. No module
    under tasks/ imports peftkit.training or names one of its modules in a string."""
    offenders = {}
    for name, tree in modules().items():
        if name.startswith("peftkit.tasks"):
            found = _reaches(imported_paths(name, tree) | string_paths(tree), "peftkit.training")
            if found:
                offenders[name] = found
    assert not offenders, f"a task record reaches the training layer: {offenders}"
