"""The package's import graph has no cycles, and the torch-free core stays torch-free.

A cycle (a imports b, b imports a), even through a function-local import, means the two modules
are one unit split in two; the layer a value belongs to is then unclear, and a torch-free module
drags torch in through its partner. Both checks read the source (``ast``), so a cycle hidden in
a function body is found before it is ever run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"napari_stem": ROOT / "src" / "napari_stem", "stem_train": ROOT / "training" / "stem_train"}
#: Modules the widget, the CLI's argument parsing and the writers import without paying for torch.
TORCH_FREE = (
    "napari_stem.predict",
    "napari_stem.values",
    "napari_stem.validate",
    "napari_stem.stem.model_config",
    "napari_stem.intervals",
    "napari_stem.metrics",
    "napari_stem.errors",
    "napari_stem.devices",
    "napari_stem.slide",
    "napari_stem.spots",
    "napari_stem.grid",
    "napari_stem.caches",
    "napari_stem.preview",
    "napari_stem.export",
    "napari_stem.csv_io",
    "napari_stem.hub_publish",
    "napari_stem.embedding.patches",
    "napari_stem.embedding.cache",
    "napari_stem.plugin.jobs",
    "napari_stem.plugin.controller",
)


def _modules() -> dict[str, Path]:
    return {
        f"{package}.{path.relative_to(folder).with_suffix('').as_posix().replace('/', '.')}".removesuffix(
            ".__init__"
        ): path
        for package, folder in PACKAGES.items()
        for path in sorted(folder.rglob("*.py"))
    }


def _imports(name: str, path: Path, modules: dict[str, Path], module_level_only: bool = False) -> set[str]:
    """The package modules ``name`` imports (``TYPE_CHECKING`` blocks excluded): at module level, or anywhere."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for node in ast.walk(block)
    }
    if module_level_only:
        skipped |= {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for node in ast.walk(block)
        }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _graph(module_level_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, module_level_only) for name, path in modules.items()}


def test_the_walker_sees_function_local_imports() -> None:
    assert "napari_stem.stem.sampling" in _graph()["napari_stem.predict"]  # imported inside iter_predict
    assert "napari_stem.predict" not in _graph()["napari_stem.stem.sampling"]  # the cycle this test was written for
    assert "napari_stem.stem.sampling" not in _graph(module_level_only=True)["napari_stem.predict"]
    assert "napari_stem.errors" in _graph(module_level_only=True)["napari_stem.predict"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_at_module_level() -> None:
    assert _cycles(_graph(module_level_only=True)) == []


def test_no_import_cycles_even_through_function_local_imports() -> None:
    assert _cycles(_graph()) == []


def test_the_core_values_and_checks_import_without_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in TORCH_FREE)
        + "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'napari', 'qtpy') if m in sys.modules)\n"
        + "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", f"importing {', '.join(TORCH_FREE)} imported {result.stdout.strip()}"


def test_auto_is_resolved_in_one_place() -> None:
    """Every "auto" device resolution goes through napari_stem.devices.resolve_device_name."""
    from napari_stem.devices import resolve_device_name

    assert resolve_device_name("auto", lambda: True) == "cuda" and resolve_device_name("auto", lambda: False) == "cpu"
    assert (
        resolve_device_name("cuda:1", lambda: False) == "cuda:1" and resolve_device_name("cpu", lambda: True) == "cpu"
    )
    inline = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _modules().values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if '"cuda" if torch.cuda.is_available() else "cpu"' in line
    ]
    assert inline == [], f"resolve 'auto' with napari_stem.devices.resolve_device_name, not inline: {inline}"


def test_the_trained_chain_length_is_one_constant() -> None:
    from napari_stem import validate
    from napari_stem.stem import diffusion, model_config

    assert (
        diffusion.N_TRAIN_STEPS is model_config.N_TRAIN_STEPS
        and validate.MAX_DIFFUSION_STEPS == model_config.N_TRAIN_STEPS
    )
    assert len(diffusion.linear_betas()) == model_config.N_TRAIN_STEPS
