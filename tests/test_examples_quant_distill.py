"""The docstring examples of ``qdetr.quant``, ``qdetr.layers`` and ``qdetr.distill`` run and pass.

Every module of the three packages is run through the stdlib :mod:`doctest` (module globals
plus ``torch``, ``nn`` and ``qdetr`` are in scope), and every public class and function
listed in the packages' ``__all__`` must show an ``Example:`` section.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

import qdetr
from qdetr.quant import kernels

PACKAGES = ["qdetr.quant", "qdetr.layers", "qdetr.distill"]


def _modules(package_name: str) -> list[str]:
    package = importlib.import_module(package_name)
    names = [package_name]
    names += [f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    return names


MODULES = [name for package in PACKAGES for name in _modules(package)]


def _public_callables(package_name: str) -> list[tuple[str, object]]:
    package = importlib.import_module(package_name)
    out = []
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((name, obj))
    return out


def _own_docstring(obj: object) -> str:
    """The object's own docstring (a class does not inherit its base's)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


@pytest.fixture
def example_state():
    """Eager fake-quant kernels (the compiled ones take seconds to build); RNG state restored."""
    previous = kernels.get_kernel_backend()
    rng_state = torch.random.get_rng_state()
    kernels.set_kernel_backend("eager")
    torch.manual_seed(0)
    try:
        yield
    finally:
        kernels.set_kernel_backend(previous)
        torch.random.set_rng_state(rng_state)


def test_every_submodule_is_collected():
    assert {"qdetr.quant.quantizers", "qdetr.layers.attention", "qdetr.distill.fqm"} <= set(MODULES)
    assert len(MODULES) == len(set(MODULES)) >= 18


@pytest.mark.parametrize("module_name", [m for m in MODULES if m not in PACKAGES])
def test_every_module_has_examples_to_run(module_name):
    """Guards against a silent no-op: each implementation module has runnable examples."""
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder().find(module)
    assert sum(len(t.examples) for t in tests) > 0, f"{module_name} has no docstring examples"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, example_state):
    module = importlib.import_module(module_name)
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        extraglobs={"torch": torch, "nn": torch.nn, "qdetr": qdetr},
        report=True,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {module_name}"
    assert kernels.get_kernel_backend() == "eager", f"an example of {module_name} switched the kernel backend"


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_class_and_function_has_an_example(package_name):
    public = _public_callables(package_name)
    assert public, f"{package_name}.__all__ lists no classes or functions"
    missing = [f"{package_name}.{name}" for name, obj in public if "Example" not in _own_docstring(obj)]
    assert not missing, f"public objects without an 'Example:' section in their docstring: {missing}"


def test_the_example_audit_can_fail():
    undocumented = type("Undocumented", (), {"__doc__": "Shapes only."})
    assert "Example" not in _own_docstring(undocumented)
    assert "Example" not in _own_docstring(type("Child", (qdetr.quant.QuantLinear,), {}))
