"""The docstring examples of ``qdetr.models``, ``qdetr.zoo`` and ``qdetr.testing`` run and pass.

* every module of the two packages (and ``qdetr.testing``) is run through the standard
  library's :func:`doctest.testmod`, offline, with an empty temporary ``QDETR_CACHE``, inside
  a temporary working directory, and with the model and zoo registries restored afterwards
  (examples may register entries);
* every public class and function in the packages' ``__all__`` has an ``Example`` section.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

PACKAGES = ["qdetr.models", "qdetr.zoo"]
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        names += [f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    return sorted(names) + ["qdetr.testing"]


@pytest.fixture
def isolated_examples(tmp_path, monkeypatch):
    """Offline, empty cache, temporary working directory, registries restored afterwards."""
    from qdetr.models import registry as model_registry
    from qdetr.zoo import registry as zoo_registry

    monkeypatch.setenv("QDETR_CACHE", str(tmp_path / "qdetr-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    saved = (dict(model_registry._REGISTRY), dict(model_registry._CONFIGS), dict(zoo_registry._REGISTRY))
    rng_state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(rng_state)
    for registry, before in zip(
        (model_registry._REGISTRY, model_registry._CONFIGS, zoo_registry._REGISTRY), saved
    ):
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("module_name", _module_names())
def test_docstring_examples_pass(module_name, isolated_examples):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=OPTIONFLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module_name} (see stdout)"


def _own_docstring(obj: object) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_class_and_function_has_an_example(package_name):
    package = importlib.import_module(package_name)
    public = [(name, getattr(package, name)) for name in package.__all__]
    callables = [(name, obj) for name, obj in public if inspect.isclass(obj) or inspect.isfunction(obj)]
    assert len(callables) >= 20, f"{package_name}.__all__ lists only {len(callables)} classes/functions"
    missing = [name for name, obj in callables if "Example" not in _own_docstring(obj)]
    assert not missing, f"{package_name}: public objects without an 'Example:' section: {missing}"


def test_the_example_check_can_fail():
    def undocumented():
        """Does something."""

    assert "Example" not in _own_docstring(undocumented)
    assert _own_docstring(type("Bare", (), {})) == ""


def test_every_module_has_examples_to_run():
    """The doctest collection finds examples in the key modules (guards against a silent no-op)."""
    finder = doctest.DocTestFinder()
    for module_name in ("qdetr.models.registry", "qdetr.zoo.hub", "qdetr.zoo.packing"):
        module = importlib.import_module(module_name)
        assert sum(len(t.examples) for t in finder.find(module)) > 0, module_name
