"""The package's layering: handlers and estimators below inference, the oracle above it."""

import ast
import doctest
import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import pyro_lm

MODULES = sorted(m.name for m in pkgutil.walk_packages(pyro_lm.__path__, "pyro_lm."))


def test_the_library_never_imports_the_exact_oracle():
    code = ("import sys, pyro_lm, pyro_lm.infer, pyro_lm.diagnostics, pyro_lm.rewards; "
            "print('pyro_lm.exact' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
    assert pyro_lm.exact.enumerate_model  # still reachable as pyro_lm.exact


def imports(name):
    """The pyro_lm modules that module ``name`` imports (from its source)."""
    tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("pyro_lm")}


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(("pyro_lm.poutine",
                                                                      "pyro_lm.ops"))])
def test_handlers_and_estimators_sit_below_inference_and_diagnostics(name):
    above = [m for m in imports(name)
             if m.startswith(("pyro_lm.infer", "pyro_lm.diagnostics", "pyro_lm.exact"))]
    assert not above, (name, above)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "pyro_lm.exact"])
def test_nothing_in_the_library_imports_the_oracle(name):
    assert "pyro_lm.exact" not in imports(name), name


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("pyro_lm.rewards")])
def test_no_reward_imports_diagnostics(name):
    assert not [m for m in imports(name) if m.startswith("pyro_lm.diagnostics")], name


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(
    ("pyro_lm.poutine.", "pyro_lm.ops.", "pyro_lm.distributions.lm_distribution"))])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def module_imports(name):
    """The pyro_lm modules (not packages) that module ``name`` imports, deferred imports
    inside functions included (they only hide a cycle)."""
    tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_lm"):
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("pyro_lm")]
        out.update(t for t in targets if t in MODULES and not is_package(t))
    return out


def is_package(name):
    return importlib.util.find_spec(name).submodule_search_locations is not None


def test_no_import_cycle_between_modules():
    graph = {m: module_imports(m) for m in MODULES if not is_package(m)}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
