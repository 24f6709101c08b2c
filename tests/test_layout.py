"""components/ is one sub-package per stage, and its imports run downward, with no circles.

Read from the source (every import, including those inside functions and under TYPE_CHECKING), so a
lazy import cannot hide a dependency: the graph is what a reader sees, not what happens to run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ROOT / "components"
PACKAGE = "shopvision.components"
# A stage may import itself and the stages before it; the shared helpers (errors, progress,
# step_output, directly in components/) import no stage. registry and similarity both build on
# evaluation and know nothing of each other; cluster runs training and serving on Kubernetes.
LEVEL = {"": 0, "data": 1, "training": 2, "evaluation": 3, "registry": 4, "similarity": 4, "cluster": 5}
# Nothing in the steps may know the layers built over them, nor the orchestrator and web framework.
FORBIDDEN = (
    "kfp",
    "fastapi",
    "uvicorn",
    "starlette",
    "shopvision.cli",
    "shopvision.commands",
    "shopvision.pipelines",
    "shopvision.serving",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(COMPONENTS).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(COMPONENTS.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (absolute names), resolving relative imports and `from . import x`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from . import metrics` names a module, not an attribute
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
    return found


def _stage(name: str) -> str:
    """The stage folder a module (or a stage package itself) belongs to; "" for the shared helpers."""
    first = name.removeprefix(PACKAGE).lstrip(".").split(".")[0]
    return first if first in LEVEL else ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: {t for t in _imports(name, path, known) if t in known and t != name}
        for name, path in modules.items()
    }


def test_every_module_lives_in_a_stage_folder_or_is_a_shared_helper():
    top = sorted(p.name for p in COMPONENTS.glob("*.py"))
    assert top == ["__init__.py", "errors.py", "progress.py", "step_output.py"]
    folders = sorted(p.name for p in COMPONENTS.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(s for s in LEVEL if s)
    for folder in folders:
        assert (COMPONENTS / folder / "__init__.py").read_text(encoding="utf-8").startswith('"""'), folder


def test_imports_run_downward():
    upward = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if _stage(target) != _stage(name) and LEVEL[_stage(target)] >= LEVEL[_stage(name)]
    ]
    assert upward == []


def test_no_step_imports_the_cli_the_server_or_kfp():
    modules = _modules()
    bad = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(name, path, set(modules))
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert bad == []


def test_only_cluster_talks_to_kubernetes():
    modules = _modules()
    talking = sorted(
        name
        for name, path in modules.items()
        if any(t == "kubernetes" or t.startswith("kubernetes.") for t in _imports(name, path, set(modules)))
    )
    assert talking and all(_stage(name) == "cluster" for name in talking), talking


def test_no_import_circles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


@pytest.mark.parametrize(
    "source",
    [
        "import shopvision.components.data.images\n",
        "from shopvision.components.training import models\n",
    ],
)
def test_the_checker_sees_absolute_imports(source, tmp_path):
    path = tmp_path / "x.py"
    path.write_text(source)
    known = set(_modules())
    assert _imports(f"{PACKAGE}.data.x", path, known) & known


def test_the_checker_sees_lazy_relative_and_type_checking_imports(tmp_path):
    path = tmp_path / "x.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..training.models import ModelSpec\n"
        "def f():\n    from . import clean\n    from ..errors import StepError\n"
    )
    found = _imports(f"{PACKAGE}.data.x", path, set(_modules()))
    assert {f"{PACKAGE}.training.models", f"{PACKAGE}.data.clean", f"{PACKAGE}.errors"} <= found


def test_every_import_of_a_step_names_its_stage():
    """No `shopvision.components.<module>` from before the stage folders, not even in a lazy import."""
    allowed = {"errors", "progress", "step_output"} | {s for s in LEVEL if s}
    stale = []
    for folder in ("components", "pipelines", "serving", "shopvision", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for match in re.finditer(r"shopvision\.components\.(\w+)", path.read_text(encoding="utf-8")):
                if match.group(1) not in allowed:
                    stale.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert stale == []
