"""Packed low-bit ``model.safetensors``: write a quantized model's state, read it back bit-exactly.

What is stored:

* for every weight whose quantizer is enabled and calibrated (a child ``<p>_quantizer``
  with ``integer_codes`` next to the Parameter ``<p>``, e.g. ``weight_quantizer`` ->
  ``weight``, ``in_proj_weight_quantizer`` -> ``in_proj_weight``): the integer codes
  ``W_int = clip(round(W / s), Qn, Qp)`` bit-packed at the quantizer's width under
  ``<p>.packed_codes`` (see :mod:`qdetr.zoo.packing`), **instead of** the float latent
  weight. The step sizes stay in the state dict (``<quantizer>.scale``) in their own dtype;
* every other tensor (biases, norms, float-kept layers, activation quantizers) as is;
* tensors that share storage are stored once; an alias table maps the other names to it.

The safetensors header metadata holds, as JSON, the shape, dtype, bits and ``qmin`` of each
packed weight and the alias table, so the file is self-describing.

Loading dequantises ``W = W_int * s`` with the stored (clamped) step, so the fake-quant
forward reproduces the saved model bit-exactly: ``round(clip(W/s)) * s == W`` because
``W/s`` is ``W_int`` up to one rounding error. Training restarted from a packed file
therefore starts from the dequantised weights, not from the original latent weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qdetr.zoo.packing import pack_codes, unpack_codes

__all__ = [
    "PACKED_SUFFIX",
    "PACKED_FORMAT_VERSION",
    "QuantizedWeight",
    "find_quantized_weights",
    "save_packed_state",
    "load_packed_state",
    "read_packed_state_dict",
    "packed_weight_names",
]

#: Suffix of the key holding a packed weight's codes (``<param>.packed_codes``).
PACKED_SUFFIX = ".packed_codes"
#: Version of the tensor layout written in the safetensors metadata.
PACKED_FORMAT_VERSION = 1

_QUANTIZER_SUFFIX = "_quantizer"


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight Parameter stored as integer codes.

    Attributes:
        param_name: state-dict name of the weight (``<module>.weight``).
        quantizer_name: qualified name of its weight quantizer module.
        quantizer: the quantizer (``LSQWeightQuantizer``-like: ``bits``, ``qmin``, ``qmax``,
            ``axis``, ``per_channel``, ``scale``, ``integer_codes``).

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import find_quantized_weights
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)
        >>> (qw,) = find_quantized_weights(model, require_active=False)
        >>> qw.param_name, qw.quantizer_name, qw.quantizer.bits
        ('0.weight', '0.weight_quantizer', 4)
    """

    param_name: str
    quantizer_name: str
    quantizer: nn.Module


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_quantized_weights(model: nn.Module, *, require_active: bool = True) -> list[QuantizedWeight]:
    """Weights of ``model`` that have an integer weight quantizer.

    Args:
        model: a quantized model.
        require_active: keep only quantizers that are enabled and calibrated (the ones whose
            fake-quant output is ``s * W_int``).

    Returns:
        One :class:`QuantizedWeight` per quantized Parameter, in module order.

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import find_quantized_weights
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), bits=4)
        >>> [qw.param_name for qw in find_quantized_weights(model)]
        ['0.weight', '2.weight']
        >>> model[2].weight_quantizer.enabled = False     # a disabled quantizer is not active
        >>> [qw.param_name for qw in find_quantized_weights(model)]
        ['0.weight']
        >>> len(find_quantized_weights(model, require_active=False))
        2
    """
    found = []
    for module_name, module in model.named_modules():
        for child_name, child in module.named_children():
            if not child_name.endswith(_QUANTIZER_SUFFIX) or not hasattr(child, "integer_codes"):
                continue
            param_attr = child_name[: -len(_QUANTIZER_SUFFIX)]
            if not isinstance(module._parameters.get(param_attr), nn.Parameter):
                continue
            if require_active and not (getattr(child, "enabled", True) and getattr(child, "is_initialized", True)):
                continue
            found.append(QuantizedWeight(_join(module_name, param_attr), _join(module_name, child_name), child))
    return found


