"""The layout's rules, checked on the imports themselves (ast), so that a forbidden import fails here.

Two stage wings and one door: stage one (``features``) and stage two (``heads``) never import each other; the
cache is the only way between them and imports neither; ``results`` and ``report`` run without torch; the head
and its loss know nothing of files or tables; ``names`` imports nothing; no import circle; the product uses the
stages through their faces; nothing below the applications imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
STAGE_ONE, STAGE_TWO, CACHE = "pipeline.features", "pipeline.heads", "pipeline.cache"
RESULTS, REPORT, PRODUCT = "pipeline.results", "pipeline.report", "pipeline.detector"
APPLICATIONS = ("pipeline.cli", "pipeline.paper", "pipeline.demo", "pipeline.serve", "pipeline.__main__")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule when one is named, else the module the names come from)
    line: int
    top_level: bool  # at import time, not inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = {n for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(node)}  # fmt: skip
    for node in ast.walk(tree):
        top = node not in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno, top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                yield Import(name, submodule if submodule in known else origin, node.lineno, top)


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    found = modules()
    return [i for name, path in found.items() for i in imports_of(name, path, set(found))]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: list[Import], sources: str | tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    sources = (sources,) if isinstance(sources, str) else sources
    return [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if any(within(i.source, s) for s in sources) and any(within(i.target, t) for t in targets)
    ]


def test_stage_one_never_imports_stage_two_results_report_or_the_product(graph) -> None:
    assert violations(graph, STAGE_ONE, (STAGE_TWO, RESULTS, REPORT, PRODUCT, *APPLICATIONS)) == []


def test_stage_two_never_imports_stage_one_the_report_or_the_product(graph) -> None:
    assert violations(graph, STAGE_TWO, (STAGE_ONE, REPORT, PRODUCT, *APPLICATIONS)) == []


def test_the_cache_imports_neither_stage_nor_results(graph) -> None:
    assert violations(graph, CACHE, (STAGE_ONE, STAGE_TWO, RESULTS, REPORT, PRODUCT, *APPLICATIONS)) == []


def test_results_and_the_report_import_no_torch_and_no_application(graph) -> None:
    assert violations(graph, (RESULTS, REPORT), ("torch", STAGE_TWO, PRODUCT, *APPLICATIONS)) == []
    # and nothing they import at import time brings torch in
    code = (
        "import importlib, pkgutil, sys, pipeline.results, pipeline.report\n"
        "for package in (pipeline.results, pipeline.report):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print('torch' in sys.modules)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "False", child.stderr


def test_the_head_and_its_loss_import_neither_results_nor_the_cache(graph) -> None:
    heads = ("pipeline.heads.head", "pipeline.heads.head_stack", "pipeline.heads.loss")
    assert violations(graph, heads, (RESULTS, CACHE)) == []


def test_the_vocabulary_imports_nothing(graph) -> None:
    assert [i for i in graph if i.source == "pipeline.names"] == []


def test_the_product_uses_the_stages_through_their_faces(graph) -> None:
    reaching_in = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if within(i.source, PRODUCT) and any(within(i.target, s) and i.target != s for s in (STAGE_ONE, STAGE_TWO))
    ]
    assert reaching_in == []


def test_only_the_applications_import_the_applications(graph) -> None:
    below = [i for i in graph if not any(within(i.source, app) for app in APPLICATIONS)]
    assert violations(below, tuple(sorted({i.source for i in below})), APPLICATIONS) == []


def test_no_import_circle(graph) -> None:
    edges: dict[str, set[str]] = {}
    for i in graph:
        if i.top_level and i.target.startswith("pipeline") and i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_pipeline_help_loads_neither_torch_zarr_opencv_nor_scipy() -> None:
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'zarr', 'cv2', 'scipy') if m in sys.modules))"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout.strip().splitlines()[-1] == "[]", child.stderr


def test_every_name_a_face_lists_resolves() -> None:
    code = (
        "import importlib\n"
        "for face in ('pipeline', 'pipeline.cache', 'pipeline.features', 'pipeline.heads', 'pipeline.results',\n"
        "             'pipeline.detector', 'pipeline.report', 'pipeline.cli', 'pipeline.serve'):\n"
        "    module = importlib.import_module(face)\n"
        "    for name in module.__all__:\n"
        "        getattr(module, name)\n"
        "print('ok')"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "ok", child.stderr
