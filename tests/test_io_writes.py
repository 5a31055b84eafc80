"""Everything peftkit writes goes through peftkit.io: atomically (a temporary sibling, then a
rename) and with the modes the user's umask asks for, not mkstemp's 0600 or mkdtemp's 0700."""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import peftkit
from peftkit import io
from peftkit.models import load_model
from peftkit.models.pooling import write_pooling_config
from peftkit.training.checkpoints import publish

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "peftkit"


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a umask, then give the process back the one it had."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    """The permission bits of a file or folder."""
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert io.umask() == umask
    assert os.umask(umask) == umask  # still the one the fixture set


def test_files_and_folders_get_the_umask_modes(umask: int, tmp_path: Path) -> None:
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    text = io.write_text_atomically(tmp_path / "a.txt", "hello\n")
    assert mode(text) == file_mode and text.read_text() == "hello\n"
    data = io.write_json_atomically(tmp_path / "nested" / "b.json", {"x": 1})
    assert mode(data) == file_mode and mode(data.parent) == folder_mode
    with io.atomic_file(tmp_path / "c.png") as staging:
        assert staging.suffix == ".png" and staging.parent == tmp_path
        staging.write_bytes(b"\x89PNG")
    assert mode(tmp_path / "c.png") == file_mode
    with io.atomic_folder(tmp_path / "folder") as staging:
        (staging / "inside.txt").write_text("x")
        (staging / "private.bin").write_bytes(b"x")
        (staging / "private.bin").chmod(0o600)  # as safetensors writes its files
        (staging / "run.sh").write_text("#!/bin/sh\n")
        (staging / "run.sh").chmod(0o700)
    written = tmp_path / "folder"
    assert mode(written) == folder_mode
    assert mode(written / "inside.txt") == mode(written / "private.bin") == file_mode
    assert mode(written / "run.sh") == folder_mode  # an executable stays executable
    folder = io.write_folder_atomically(tmp_path / "adapter", {io.CONFIG_NAME: {"r": 2}})
    assert mode(folder) == folder_mode and mode(folder / io.CONFIG_NAME) == file_mode
    # Nothing temporary is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt", "adapter", "c.png", "folder", "nested",
    ]  # fmt: skip


def test_a_published_checkpoint_gets_the_umask_modes(umask: int, tmp_path: Path) -> None:
    staging = tmp_path / ".incomplete" / "checkpoint-2"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"x")
    (staging / "model.safetensors").chmod(0o600)
    publish(staging, tmp_path / "checkpoint-2")
    published = tmp_path / "checkpoint-2"
    assert mode(published / "model.safetensors") == 0o666 & ~umask
    assert mode(published) == 0o777 & ~umask


def test_a_replaced_file_gets_the_umask_modes_too(umask: int, tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    path.chmod(0o600)
    io.write_json_atomically(path, [1])
    assert mode(path) == 0o666 & ~umask and path.read_text() == "[\n  1\n]\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_file(path) as staging:
        staging.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_saved_adapter_gets_the_umask_modes(umask: int, tmp_path: Path) -> None:
    model, _ = load_model("tiny-gpt2", "causal-lm", seed=0)
    folder = peftkit.save(peftkit.apply(model, peftkit.LoraConfig(rank=2)), tmp_path / "adapter")
    assert mode(folder) == 0o777 & ~umask
    modes = {p.name: mode(p) for p in folder.iterdir()}
    assert {io.CONFIG_NAME, io.WEIGHTS_NAME} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}
    pooling = write_pooling_config(tmp_path / "merged", hidden_size=32)
    assert mode(pooling) == 0o666 & ~umask and mode(pooling.parent) == 0o777 & ~umask


# --- No writer bypasses peftkit.io ------------------------------------------------------------

# Calls that create or fill a file or folder.
WRITING_METHODS = {
    "write_text", "write_bytes", "save_pretrained", "savefig", "to_csv", "to_parquet", "save_file",
    "copyfile", "copy", "copy2", "copytree", "mkstemp", "mkdtemp", "NamedTemporaryFile",
    "write_header_to_file",
}  # fmt: skip
# Blocks whose body writes into a temporary sibling that peftkit.io then renames into place.
ATOMIC_BLOCKS = {"atomic_file", "atomic_folder"}
# (file, function) -> why a raw write there is right.
ALLOWED = {
    ("compare.py", "run_entry"): "the child's log: streamed while it runs, read as it grows",
    ("ui/jobs.py", "start"): "the child's log: streamed while it runs, read as it grows",
    ("training/measure.py", "_reset_resident_peak"): "a kernel control file, not a file on disk",
    ("training/checkpoints.py", "on_save"): "into the staging checkpoint publish() renames in",
    ("methods/lora/convert.py", "save_converted"): "scratch input for PEFT, deleted after",
    ("apps/text_to_sql/sandbox.py", "read_only"): "opens the database read-only (mode=ro)",
    ("run_folder.py", "check_writable_folder"): "an empty probe folder, removed at once",
}


def _call_name(call: ast.Call) -> str:
    """The called name: `f` for f(...) and obj.f(...)."""
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _opens_for_writing(call: ast.Call) -> bool:
    """open(path, "w"), path.open("a"), os.fdopen(fd, "wb") and the like."""
    name = _call_name(call)
    if name not in ("open", "fdopen"):
        return False
    # The mode: open(path, mode), os.fdopen(fd, mode), path.open(mode), or mode=...
    position = 0 if name == "open" and isinstance(call.func, ast.Attribute) else 1
    modes = [k.value for k in call.keywords if k.arg == "mode"] + call.args[position : position + 1]
    return any(
        isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax+")
        for m in modes
    )


def _writes(call: ast.Call) -> bool:
    """Whether a call writes a file: one of the writing methods, torch.save, json.dump,
    sqlite3.connect (it creates the database file) or an open for writing."""
    name = _call_name(call)
    owner = getattr(call.func, "value", None)
    owner_name = owner.id if isinstance(owner, ast.Name) else ""
    return (
        name in WRITING_METHODS
        or (owner_name, name) in {("torch", "save"), ("json", "dump"), ("sqlite3", "connect")}
        or _opens_for_writing(call)
    )


def raw_writes(tree: ast.Module) -> list[tuple[int, str, str]]:
    """(line, function, call) for each write outside an atomic block of peftkit.io."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, function: str, atomic: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.With | ast.AsyncWith) and any(
            isinstance(item.context_expr, ast.Call)
            and _call_name(item.context_expr) in ATOMIC_BLOCKS
            for item in node.items
        ):
            atomic = True
        if isinstance(node, ast.Call) and not atomic and _writes(node):
            found.append((node.lineno, function, ast.unparse(node.func)))
        for child in ast.iter_child_nodes(node):
            visit(child, function, atomic)

    visit(tree, "", False)
    return found


def test_raw_writes_are_found() -> None:
    source = """
def f(path, figure):
    path.write_text("x")
    with open(path, "wb") as handle:
        pass
    with atomic_file(path) as staging:
        figure.savefig(staging)
    open(path).read()
    open("/tmp/status", encoding="ascii").read()
    path.open("a")
    torch.save({}, path)
"""
    assert [(line, call) for line, _, call in raw_writes(ast.parse(source))] == [
        (3, "path.write_text"), (4, "open"), (10, "path.open"), (11, "torch.save"),
    ]  # fmt: skip


def test_every_write_goes_through_peftkit_io() -> None:
    found, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "io.py":
            continue
        for line, function, call in raw_writes(ast.parse(path.read_text())):
            if (relative, function) in ALLOWED:
                used.add((relative, function))
            else:
                found.append(f"{relative}:{line} ({function}): {call}")
    assert not found, "writes that bypass peftkit.io (atomic_file / atomic_folder):\n" + "\n".join(
        found
    )
    assert used == set(ALLOWED), f"allowed writes no longer there: {set(ALLOWED) - used}"
