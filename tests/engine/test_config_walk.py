"""Every field of the library's config dataclasses is settable from YAML and from ``--set``.

The test walks the dataclass fields (it does not list them), so a field added to
``QuantConfig``, ``DistillationConfig``, ``DetrConfig``/``SmcaConfig``, ``TransformConfig`` or
any section later is covered automatically.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from qdetr.engine.config import TrainConfig

# values tried, in order, for fields whose type alone does not say what is valid
_STRINGS = ["seed", "proj_out", "resnet_tiny", "resnet50", "type1", "bireal", "tensor", "per_tensor", "lsq+", "skip",
            "cpu", "jpg", "png", "x"]
# fields that are valid only together with others
_CONTEXT = {
    "data.dataset": {"data.train_images": "a", "data.train_ann": "a.json", "data.val_images": "b", "data.val_ann": "b.json"},
    "quant.two_stage": {"quant.stage1_epochs": 1, "epochs": 2},
    "quant.quantization.symmetric_activations": {"quant.quantization.profile": "deploy"},
}
_TUPLES = {
    "layers": (-2, -1), "overrides": (("backbone.*", 4),), "keep_float": ("class_embed*",),
    "stage1_keep_float": ("transformer*",), "train_scales": (64, 72), "crop_resize_scales": (64,),
    "crop_size": (40, 56), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "shapes": ("rectangle",),
}


def _candidates(name: str, annotation, default):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return [a for a in args if a != default]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out = []
        for arg in args:
            if arg is not type(None):
                out += _candidates(name, arg, default)
        return out + ([None] if default is not None else [])
    if annotation is bool:
        return [not default]
    if annotation is int:
        base = default if isinstance(default, int) else 4
        return [base + 1, base - 1, 2, 3, 64]
    if annotation is float:
        base = default if isinstance(default, (int, float)) else 0.5
        return [base * 0.5 if base else 0.25, base + 0.1, 0.3]
    if annotation is str:
        return [s for s in _STRINGS if s != default]
    if origin is tuple or annotation is tuple:
        return [_TUPLES[name]] if name in _TUPLES else []
    if annotation is dict or origin is dict:
        return []
    return []


def _leaves(cls, prefix: str, instance):
    """(dotted path, annotation, default) of every non-dataclass field, recursing into dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(type(value), f"{prefix}.{f.name}", value)
        else:
            yield f"{prefix}.{f.name}", hints[f.name], value


def _read(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _nested(path: str, value) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _as_yaml_scalar(value) -> str:
    value = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _same(read, value) -> bool:
    if isinstance(value, tuple):
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in read) == value
    return read == value


# a quantized, distilled run so that the quant and distill sections are live
_BASE = {"quant": {"quantization": {"bits": 4}, "float_checkpoint": "fp"}, "distill": {"enabled": True}}


def _library_leaves(model_name: str):
    config = TrainConfig.from_dict(_merge(_BASE, {"model": {"name": model_name}}))
    leaves = [
        *_leaves(type(config.quant.quantization), "quant.quantization", config.quant.quantization),
        *_leaves(type(config.distill.loss), "distill.loss", config.distill.loss),
        *_leaves(type(config.data.transforms), "data.transforms", config.data.transforms),
        *_leaves(type(config.data.synthetic), "data.synthetic", config.data.synthetic),
    ]
    architecture = config.model.architecture()
    leaves += [(path.replace("architecture.", "model.overrides."), a, d)
               for path, a, d in _leaves(type(architecture), "architecture", architecture)]
    # and the training sections themselves (everything but the embedded configs walked above)
    for section in ("data", "model", "quant", "distill", "optim"):
        obj = getattr(config, section)
        leaves += [(p, a, d) for p, a, d in _leaves(type(obj), section, obj)
                   if not p.startswith(("quant.quantization", "distill.loss", "data.transforms", "data.synthetic"))]
    return config, leaves


@pytest.mark.parametrize("model_name", ["detr_tiny", "smca_detr_tiny"])
def test_every_library_field_is_settable_from_yaml_and_set(model_name):
    base, leaves = _library_leaves(model_name)
    skipped = {"model.overrides", "model.name", "quant.float_checkpoint", "distill.teacher_model",
               "distill.enabled", "model.num_classes", "model.overrides.num_classes"}
    unreachable = []
    for path, annotation, default in leaves:
        if path in skipped:
            continue
        read_path = path.replace("model.overrides.", "model.architecture.")
        ok = False
        for value in _candidates(path.rsplit(".", 1)[-1], annotation, default):
            context = _CONTEXT.get(path, {})
            try:
                via_set = base.with_overrides([f"{k}={v}" for k, v in context.items()]
                                              + [f"{path}={_as_yaml_scalar(value)}"])
                yaml_dict = _merge(_BASE, {"model": {"name": model_name}})
                for key, extra in [*context.items(), (path, value)]:
                    yaml_dict = _merge(yaml_dict, _nested(key, extra))
                via_yaml = TrainConfig.from_dict(yaml_dict)
            except ValueError:
                continue  # not a valid value for this field: try the next one
            read = (lambda c: _read(c.model.architecture(), path.split(".")[-1])) if path.startswith(
                "model.overrides.") else (lambda c: _read(c, read_path))
            assert _same(read(via_set), value), (path, value, read(via_set))
            assert _same(read(via_yaml), value), (path, value, read(via_yaml))
            assert TrainConfig.from_dict(via_set.to_dict()) == via_set  # and it survives config.json
            ok = True
            break
        if not ok:
            unreachable.append(path)
    assert not unreachable, f"fields that could not be set from YAML / --set: {unreachable}"
    # the walk saw the options the configuration layer used to drop
    walked = {p for p, _, _ in leaves}
    assert {"distill.loss.mu_giou", "distill.loss.mu_l1", "quant.quantization.stem_bits", "quant.quantization.act_bits",
            "quant.quantization.overrides", "quant.quantization.quantize_downsample",
            "quant.quantization.weight.granularity", "quant.quantization.activation.zero_point_init"} <= walked
