"""The package layout holds: each stage imports only what its __init__ docstring allows, no import
cycle between modules or (beyond the one listed) between stages, and no module over ~400 lines
without a reason in its docstring. Read from the source with ast, so imports inside functions count."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "qsweep"
STAGES = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").exists() and p.name != "data")
THIRD_PARTY = {"ray", "mlflow", "optuna", "lm_eval"}
# stage: (qsweep stages it may import, libraries it must not import); mirrors each __init__ docstring.
RULES = {
    "config": (set(), {"ray", "mlflow", "optuna", "lm_eval"}),
    "search": ({"config"}, {"mlflow", "lm_eval"}),
    "evaluate": ({"config"}, {"ray", "mlflow"}),
    "resources": ({"config", "search", "train"}, {"ray", "mlflow"}),
    "train": ({"config", "resources", "evaluate"}, {"ray", "mlflow"}),
    "preflight": ({"config", "search", "resources", "train", "evaluate"}, {"ray", "mlflow"}),
    "tracking": ({"config", "search"}, set()),
    "report": ({"config", "evaluate", "tracking", "train"}, {"ray"}),
    "orchestrate": ({"config", "search", "resources", "train", "evaluate", "tracking", "report"}, set()),
}
# train logs resources' memory estimate, which reads the model's layers through train.targets: a
# stage-level cycle with no module-level one. Listed so any new stage cycle fails here.
KNOWN_STAGE_CYCLES = {frozenset({"resources", "train"})}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


MODULES = {_module_name(p): p for p in SRC.rglob("*.py") if "data" not in p.relative_to(SRC).parts[:-1]}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_stage_has_a_rule_and_a_docstring():
    assert set(RULES) == set(STAGES)
    for stage in STAGES:
        assert ast.get_docstring(ast.parse((SRC / stage / "__init__.py").read_text())), stage


@pytest.mark.parametrize("stage", sorted(RULES))
def test_stage_imports_only_what_its_docstring_allows(stage: str):
    allowed, banned = RULES[stage]
    assert any(_stage(module) == stage for module in IMPORTS), f"no module of {stage} was read"
    for module, names in IMPORTS.items():
        if _stage(module) != stage:
            continue
        stages = {n.split(".")[1] for n in names if n.startswith("qsweep.") and n.split(".")[1] in STAGES} - {stage}
        assert stages <= allowed, f"{module} imports {sorted(stages - allowed)}"
        libraries = {n.split(".")[0] for n in names} & banned
        assert not libraries, f"{module} imports {sorted(libraries)}"
        assert "qsweep.cli" not in names, f"{module} imports the CLI"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once per entry point)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_between_modules():
    graph = {m: {n for n in names if n in MODULES and n != m} for m, names in IMPORTS.items()}
    assert _cycles(graph) == []


def test_no_import_cycle_between_stages_but_the_known_one():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, names in IMPORTS.items():
        for name in names:
            if name.startswith("qsweep.") and _stage(name) in STAGES and _stage(name) != _stage(module):
                graph[_stage(module)].add(_stage(name))
    cycles = {frozenset(c) for c in _cycles(dict(graph))}
    assert cycles == KNOWN_STAGE_CYCLES


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_a_long_module_says_why():
    assert len(MODULES) > 50, sorted(MODULES)
    lengths = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    silent = [f"{module} has {lines} lines and no reason in its docstring" for module, lines in sorted(lengths.items())
              if lines > MAX_LINES and "longer than" not in _docstring(MODULES[module]).lower()]
    assert not silent, "\n".join(silent)