def _step_view(quantizer: nn.Module, scale: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """The clamped step ``s`` broadcast along the quantizer's channel axis of an ``ndim``-D weight."""
    from qdetr.quant.quantizers import MIN_STEP

    step = scale.to(dtype).clamp_min(MIN_STEP)
    if not getattr(quantizer, "per_channel", True) or step.numel() == 1:
        return step.reshape([1] * ndim)
    axis = quantizer.axis if quantizer.axis >= 0 else ndim + quantizer.axis
    shape = [1] * ndim
    shape[axis] = -1
    return step.reshape(shape)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


def _split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store shared tensors once: identical views become aliases, overlapping others are cloned."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if t.numel():
            by_storage.setdefault(_storage_key(t), []).append(name)
    out = dict(tensors)
    aliases: dict[str, str] = {}
    for names in by_storage.values():
        if len(names) < 2:
            continue
        canonical: dict[tuple, str] = {}
        for name in names:
            t = tensors[name]
            view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if view in canonical:
                aliases[name] = canonical[view]
                del out[name]
            else:
                canonical[view] = name
                out[name] = t.clone()
    return {k: v.contiguous() for k, v in out.items()}, aliases


@torch.no_grad()
def save_packed_state(model: nn.Module, path: str | os.PathLike, *, extra_metadata: dict[str, str] | None = None) -> dict:
    """Write ``model``'s state dict to ``path`` (safetensors) with quantized weights packed.

    Args:
        model: a model (quantized or not; a float model is saved as plain tensors).
        path: output ``.safetensors`` file.
        extra_metadata: string entries added to the safetensors header.

    Returns:
        Summary ``{"packed": {param: bits}, "float_tensors": n, "aliases": {...}}``.

    Raises:
        RuntimeError: if a quantizer's fake-quant weight is not ``codes * step`` (then the
            packed file could not reproduce the model).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import save_packed_state
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)
        >>> _ = model.train()(torch.randn(2, 8))      # calibrate
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     summary = save_packed_state(model.eval(), Path(tmp) / "model.safetensors")
        >>> summary["packed"], summary["aliases"]
        ({'0.weight': 4}, {})
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    packed_meta: dict[str, dict] = {}
    for qw in find_quantized_weights(model):
        weight = state[qw.param_name]
        scale = state[f"{qw.quantizer_name}.scale"]
        q = qw.quantizer
        codes = q.integer_codes(weight)
        dequantised = codes.to(weight.dtype) * _step_view(q, scale, weight.dim(), weight.dtype)
        was_training = q.training
        q.eval()
        fake = q(weight)
        q.train(was_training)
        if not torch.equal(fake, dequantised):
            raise RuntimeError(
                f"{qw.param_name}: the quantizer's fake-quant weight differs from codes * step; this quantizer "
                f"cannot be stored packed (save the float state dict instead)"
            )
        key = qw.param_name + PACKED_SUFFIX
        if key in state:
            raise RuntimeError(f"state dict already has a tensor named {key!r}; cannot store packed codes there")
        del state[qw.param_name]
        state[key] = pack_codes(codes.cpu(), bits=q.bits, qmin=q.qmin)
        packed_meta[qw.param_name] = {
            "shape": list(weight.shape),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "bits": int(q.bits),
            "qmin": int(q.qmin),
            "quantizer": qw.quantizer_name,
        }
    tensors, aliases = _split_aliases({k: v.cpu() for k, v in state.items()})
    metadata = {
        "format": "pt",
        "qdetr_packed_format_version": str(PACKED_FORMAT_VERSION),
        "qdetr_packed": json.dumps(packed_meta, sort_keys=True),
        "qdetr_aliases": json.dumps(aliases, sort_keys=True),
    }
    metadata.update(extra_metadata or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return {
        "packed": {k: v["bits"] for k, v in packed_meta.items()},
        "float_tensors": len(tensors) - len(packed_meta),
        "aliases": aliases,
    }


def read_packed_state_dict(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a packed safetensors file into a plain (dequantised) state dict on CPU.

    The names of the weights that were stored packed are in ``packed_weight_names(path)``.

    Args:
        path: file written by :func:`save_packed_state`.
        model: optional target; its quantizers are checked against the stored bits/``qmin``
            and give the channel axis of each step.

    Returns:
        A state dict whose quantized weights are ``W_int * s``.

    Raises:
        ValueError: unknown format version, or a target quantizer that disagrees with the file.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import read_packed_state_dict, save_packed_state
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)
        >>> _ = model.train()(torch.randn(2, 8))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "model.safetensors"
        ...     _ = save_packed_state(model.eval(), path)
        ...     state = read_packed_state_dict(path, model)
        >>> weight = state["0.weight"]                # dequantised W_int * s
        >>> weight.shape, torch.equal(weight, model[0].weight_quantizer(model[0].weight))
        (torch.Size([4, 8]), True)
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    version = int(metadata.get("qdetr_packed_format_version", PACKED_FORMAT_VERSION))
    if version > PACKED_FORMAT_VERSION:
        raise ValueError(f"{path} uses packed format version {version}; this qdetr reads up to "
                         f"{PACKED_FORMAT_VERSION}; upgrade qdetr")
    packed_meta = json.loads(metadata.get("qdetr_packed", "{}"))
    aliases = json.loads(metadata.get("qdetr_aliases", "{}"))
    quantizers = {qw.quantizer_name: qw.quantizer for qw in find_quantized_weights(model, require_active=False)} \
        if model is not None else {}
    for param_name, info in packed_meta.items():
        shape, bits, qmin = tuple(info["shape"]), int(info["bits"]), int(info["qmin"])
        dtype = getattr(torch, info["dtype"])
        quantizer = quantizers.get(info["quantizer"])
        if model is not None:
            if quantizer is None:
                raise ValueError(f"{path}: {param_name} is stored as {bits}-bit codes but the model has no weight "
                                 f"quantizer {info['quantizer']!r}; build the model from the same config.json")
            if int(quantizer.bits) != bits or int(quantizer.qmin) != qmin:
                raise ValueError(
                    f"{path}: {param_name} was packed at {bits} bits (qmin {qmin}) but the model's quantizer has "
                    f"{quantizer.bits} bits (qmin {quantizer.qmin}); build the model with the saved QuantConfig"
                )
        numel = 1
        for s in shape:
            numel *= s
        codes = unpack_codes(state.pop(param_name + PACKED_SUFFIX), bits=bits, qmin=qmin, numel=numel, shape=shape,
                             dtype=torch.int16)
        scale = state[f"{info['quantizer']}.scale"]
        step = _step_view(quantizer if quantizer is not None else _PerChannelAxis0(), scale, len(shape), dtype)
        state[param_name] = codes.to(dtype) * step
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state


def packed_weight_names(path: str | os.PathLike) -> list[str]:
    """Names of the weights stored as packed integer codes in ``path``.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import packed_weight_names, save_packed_state
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), bits=2)
        >>> _ = model.train()(torch.randn(2, 8))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "model.safetensors"
        ...     _ = save_packed_state(model.eval(), path)
        ...     names = packed_weight_names(path)
        >>> names
        ['0.weight', '2.weight']
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    return sorted(json.loads(metadata.get("qdetr_packed", "{}")))


