"""The package's shape, checked from the source (no imports run).

- packages along the pipeline: an import may only go to the same package or one the
  package is allowed to use (no import runs back up the pipeline);
- no import cycles between modules (lazy imports inside functions count too: a cycle
  hidden in a function is still two modules that need each other);
- the torch boundary: only ``harness/cell`` imports torch and the training libraries;
- small units: no module over 400 lines, no function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "harness"

# package -> the packages its modules may import (besides their own)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "cell": {"core"},
    "plan": {"core"},
    "run": {"core", "plan"},
    "fit": {"core", "plan", "run"},
    "report": {"core"},
    "cli": {"core", "plan", "run", "fit", "report"},
    # the front-ends and the package's face
    "pytest_plugin": {"core", "plan", "run", "fit", "report", "pytest_session"},
    "pytest_session": {"core", "plan", "run", "fit", "report"},
    "__init__": {"report"},
    "__main__": {"cli"},
}
TORCH_LIBS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Harness modules a file imports (``from harness.x import y`` counts as harness.x.y
    when that is a module, else harness.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not (node.module == "harness" or node.module.startswith("harness.")):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness.")}
    return {m for m in found if m in known and m != "harness"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def test_imports_follow_the_pipeline():
    bad = []
    for mod, deps in graph().items():
        pkg = package_of(mod)
        for dep in deps:
            target = package_of(dep)
            if target != pkg and target not in ALLOWED.get(pkg, set()):
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the pipeline: " + "; ".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_cell_package_imports_torch():
    bad = []
    for mod, path in modules().items():
        if package_of(mod) == "cell":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{mod} imports {n}" for n in names if n.split(".")[0] in TORCH_LIBS]
    assert not bad, "; ".join(bad)


def test_units_stay_small():
    too_long = []
    for mod, path in modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{mod}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{mod}.{node.name}: {n} lines")
    assert not too_long, "; ".join(too_long)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above are only worth something if they can fail."""
    pkg = tmp_path / "harness"
    (pkg / "core").mkdir(parents=True)
    (pkg / "report").mkdir()
    (pkg / "core" / "a.py").write_text("from harness.report import b\n")
    (pkg / "report" / "b.py").write_text("from harness.core import a\n")
    known = {"harness.core.a", "harness.report.b"}
    assert imports_of(pkg / "core" / "a.py", known) == {"harness.report.b"}
    assert "report" not in ALLOWED["core"]
    assert imports_of(pkg / "report" / "b.py", known) == {"harness.core.a"}
