"""The top-level kernels/ folder ships as qtune.kernels and never poses as the 'kernels' hub package."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_qtune_kernels_imports_from_anywhere(tmp_path):
    result = _python("import qtune.kernels.nf4, qtune.kernels.w4a16, qtune.kernels.qlora_linear", tmp_path)
    assert result.returncode == 0, result.stderr


def test_kernels_is_not_importable_outside_the_checkout(tmp_path):
    result = _python("import kernels", tmp_path)
    assert result.returncode != 0 and "No module named 'kernels'" in result.stderr


def test_from_the_repository_root_kernels_is_an_empty_namespace_that_libraries_treat_as_absent():
    # Python makes any folder in the working directory importable by name; with no __init__.py ours is an
    # empty namespace, so bitsandbytes' probe fails and transformers reports the hub package missing.
    code = (
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'get_kernel')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('get_kernel imported')\n"
    )
    result = _python(code, REPO)
    assert result.returncode == 0, result.stderr
    assert not (REPO / "kernels" / "__init__.py").exists()


def _qtune_imports(path) -> set[str]:
    """The qtune modules a file imports, at the top or inside functions (``if TYPE_CHECKING`` blocks aside)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: qtune imports itself by absolute names"
            base = node.module or ""
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "qtune" or name.startswith("qtune.")}


def test_qtune_has_no_import_cycles():
    """Imports inside functions count: a cycle hidden in a function is still a cycle between concepts."""
    package = REPO / "qtune"
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in package.rglob("*.py")}
    graph = {name: {m for m in _qtune_imports(path) if m in files and m != name} for name, path in files.items()}
    for name in graph:  # a package's __init__ is not an edge of its own: importing qtune.x imports qtune first
        graph[name].discard("qtune")
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_public_api_resolves_without_importing_torch_first(tmp_path):
    code = (
        "import sys, qtune, qtune.cli, qtune.recipe\n"
        "assert 'torch' not in sys.modules, 'import qtune (or its CLI, or its recipe) imported torch'\n"
        "import importlib\n"
        "assert sorted(qtune.__all__) == sorted(qtune._HOMES)\n"
        "for name in qtune.__all__:\n"
        "    home = importlib.import_module(qtune._HOMES[name])\n"
        "    assert getattr(qtune, name) is getattr(home, name), name\n"
        "import qtune.training\n"
        "assert callable(qtune.train) and qtune.train is qtune.training.train\n"
        "assert set(qtune.__all__) <= set(dir(qtune))\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_skip_for_a_missing_oracle_fails_an_unmarked_test_and_fails_any_test_when_oracles_are_required():
    from oracles import MISSING, oracle_skip_failure

    reason = f"{MISSING}: llama-cpp-python (bash scripts/build_oracles.sh builds it)"
    assert "not marked `oracle`" in oracle_skip_failure(reason, marked=False, required=False)
    assert oracle_skip_failure(reason, marked=True, required=False) is None
    assert "QTUNE_REQUIRE_ORACLES" in oracle_skip_failure(reason, marked=True, required=True)
    assert oracle_skip_failure("needs a CUDA device", marked=False, required=True) is None


def test_ci_runs_the_quick_lane_before_building_the_oracles_and_requires_them_after():
    check = "\n".join(line for line in (REPO / "scripts" / "check.sh").read_text().splitlines() if not line.startswith("#"))
    steps = ("ruff", '-m "not slow and not oracle"', "bash scripts/build_oracles.sh >>", "QTUNE_REQUIRE_ORACLES=1", '-m "oracle or slow"')
    order = [check.index(step) for step in steps]
    assert order == sorted(order)
    assert "bash scripts/build_oracles.sh --no-install" in check  # beside the quick lane, .venv untouched
    assert "bash scripts/setup.sh --test && bash scripts/check.sh" in (REPO / ".ci" / "run").read_text()