class _PerChannelAxis0:
    """Default step layout (per output channel on axis 0) when no model is given."""

    per_channel = True
    axis = 0


@torch.no_grad()
def load_packed_state(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a packed safetensors file into ``model`` strictly and check bit-exactness.

    Args:
        model: a model with the saved structure (same quantizers).
        path: file written by :func:`save_packed_state`.

    Returns:
        ``model``.

    Raises:
        RuntimeError: missing/unexpected keys (strict load), or a quantizer whose fake-quant
            output is not the loaded weight.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.packed_state import load_packed_state, save_packed_state
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)
        >>> _ = model.train()(torch.randn(2, 8))
        >>> fresh = quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "model.safetensors"
        ...     _ = save_packed_state(model.eval(), path)
        ...     loaded = load_packed_state(fresh, path)
        >>> x = torch.randn(3, 8)
        >>> loaded is fresh, torch.equal(loaded.eval()(x), model(x))    # bit-exact
        (True, True)
    """
    state = read_packed_state_dict(path, model)
    model.load_state_dict(state, strict=True)
    packed = set(packed_weight_names(path))
    for qw in find_quantized_weights(model, require_active=False):
        if qw.param_name not in packed:
            continue
        weight = model.get_parameter(qw.param_name)
        was_training = qw.quantizer.training
        qw.quantizer.eval()
        same = torch.equal(qw.quantizer(weight), weight)
        qw.quantizer.train(was_training)
        if not same:
            raise RuntimeError(f"{qw.param_name}: fake-quant of the loaded weight is not the weight itself; "
                               f"the file and the model's quantizer disagree")
    return model
