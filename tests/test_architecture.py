"""The module map holds (docs/architecture.md): the import graph of src/trb, parsed with `ast` (imports inside
functions and under TYPE_CHECKING included), has no cycle and points one way; the loss, the miniature and the
methods reach into the rollout engine only where the map allows; only the CLI and the API import the loop; no module
imports another's private names; and the loop, the loss and the modules around them keep functions short."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
LIMIT = 80  # lines per function in the modules below
SHORT = ("trb.train", "trb.trainer", "trb.run_folder", "trb.loading", "trb.warmup", "trb.losses", "trb.forward",
         "trb.sequences", "trb.miniature")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "trb").rglob("*.py"))}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of a module, wherever it stands."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:  # `from trb import lean` imports the module trb.lean
                sub = f"{source}.{alias.name}"
                out.append((sub, []) if sub in MODULES else (source, [alias.name]))
    return out


def edges(name: str) -> set[str]:
    """The trb modules that importing `name` runs directly: each one imported, and the packages above it that do not
    hold `name` (a package holding it has started running before it)."""
    out = set()
    for module, _ in imports(name):
        parts = module.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)} & MODULES.keys()
    return {m for m in out if m != name and not name.startswith(m + ".")}


GRAPH = {name: edges(name) for name in MODULES}


def reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_lazy_and_type_checking_imports():
    """A check that misses imports inside functions or under TYPE_CHECKING would pass whatever the code does."""
    assert "trb.train" in GRAPH["trb.cli"]  # imported inside cmd_train only
    assert "trb.config" in GRAPH["trb.trainer"]  # under TYPE_CHECKING only
    assert "trb.rollout" in GRAPH["trb.warmup"]  # the package above trb.rollout.policies runs too


def test_no_module_imports_one_that_imports_it():
    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in GRAPH for b in GRAPH[a] if a in reach(b))
    assert not cycles, "\n".join(cycles)


def test_the_loss_and_the_miniature_import_nothing_from_the_rollout_engine():
    users = [name for name in MODULES if name == "trb.losses" or name.startswith("trb.miniature")]
    assert "trb.miniature.sft" in users
    for name in users:
        assert not {m for m in GRAPH[name] if m.startswith("trb.rollout")}, name


def test_methods_import_only_the_policies_of_the_rollout_engine():
    assert {m for m, _ in imports("trb.methods") if m.startswith("trb.rollout")} == {"trb.rollout.policies"}


def test_only_the_cli_and_the_api_import_the_loop():
    assert {name for name in MODULES if "trb.train" in GRAPH[name]} == {"trb.cli", "trb.api"}


def test_no_module_imports_private_names_of_another():
    found = [f"{name}: from {module} import {n}" for name in MODULES for module, names in imports(name)
             for n in names if n.startswith("_") and not n.startswith("__") and module != name]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("prefix", SHORT)
def test_functions_are_short(prefix):
    owned = [name for name in MODULES if name == prefix or name.startswith(prefix + ".")]
    assert owned, prefix
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name in owned
            for node in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= LIMIT]
    assert not long, "\n".join(long)


def test_the_loop_module_reads_in_a_few_screens():
    assert len(MODULES["trb.train"].read_text().splitlines()) < 450


def test_the_rollout_package_still_exports_the_sequence_record():
    from trb import rollout, sequences

    for name in ("Rollout", "left_pad", "position_ids", "rollout_from_tokens"):
        assert getattr(rollout, name) is getattr(sequences, name)


def test_the_module_map_names_every_module_after_all_it_imports():
    """docs/architecture.md lists the modules bottom up, one line each (`name.py`, `package/` or `package/name.py`
    before the colon): every module must be on it (or in a package that is), below every module it imports."""
    order = {}
    for line in MAP.read_text().splitlines():
        if line.startswith("- "):
            for name in re.findall(r"`([a-z_/]+(?:\.py)?)`", line.split(":")[0]):
                module = "trb." + name.removesuffix(".py").strip("/").replace("/", ".")
                order.setdefault({"trb.__init__": "trb"}.get(module, module), len(order))

    def place(module: str) -> int:
        while module not in order:
            assert module.count(".") > 1, f"{module} is not on the module map"
            module = module.rsplit(".", 1)[0]  # a module of a package on the map
        return order[module]

    for module in MODULES:
        place(module)
    upward = [f"{a} imports {b}" for a in GRAPH for b in GRAPH[a] if place(b) > place(a)]
    assert not upward, "\n".join(upward)
