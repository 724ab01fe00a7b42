"""Convert a Q-DETR release (seed) state dict to the ``qdetr_smca_r50`` layout (checkpoints.md 2.4-2.7).

The release layout differs from ours in four ways, each handled by one table below:

* **aliases**: every attention stores its packed projection twice (``in_proj_weight`` and
  ``in_proj.weight``, same for the bias); the pair must be equal and ``in_proj.*`` is dropped;
* **dead quantizers**: 54 quantizer modules are never run by the seed (``in_proj.act`` and
  ``out_proj.act`` of every attention; the cross-attention ``in_proj``/``out_proj`` weight
  steps and ``norm_q``); their entries hold arbitrary values and are dropped, never loaded;
* **renames** (:data:`RENAME_RULES`): ``<L>.alpha`` -> ``<L>.weight_quantizer.scale``,
  ``<L>.act.alpha`` -> ``<L>.input_quantizer.scale``, ``q_act``/``k_act``/``v_act``/``attn_act``
  -> ``q_quantizer``/``k_quantizer``/``v_quantizer``/``prob_quantizer``, ``init_state`` ->
  ``initialized``, ``norm_q.scale`` (1, 1, 1, d_h) -> ``q_align.weight`` (d_h,), ...;
* **flags**: ``init_state``/``signed`` are float [1] in the release and uint8 scalars here.

Semantic checks (a failure raises :class:`ReleaseFormatError` with the fix): exact key set,
alias equality, every live quantizer calibrated (``init_state == 1``), no quantized
cross-attention projections (a different code version), ``signed`` in {0, 1}, finite
positive steps, finite zero points, finite BN buffers with positive variance.
The bit width is not stored in the file and must be given.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qdetr.errors import CheckpointError
from qdetr.models.backbone import RESNET_LAYOUTS
from qdetr.models.config import SmcaConfig
from qdetr.zoo.size_limits import check_architecture_bounds, check_layer_indices

__all__ = [
    "ReleaseFormatError",
    "ReleaseConversionReport",
    "RENAME_RULES",
    "DEAD_QUANTIZER_PATTERNS",
    "release_layout_entries",
    "release_config_from_state_dict",
    "convert_release_state_dict",
    "load_release_state_dict",
]

_ATTN = r"transformer\.(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|multihead_attn)"
_CROSS = r"transformer\.decoder\.layers\.\d+\.multihead_attn"

#: Quantizer modules the seed never runs (manifest ``dead_quantizers``), as regexes of the
#: module prefix, with the reason used in the report.
DEAD_QUANTIZER_PATTERNS: tuple[tuple[str, str], ...] = (
    (rf"{_ATTN}\.in_proj\.act", "input quantizer of the packed projection (never called)"),
    (rf"{_ATTN}\.out_proj\.act", "input quantizer of out_proj (never called)"),
    (rf"{_CROSS}\.in_proj", "cross-attention projection weights run in float"),
    (rf"{_CROSS}\.out_proj", "cross-attention out_proj runs in float"),
    (rf"{_CROSS}\.norm_q", "cross-attention distribution alignment is never called"),
)
#: Leaf names that belong to a dead quantizer module (its weights are live).
_DEAD_LEAVES = {
    "act": ("alpha", "zero_point", "init_state", "signed"),
    "proj": ("alpha", "init_state"),
    "norm_q": ("scale", "bias", "init_state"),
}

_HEAD_QUANTIZERS = {"q_act": "q_quantizer", "k_act": "k_quantizer", "v_act": "v_quantizer", "attn_act": "prob_quantizer"}

#: Ordered (regex, replacement) rules from release names to qdetr names; the first match wins,
#: keys matching none keep their name.
RENAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^(.*)\.(q_act|k_act|v_act|attn_act)\.alpha$", r"\1.{head}.scale"),
    (r"^(.*)\.(q_act|k_act|v_act|attn_act)\.zero_point$", r"\1.{head}.zero_point"),
    (r"^(.*)\.(q_act|k_act|v_act|attn_act)\.init_state$", r"\1.{head}.initialized"),
    (r"^(.*)\.(q_act|k_act|v_act|attn_act)\.signed$", r"\1.{head}.signed"),
    (r"^(.*)\.norm_q\.scale$", r"\1.q_align.weight"),
    (r"^(.*)\.norm_q\.bias$", r"\1.q_align.bias"),
    (r"^(.*)\.in_proj\.alpha$", r"\1.in_proj_weight_quantizer.scale"),
    (r"^(.*)\.in_proj\.init_state$", r"\1.in_proj_weight_quantizer.initialized"),
    (r"^(.*)\.act\.alpha$", r"\1.input_quantizer.scale"),
    (r"^(.*)\.act\.zero_point$", r"\1.input_quantizer.zero_point"),
    (r"^(.*)\.act\.init_state$", r"\1.input_quantizer.initialized"),
    (r"^(.*)\.act\.signed$", r"\1.input_quantizer.signed"),
    (r"^(.*)\.alpha$", r"\1.weight_quantizer.scale"),
    (r"^(.*)\.init_state$", r"\1.weight_quantizer.initialized"),
)
_RENAME_COMPILED = tuple((re.compile(p), r) for p, r in RENAME_RULES)
_DEAD_COMPILED = tuple((re.compile(rf"^{p}$"), why) for p, why in DEAD_QUANTIZER_PATTERNS)


class ReleaseFormatError(CheckpointError):
    """The state dict is not a loadable Q-DETR release file (the message says why and what to do).

    A subclass of :class:`qdetr.errors.CheckpointError` (and so of ``ValueError``).

    Examples:
        >>> import torch
        >>> from qdetr.zoo.release_format import ReleaseFormatError, convert_release_state_dict
        >>> try:
        ...     convert_release_state_dict({"weight": torch.zeros(1)}, bits=4)
        ... except ReleaseFormatError as err:
        ...     print("not a Q-DETR release" in str(err))
        True
    """


@dataclass
class ReleaseConversionReport:
    """What :func:`convert_release_state_dict` did.

    Attributes:
        bits: the bit width the caller gave (not stored in the file).
        config: the architecture inferred from the shapes.
        dropped_aliases: ``in_proj.weight``/``in_proj.bias`` keys (equal to their alias).
        dropped_dead: entries of never-run quantizers (54 modules in the full model).
        dropped_other: other ignored entries (``norm_q.init_state`` of live alignments,
            ``num_batches_tracked``).
        renamed: number of keys whose name changed.
        warnings: non-fatal findings (unusual ``signed`` pattern, identical query halves).

    Examples:
        >>> from qdetr.models import model_config
        >>> from qdetr.zoo.release_format import convert_release_state_dict
        >>> from qdetr.testing import make_release_state_dict
        >>> state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
        >>> _, report = convert_release_state_dict(state, bits=4)
        >>> report.bits, report.config.hidden_dim, report.num_dead_modules, report.warnings
        (4, 32, 16, [])
        >>> report.summary()
        'Q-DETR release state dict, 4-bit, seed profile: renamed ... keys, ...'
    """

    bits: int
    config: SmcaConfig
    dropped_aliases: list[str] = field(default_factory=list)
    dropped_dead: list[str] = field(default_factory=list)
    dropped_other: list[str] = field(default_factory=list)
    renamed: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def num_dead_modules(self) -> int:
        """Number of never-run quantizer modules whose entries were dropped (54 in the full model)."""
        return len({k.rsplit(".", 1)[0] for k in self.dropped_dead})

    @property
    def ignored(self) -> list[str]:
        """Every release key that was not loaded."""
        return self.dropped_aliases + self.dropped_dead + self.dropped_other

    def summary(self) -> str:
        """One-paragraph human-readable summary."""
        return (
            f"Q-DETR release state dict, {self.bits}-bit, seed profile: renamed {self.renamed} keys, "
            f"dropped {len(self.dropped_aliases)} alias entries, {len(self.dropped_dead)} dead-quantizer entries "
            f"and {len(self.dropped_other)} other entries; {len(self.warnings)} warning(s)."
        )


def release_layout_entries(config: SmcaConfig | None = None) -> list[dict[str, Any]]:
    """Release-layout entries (``key``, ``shape`` and ``value`` for flags) for any SMCA size.

    The layout follows checkpoints.md 2.4 and the release manifest exactly, with widths,
    depths, heads and queries taken from ``config`` (an ``SmcaConfig`` with
    ``backbone_unit="bireal"``); default: the full-size release model.
    """
    if config is None:
        config = SmcaConfig(backbone_unit="bireal", query_width=512)
    d, h, f = config.hidden_dim, config.nheads, config.dim_feedforward
    entries: list[dict[str, Any]] = []

    def add(key: str, shape: Sequence[int], value: float | None = None) -> None:
        entry: dict[str, Any] = {"key": key, "shape": list(shape), "dtype": "float32"}
        if value is not None:
            entry["value"] = value
        entries.append(entry)

    def weight_quant(prefix: str, out: int, live: bool) -> None:
        add(f"{prefix}.alpha", [out])
        add(f"{prefix}.init_state", [1], 1.0 if live else 0.0)

    def act_quant(prefix: str, channels: int, live: bool, signed: bool) -> None:
        add(f"{prefix}.alpha", [channels])
        add(f"{prefix}.zero_point", [channels])
        add(f"{prefix}.init_state", [1], 1.0 if live else 0.0)
        add(f"{prefix}.signed", [1], (1.0 if signed else 0.0) if live else 0.0)

    def attention(prefix: str, decoder: bool, cross: bool) -> None:
        add(f"{prefix}.in_proj_weight", [3 * d, d])
        add(f"{prefix}.in_proj_bias", [3 * d])
        if decoder:
            add(f"{prefix}.norm_q.bias", [d // h])
            add(f"{prefix}.norm_q.scale", [1, 1, 1, d // h])
            add(f"{prefix}.norm_q.init_state", [1], 0.0 if cross else 1.0)
        for name, signed in (("q_act", True), ("k_act", True), ("v_act", True), ("attn_act", False)):
            act_quant(f"{prefix}.{name}", h, True, signed)
        add(f"{prefix}.in_proj.weight", [3 * d, d])
        add(f"{prefix}.in_proj.bias", [3 * d])
        weight_quant(f"{prefix}.in_proj", 3 * d, not cross)
        act_quant(f"{prefix}.in_proj.act", d, False, False)
        add(f"{prefix}.out_proj.weight", [d, d])
        add(f"{prefix}.out_proj.bias", [d])
        weight_quant(f"{prefix}.out_proj", d, not cross)
        act_quant(f"{prefix}.out_proj.act", d, False, False)

    def linear(prefix: str, n_in: int, n_out: int, signed: bool) -> None:
        add(f"{prefix}.weight", [n_out, n_in])
        add(f"{prefix}.bias", [n_out])
        weight_quant(prefix, n_out, True)
        act_quant(f"{prefix}.act", n_in, True, signed)

    def norm(prefix: str) -> None:
        add(f"{prefix}.weight", [d])
        add(f"{prefix}.bias", [d])

    for i in range(config.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        attention(f"{p}.self_attn", decoder=False, cross=False)
        linear(f"{p}.linear1", d, f, True)
        linear(f"{p}.linear2", f, d, False)
        norm(f"{p}.norm1")
        norm(f"{p}.norm2")
    k3 = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}[config.dynamic_scale] * h
    for i in range(config.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        attention(f"{p}.self_attn", decoder=True, cross=False)
        attention(f"{p}.multihead_attn", decoder=True, cross=True)
        linear(f"{p}.linear1", d, f, True)
        linear(f"{p}.linear2", f, d, False)
        for n in ("norm1", "norm2", "norm3", "norm4"):
            norm(f"{p}.{n}")
        if i == 0:
            for j, (n_in, n_out) in enumerate(((d, d), (d, d), (d, 2))):
                add(f"{p}.point1.layers.{j}.weight", [n_out, n_in])
                add(f"{p}.point1.layers.{j}.bias", [n_out])
        add(f"{p}.point2.weight", [2 * h, d])
        add(f"{p}.point2.bias", [2 * h])
        if k3:
            add(f"{p}.point3.weight", [k3, d])
            add(f"{p}.point3.bias", [k3])
    norm("transformer.decoder.norm")
    add("class_embed.weight", [config.num_classes + 1, d])
    add("class_embed.bias", [config.num_classes + 1])
    for j, n_out in enumerate((d, d, 4)):
        add(f"bbox_embed.layers.{j}.weight", [n_out, d])
        add(f"bbox_embed.layers.{j}.bias", [n_out])
    add("query_embed.weight", [config.num_queries, config.resolved_query_width])
    layout = RESNET_LAYOUTS[config.backbone]
    c0 = layout.stem_width
    add("input_proj.weight", [d, layout.num_channels, 1, 1])
    add("input_proj.bias", [d])

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            add(f"{prefix}.{n}", [c])

    def lb(prefix: str, c: int) -> None:
        add(f"{prefix}.bias", [1, c, 1, 1])

    b = "backbone.0.body"
    add(f"{b}.conv1.weight", [c0, 3, 7, 7])
    weight_quant(f"{b}.conv1", c0, True)
    act_quant(f"{b}.conv1.act", 3, True, True)
    bn(f"{b}.bn1", c0)
    add(f"{b}.prelu.weight", [c0])
    c_in = c0
    for stage, blocks in enumerate(layout.blocks, start=1):
        width = c0 * 2 ** (stage - 1)
        c_out = 4 * width
        for k in range(blocks):
            p = f"{b}.layer{stage}.{k}"
            lb(f"{p}.bias11", c_in)
            add(f"{p}.prelu1.weight", [c_in])
            lb(f"{p}.bias12", c_in)
            for conv, (n_in, n_out, ks) in (
                ("conv1", (c_in, width, 1)),
                ("conv2", (width, width, 3)),
                ("conv3", (width, c_out, 1)),
            ):
                add(f"{p}.{conv}.weight", [n_out, n_in, ks, ks])
                add(f"{p}.{conv}.bias", [n_out])
                weight_quant(f"{p}.{conv}", n_out, True)
                act_quant(f"{p}.{conv}.act", n_in, True, True)
                bn(f"{p}.bn{conv[-1]}", n_out)
                if conv == "conv1":
                    lb(f"{p}.bias21", width)
                    add(f"{p}.prelu2.weight", [width])
                    lb(f"{p}.bias22", width)
                elif conv == "conv2":
                    lb(f"{p}.bias31", width)
                    add(f"{p}.prelu3.weight", [width])
                    lb(f"{p}.bias32", width)
            if k == 0:
                add(f"{p}.downsample.0.weight", [c_out, c_in, 1, 1])
                bn(f"{p}.downsample.1", c_out)
            lb(f"{p}.bias01", c_out)
            add(f"{p}.prelu0.weight", [c_out])
            lb(f"{p}.bias02", c_out)
            c_in = c_out
    return entries


def _unwrap(state_dict: Mapping) -> Mapping[str, torch.Tensor]:
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        return state_dict["model"]
    return state_dict


def _max_index(keys, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def release_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SmcaConfig:
    """Infer the :class:`SmcaConfig` of a release-layout state dict from its shapes.

    Raises:
        ReleaseFormatError: if the keys do not look like a Q-DETR release SMCA model.
    """
    if not isinstance(state_dict, Mapping):
        raise ReleaseFormatError(f"a release checkpoint holds a dict of tensors, got {type(state_dict).__name__}")
    sd = _unwrap(state_dict)
    # Key names and value types first: nothing below may allocate from a declared size.
    check_layer_indices(sd.keys(), source="the release state dict")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ReleaseFormatError(f"release state dict entries must be tensors; not tensors: {not_tensors[:5]}")
    required = (
        "transformer.decoder.norm.weight",
        "transformer.encoder.layers.0.self_attn.q_act.alpha",
        "transformer.encoder.layers.0.linear1.weight",
        "query_embed.weight",
        "class_embed.weight",
        "backbone.0.body.conv1.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        raise ReleaseFormatError(
            f"not a Q-DETR release (seed) state dict: missing {missing}. Float DETR/SMCA checkpoints load "
            "directly into create_model('detr_r50') / create_model('smca_detr_r50')"
        )
    try:
        config = _infer_release_config(sd)
    except ReleaseFormatError:
        raise
    except (IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise ReleaseFormatError(f"inconsistent shapes in the release state dict: {exc}") from exc
    check_architecture_bounds(config.to_dict(), source="the release state dict")
    return config


def _infer_release_config(sd: Mapping[str, torch.Tensor]) -> SmcaConfig:
    keys = list(sd)
    hidden = sd["transformer.decoder.norm.weight"].shape[0]
    nheads = sd["transformer.encoder.layers.0.self_attn.q_act.alpha"].shape[0]
    point3 = sd.get("transformer.decoder.layers.0.point3.weight")
    per_head = 0 if point3 is None else point3.shape[0] // nheads
    scales = {0: "type1", 1: "type2", 2: "type3", 3: "type4"}
    if per_head not in scales:
        raise ReleaseFormatError(f"point3.weight has {point3.shape[0]} rows; expected 8, 16 or 24 (type2..4)")
    stem_width = sd["backbone.0.body.conv1.weight"].shape[0]
    blocks = tuple(_max_index(keys, f"backbone.0.body.layer{i}.") for i in range(1, 5))
    backbone = next(
        (n for n, lay in RESNET_LAYOUTS.items() if lay.blocks == blocks and lay.stem_width == stem_width), None
    )
    if backbone is None:
        raise ReleaseFormatError(
            f"backbone with blocks {blocks} and stem width {stem_width} is not a known layout "
            f"({ {n: (lay.blocks, lay.stem_width) for n, lay in RESNET_LAYOUTS.items()} })"
        )
    num_queries, query_width = sd["query_embed.weight"].shape
    try:
        return SmcaConfig(
            num_classes=sd["class_embed.weight"].shape[0] - 1,
            num_queries=num_queries,
            hidden_dim=hidden,
            nheads=nheads,
            enc_layers=_max_index(keys, "transformer.encoder.layers."),
            dec_layers=_max_index(keys, "transformer.decoder.layers."),
            dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
            backbone=backbone,
            backbone_unit="bireal",
            dynamic_scale=scales[per_head],
            query_width=query_width,
        )
    except ValueError as exc:
        raise ReleaseFormatError(f"inconsistent shapes in the release state dict: {exc}") from exc


def _group(keys) -> str:
    """Group keys by pattern (layer indices replaced by {i}) for readable errors."""
    counts = Counter(re.sub(r"\.\d+\.", ".{i}.", k) for k in keys)
    shown = [f"{p} (x{n})" if n > 1 else p for p, n in sorted(counts.items())[:20]]
    more = f", ... {len(counts) - 20} more patterns" if len(counts) > 20 else ""
    return ", ".join(shown) + more


def _dead_reason(key: str) -> str | None:
    module, _, leaf = key.rpartition(".")
    for pattern, why in _DEAD_COMPILED:
        if pattern.match(module):
            kind = "act" if module.endswith(".act") else "norm_q" if module.endswith("norm_q") else "proj"
            if leaf in _DEAD_LEAVES[kind]:
                return why
    return None


def _rename(key: str) -> str:
    for pattern, repl in _RENAME_COMPILED:
        m = pattern.match(key)
        if m:
            if "{head}" in repl:
                return f"{m.group(1)}.{_HEAD_QUANTIZERS[m.group(2)]}." + repl.rsplit(".", 1)[-1]
            return m.expand(repl)
    return key


def _expected_signed(key: str) -> int:
    return 0 if (".attn_act." in key or ".linear2.act." in key) else 1


def convert_release_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, bits: int
) -> tuple[dict[str, torch.Tensor], ReleaseConversionReport]:
    """Map a release-layout state dict to the ``qdetr_smca_r50`` (seed profile) layout.

    Args:
        state_dict: the release ``model`` state dict (or a checkpoint dict holding it under
            ``"model"``), e.g. ``ckpt_4_bit_smca_detr_coco.pth``'s.
        bits: the bit width of the file (2, 3 or 4): it is not stored in the state dict.

    Returns:
        ``(state_dict, report)``: a state dict that loads with ``strict=True`` into
        ``create_model("qdetr_smca_r50", bits=bits, profile="seed")`` (or the model of
        ``report.config``), and a :class:`ReleaseConversionReport`.

    Raises:
        ReleaseFormatError: on any failed check (see the module docstring).

    Examples:
        >>> from qdetr.models import create_model, model_config
        >>> from qdetr.zoo.release_format import convert_release_state_dict
        >>> from qdetr.testing import make_release_state_dict
        >>> state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
        >>> converted, report = convert_release_state_dict(state, bits=4)
        >>> "backbone.0.body.conv1.weight_quantizer.scale" in converted
        True
        >>> model = create_model("qdetr_smca_tiny", bits=4, profile="seed")
        >>> model.load_state_dict(converted, strict=True)
        <All keys matched successfully>
        >>> release = torch.load("ckpt_4_bit_smca_detr_coco.pth", weights_only=True)  # doctest: +SKIP
        >>> converted, report = convert_release_state_dict(release, bits=4)  # doctest: +SKIP
    """
    if bits not in (2, 3, 4):
        raise ReleaseFormatError(f"bits must be 2, 3 or 4 (the file does not store it); got {bits!r}")
    sd = dict(_unwrap(state_dict))
    config = release_config_from_state_dict(sd)
    report = ReleaseConversionReport(bits=bits, config=config)

    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        report.dropped_other.append(key)
        del sd[key]

    # 1. exact key set and shapes against the layout of the inferred architecture.
    expected = {e["key"]: e for e in release_layout_entries(config)}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ReleaseFormatError(
            "state dict keys differ from the Q-DETR release layout; "
            f"missing: [{_group(missing)}]; unexpected: [{_group(unexpected)}]"
        )
    wrong_shape = [f"{k} {tuple(sd[k].shape)} != {tuple(e['shape'])}" for k, e in expected.items() if list(sd[k].shape) != e["shape"]]
    if wrong_shape:
        raise ReleaseFormatError(f"shape mismatch against the release layout: {wrong_shape[:10]}")

    # 2. aliases.
    for key in [k for k in sd if k.endswith((".in_proj.weight", ".in_proj.bias"))]:
        alias = key.replace(".in_proj.weight", ".in_proj_weight").replace(".in_proj.bias", ".in_proj_bias")
        if not torch.equal(sd[key], sd[alias]):
            raise ReleaseFormatError(
                f"{alias} and {key} must be the same tensor (aliases in the release format) but differ; "
                "the file is corrupted or was edited"
            )
        report.dropped_aliases.append(key)
        del sd[key]

    # 3. init_state semantics, then dead entries.
    for key in [k for k in sd if k.endswith("init_state")]:
        value = float(sd[key].reshape(-1)[0])
        dead = _dead_reason(key)
        if dead is None and value != 1.0:
            raise ReleaseFormatError(
                f"{key} = {value}: this quantizer was never calibrated, so its steps hold uninitialised memory; "
                "the file is not a trained release checkpoint"
            )
        if dead is not None and value != 0.0:
            if re.match(rf"^{_CROSS}\.(in_proj|out_proj)\.init_state$", key):
                raise ReleaseFormatError(
                    f"{key} = {value}: this file quantizes the cross-attention projections, which the seed "
                    "profile keeps in float (a different code version); it cannot be loaded as the seed profile"
                )
            report.warnings.append(f"{key} = {value} on a quantizer the seed never runs; entry ignored")
    for key in [k for k in sd if _dead_reason(k) is not None]:
        report.dropped_dead.append(key)
        del sd[key]

    # 4. value checks on live entries.
    bad = []
    for key, value in sd.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "alpha" and not (torch.isfinite(value).all() and (value > 0).all()):
            bad.append(f"{key}: steps must be finite and > 0")
        elif leaf == "zero_point" and not torch.isfinite(value).all():
            bad.append(f"{key}: zero points must be finite")
        elif leaf == "signed":
            flag = float(value.reshape(-1)[0])
            if flag not in (0.0, 1.0):
                bad.append(f"{key}: signed must be 0 or 1, got {flag}")
            elif int(flag) != _expected_signed(key):
                report.warnings.append(f"{key} = {int(flag)} (expected {_expected_signed(key)}); stored flag used")
        elif leaf == "running_var" and not (torch.isfinite(value).all() and (value > 0).all()):
            bad.append(f"{key}: BN running_var must be finite and > 0")
        elif leaf in ("running_mean", "weight", "bias") and not torch.isfinite(value).all():
            bad.append(f"{key}: contains NaN/inf")
    if bad:
        raise ReleaseFormatError("invalid values in the release state dict: " + "; ".join(bad[:10]))

    # 5. query embedding halves.
    query = sd["query_embed.weight"]
    d = config.hidden_dim
    if query.shape[1] == 2 * d and torch.equal(query[:, :d], query[:, d:]):
        report.warnings.append(
            "query_embed positional and content halves are identical (a converted 256-column checkpoint that "
            "was never trained in the 512-column layout)"
        )

    # 6. renames and flag dtypes.
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(".norm_q.init_state"):  # alignment has no calibration state
            report.dropped_other.append(key)
            continue
        new = _rename(key)
        if new != key:
            report.renamed += 1
        if key.endswith((".init_state", ".signed")):
            value = value.reshape(()).round().to(torch.uint8)
        elif key.endswith(".norm_q.scale"):
            value = value.reshape(-1)
        out[new] = value
    for message in report.warnings:
        warnings.warn(message, stacklevel=2)
    return out, report


def load_release_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    bits: int,
    model: nn.Module | None = None,
    smoke_test: bool = True,
) -> tuple[nn.Module, ReleaseConversionReport]:
    """Convert a release state dict and load it with ``strict=True``.

    Args:
        state_dict: release ``model`` state dict (or a checkpoint dict holding it).
        bits: bit width of the file (2, 3 or 4).
        model: a quantized SMCA in the seed profile to load into; default: built from the
            inferred architecture (``qdetr_smca_r50`` for the released files).
        smoke_test: run a synthetic 2-image batch (64x64 and 64x48) and require finite
            outputs (checkpoints.md 2.6, step 12).

    Returns:
        ``(model in eval mode, report)``.

    Raises:
        ReleaseFormatError: on failed checks or non-finite smoke-test outputs.

    Examples:
        >>> from qdetr.models import model_config
        >>> from qdetr.zoo.release_format import load_release_state_dict
        >>> from qdetr.testing import make_release_state_dict
        >>> state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
        >>> model, report = load_release_state_dict(state, bits=2)
        >>> model.training, report.bits, type(model).__name__
        (False, 2, 'SmcaDetr')
    """
    converted, report = convert_release_state_dict(state_dict, bits=bits)
    if model is None:
        from qdetr.models.quantized import build_qdetr_smca

        model = build_qdetr_smca(report.config, bits=bits, profile="seed")
    model.load_state_dict(converted, strict=True)
    model.eval()
    if smoke_test:
        param = next(model.parameters())
        pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(param)
        pixel_mask = torch.ones(2, 64, 64, dtype=torch.int64, device=param.device)
        pixel_mask[1, :, 48:] = 0
        pixel_values[1, :, :, 48:] = 0
        with torch.no_grad():
            out = model(pixel_values, pixel_mask)
        if not (torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()):
            raise ReleaseFormatError("the loaded model gives non-finite outputs on a synthetic batch; the file is damaged")
    return model, report
