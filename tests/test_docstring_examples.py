"""The docstring examples of every qdetr package run and pass, and every public API has one.

* every module of ``qdetr.quant``, ``qdetr.layers``, ``qdetr.distill``, ``qdetr.models``,
  ``qdetr.zoo``, ``qdetr.data`` and ``qdetr.engine`` (and ``qdetr.testing``) is run through the
  standard library's :func:`doctest.testmod`, with ``torch``, ``nn`` and ``qdetr`` in scope,
  offline, with empty temporary ``QDETR_CACHE`` / ``HF_HOME``, inside a temporary working
  directory, outside ``torchrun``, and with the RNG states, the fake-quant kernel backend and
  the model / zoo registries restored afterwards (examples may register entries);
* every public class and function in the packages' ``__all__`` has an ``Examples`` section.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import random

import numpy as np
import pytest
import torch

import qdetr
from qdetr.quant import kernels

PACKAGES = ["qdetr.quant", "qdetr.layers", "qdetr.distill", "qdetr.models", "qdetr.zoo", "qdetr.data", "qdetr.engine", "qdetr.ops", "qdetr.export"]
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules(package_name: str) -> list[str]:
    package = importlib.import_module(package_name)
    return [package_name] + [f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]


MODULES = [name for package in PACKAGES for name in _modules(package)] + ["qdetr.testing", "qdetr.errors", "qdetr.image_io"]


def _public_callables(package_name: str) -> list[tuple[str, object]]:
    package = importlib.import_module(package_name)
    objects = [(name, getattr(package, name)) for name in package.__all__]
    return [(name, obj) for name, obj in objects if inspect.isclass(obj) or inspect.isfunction(obj)]


def _own_docstring(obj: object) -> str:
    """The object's own docstring (a class does not inherit its base's)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


@pytest.fixture
def isolated_examples(tmp_path, monkeypatch):
    """Offline, empty caches, temporary cwd, single process; global state restored afterwards."""
    from qdetr.models import registry as model_registry
    from qdetr.zoo import registry as zoo_registry

    monkeypatch.setenv("QDETR_CACHE", str(tmp_path / "qdetr-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    registries = (model_registry._REGISTRY, model_registry._CONFIGS, zoo_registry._REGISTRY)
    saved = [dict(r) for r in registries]
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    previous_backend = kernels.get_kernel_backend()
    kernels.set_kernel_backend("eager")  # the compiled kernels take seconds to build
    torch.manual_seed(0)
    try:
        yield
    finally:
        kernels.set_kernel_backend(previous_backend)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        for registry, before in zip(registries, saved):
            registry.clear()
            registry.update(before)


def test_every_submodule_is_collected():
    expected = {
        "qdetr.quant.quantizers",
        "qdetr.layers.attention",
        "qdetr.distill.fqm",
        "qdetr.models.registry",
        "qdetr.zoo.packing",
        "qdetr.data.synthetic",
        "qdetr.engine.trainer",
    }
    assert expected <= set(MODULES)
    assert len(MODULES) == len(set(MODULES)) >= 60


@pytest.mark.parametrize("module_name", [m for m in MODULES if m not in PACKAGES])
def test_every_module_has_examples_to_run(module_name):
    """Guards against a silent no-op: each implementation module has runnable examples."""
    tests = doctest.DocTestFinder().find(importlib.import_module(module_name))
    assert sum(len(t.examples) for t in tests) > 0, f"{module_name} has no docstring examples"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, isolated_examples):
    module = importlib.import_module(module_name)
    result = doctest.testmod(
        module,
        optionflags=OPTIONFLAGS,
        extraglobs={"torch": torch, "nn": torch.nn, "qdetr": qdetr},
        report=True,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module_name} (see stdout)"
    assert kernels.get_kernel_backend() == "eager", f"an example of {module_name} switched the kernel backend"


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_class_and_function_has_an_example(package_name):
    public = _public_callables(package_name)
    assert public, f"{package_name}.__all__ lists no classes or functions"
    missing = [f"{package_name}.{name}" for name, obj in public if "Example" not in _own_docstring(obj)]
    assert not missing, f"public objects without an 'Examples:' section in their docstring: {missing}"


def test_the_example_audit_can_fail():
    undocumented = type("Undocumented", (), {"__doc__": "Shapes only."})
    assert "Example" not in _own_docstring(undocumented)
    assert "Example" not in _own_docstring(type("Child", (qdetr.quant.QuantLinear,), {}))
    assert _own_docstring(type("Bare", (), {})) == ""
