"""The layering the docs describe holds in the code (docs/architecture.md).

- no import cycles between the package's modules;
- ``lightning_approxbp.conversion`` and everything below it import no Lightning;
- the activation list and the Triton/PyTorch choice each exist in one place.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_approxbp"
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports (anywhere in the file), with the packages on the way.

    An import of ``a.b.c`` runs ``a.b``'s ``__init__`` too; ancestors of the importer itself are
    already being imported when it runs, so they are not edges.
    """
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                candidate = ".".join(parts[:end])
                if candidate in modules and not name.startswith(candidate + ".") and candidate != name:
                    found.add(candidate)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_package_has_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_conversion_and_convert_work_without_lightning_installed():
    script = textwrap.dedent(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class NoLightning(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities"):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
                return None

        sys.meta_path.insert(0, NoLightning())
        import torch
        import lightning_approxbp.conversion
        from lightning_approxbp import convert

        model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU())
        report = convert(model, torch.randn(2, 8))
        assert len(report.converted) == 3, report
        try:
            from lightning_approxbp import ApproxBP
        except ModuleNotFoundError as error:
            print("callback needs lightning:", error)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "callback needs lightning" in run.stdout


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_activation_names_are_listed_only_in_the_registry():
    """No other file spells out a list or a map of the activations (three names or more)."""
    from lightning_approxbp.activations import ACTIVATIONS

    registry = PACKAGE / "activations.py"
    for path in _source_files():
        if path == registry:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                literals = {elt.value for elt in node.elts if isinstance(elt, ast.Constant)}
            elif isinstance(node, ast.Dict):
                literals = {key.value for key in node.keys if isinstance(key, ast.Constant)}
            else:
                continue
            assert len(literals & set(ACTIVATIONS)) < 3, f"{path.relative_to(ROOT)}:{node.lineno} lists activations"


def test_the_backend_is_chosen_only_in_the_dispatch_module():
    dispatch = PACKAGE / "ops" / "dispatch.py"
    for path in _source_files():
        if path != dispatch:
            assert "resolve_backend(" not in path.read_text(), path.relative_to(ROOT)
