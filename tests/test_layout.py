"""The package's layers import one way: core < model < training < export < serve < compare < app.

The import graph is read from the source (every ``import`` and ``from`` statement, those inside
functions included, relative ones resolved), so a lazy import that reaches upward fails here too.
Then every module is imported on its own in a fresh interpreter state: no import cycle.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lte"
LAYERS = ["core", "model", "training", "export", "serve", "compare", "app"]  # low to high
APP = "app"  # lte/*.py at the top (cli, pipeline, __init__, __main__) and lte/tools


def module_name(path: Path) -> tuple[str, list[str]]:
    """``lte.x.y`` and the package it is in (for resolving relative imports)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return APP  # lte, lte.cli, lte.pipeline, lte.__main__, lte.tools.*


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(imported lte module, line) for every import statement in the file (or in ``source``, read as
    if it were that file)."""
    _, package = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # ``from . import x`` / ``from lte.pkg import submodule``: the submodule is imported too
            found += [
                (f"{target}.{alias.name}", node.lineno) for alias in node.names if is_module(f"{target}.{alias.name}")
            ]
    return [(name, line) for name, line in found if name == "lte" or name.startswith("lte.")]


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    names = {module_name(p)[0] for p in package_modules()}
    assert {layer_of(n) for n in names} == set(LAYERS), "every layer holds modules"
    tops = sorted(n for n in names if layer_of(n) == APP)
    allowed = {"lte", "lte.__main__", "lte.cli", "lte.pipeline"}
    stray = [n for n in tops if n not in allowed and not n.startswith("lte.tools")]
    assert not stray, f"modules outside every concern package (move them into one): {stray}"


def test_imports_go_one_way():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for path in package_modules():
        name, _ = module_name(path)
        for target, line in imports_of(path):
            if rank[layer_of(target)] > rank[layer_of(name)]:
                upward.append(
                    f"{path.relative_to(REPO)}:{line} ({layer_of(name)}) imports {target} ({layer_of(target)})"
                )
    assert not upward, (
        "imports that reach a higher layer (order: " + " < ".join(LAYERS) + "); move the "
        "function down to where both can use it:\n  " + "\n  ".join(upward)
    )


def test_the_graph_reader_sees_lazy_and_relative_imports():
    """The checker itself: a function-level relative import is found and resolved."""
    probe = PACKAGE / "core" / "_probe_for_layout_test.py"  # never written: its source is given
    found = imports_of(probe, "def f():\n    from ..compare import harness\n    from .errors import UsageError\n")
    assert ("lte.compare", 2) in found and ("lte.compare.harness", 2) in found and ("lte.core.errors", 3) in found


_IMPORT_EACH = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k == "lte" or k.startswith("lte.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print("FAILED " + json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module imports first, with no other ``lte`` module loaded: no cycle, no hidden order."""
    names = [module_name(p)[0] for p in package_modules() if "task_configs" not in p.parts and p.name != "__main__.py"]
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")), None)
    assert line is not None, proc.stderr[-3000:]
    failed = json.loads(line[len("FAILED ") :])
    listed = "\n  ".join(f"{name}: {error}" for name, error in failed.items())
    assert not failed, f"modules that fail to import on their own:\n  {listed}"
