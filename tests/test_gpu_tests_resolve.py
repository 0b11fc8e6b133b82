"""GPU-only tests never run in CI, so nothing else notices when one of them names a module or a
function that no longer exists (issue 19, item 13: `qsweep.orchestrate.state` was gone and the
only GPU test that runs a real sweep died on a GPU with ModuleNotFoundError). Here every import in
a GPU-marked test module, at module level or inside a test, is resolved without a GPU."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def gpu_test_modules() -> list[Path]:
    return sorted(p for p in TESTS.glob("test_*.py") if "mark.gpu" in p.read_text())


def imported_names(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every absolute import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


def unresolved(module: str, name: str | None) -> str | None:
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    if name is None or hasattr(imported, name):
        return None
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return f"{module} has no {name}"
    return None


def test_every_import_in_a_gpu_test_resolves_without_a_gpu():
    modules = gpu_test_modules()
    assert TESTS / "test_gpu.py" in modules
    problems = [f"{path.name}:{line}: {module}{f'.{name}' if name else ''}: {why}"
                for path in modules for line, module, name in imported_names(path)
                if (why := unresolved(module, name))]
    assert not problems, "\n".join(problems)
