"""Every public class and function of the public packages has a docstring.

"Public" means listed in ``__all__`` of ``qdetr``, ``qdetr.quant``, ``qdetr.distill``,
``qdetr.models``, ``qdetr.zoo``, ``qdetr.data``, ``qdetr.engine`` or ``qdetr.export``. Constants (tuples, dicts,
numbers) are documented by their module and are not checked here.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ["qdetr", "qdetr.quant", "qdetr.distill", "qdetr.models", "qdetr.zoo", "qdetr.data", "qdetr.engine", "qdetr.ops", "qdetr.export"]


def _public_callables(package_name: str) -> list[tuple[str, object]]:
    package = importlib.import_module(package_name)
    names = getattr(package, "__all__", None)
    assert names, f"{package_name} has no __all__"
    out = []
    for name in names:
        assert hasattr(package, name), f"{package_name}.__all__ lists {name!r}, which does not exist"
        obj = getattr(package, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((name, obj))
    return out


def _own_docstring(obj: object) -> str:
    """The object's own docstring (a class does not inherit its base's)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_class_and_function_has_a_docstring(package_name):
    missing = [f"{package_name}.{name}" for name, obj in _public_callables(package_name) if not _own_docstring(obj)]
    assert not missing, f"public objects without a docstring: {missing}"


def test_the_audit_sees_the_main_entry_points():
    names = {name for name, _ in _public_callables("qdetr")}
    assert {"quantize_model", "QuantConfig", "DistillationLoss", "create_model", "from_pretrained"} <= names
    assert _own_docstring(type("Undocumented", (), {})) == ""  # the check can fail
