"""Model card (``README.md``) for a saved qdetr model.

The card follows the ``facebook/detr-resnet-50`` card plus what a quantized model needs
(Hub-recognised YAML front matter with ``base_model``, quantization tags, ``library_name``
and ``pipeline_tag``; a bits/profile table computed from the model; an honest note on
speed). The quantization table is derived from the modules themselves, so it cannot drift
from what the file holds.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["quantization_table", "render_model_card"]

_CITATION = """```bibtex
@inproceedings{xu2023qdetr,
  title     = {Q-DETR: An Efficient Low-Bit Quantized Detection Transformer},
  author    = {Xu, Sheng and Li, Yanjing and Lin, Mingbao and Gao, Peng and Guo, Guodong and L{\\"u}, Jinhu and Zhang, Baochang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}

@inproceedings{gao2021smca,
  title     = {Fast Convergence of DETR with Spatially Modulated Co-Attention},
  author    = {Gao, Peng and Zheng, Minghang and Wang, Xiaogang and Dai, Jifeng and Li, Hongsheng},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2021}
}

@inproceedings{carion2020detr,
  title     = {End-to-End Object Detection with Transformers},
  author    = {Carion, Nicolas and Massa, Francisco and Synnaeve, Gabriel and Usunier, Nicolas and Kirillov, Alexander and Zagoruyko, Sergey},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2020}
}
```"""


def _bits_of(module: nn.Module | None) -> str:
    if module is None or not hasattr(module, "bits") or not getattr(module, "enabled", True):
        return "FP"
    return str(module.bits)


def _describe(module: nn.Module) -> tuple[str, str, str] | None:
    """(weight bits, input bits, attention q/k/v/softmax bits) of a layer; None if not a layer."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return (_bits_of(getattr(module, "weight_quantizer", None)),
                _bits_of(getattr(module, "input_quantizer", None)), "-")
    if hasattr(module, "in_proj_weight") and hasattr(module, "out_proj"):
        return (_bits_of(getattr(module, "in_proj_weight_quantizer", None)),
                _bits_of(getattr(module, "q_input_quantizer", None)),
                _bits_of(getattr(module, "q_quantizer", None)))
    return None


def quantization_table(model: nn.Module) -> list[dict[str, Any]]:
    """Layers grouped by name pattern (digit runs -> ``*``) and bit widths.

    Returns:
        Rows ``{"modules", "count", "weights", "inputs", "attention"}`` in module order;
        ``"FP"`` marks float tensors. Attention rows give the q/k/v projection weights, their
        inputs, and the q/k/v/softmax quantizers; their ``out_proj`` has its own row.

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> from qdetr.zoo.model_card import quantization_table
        >>> quantization_table(nn.Sequential(nn.Linear(8, 4)))
        [{'modules': '*', 'count': 1, 'weights': 'FP', 'inputs': 'FP', 'attention': '-'}]
        >>> model = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), bits=4)
        >>> quantization_table(model)
        [{'modules': '*', 'count': 2, 'weights': '4', 'inputs': '4', 'attention': '-'}]
    """
    rows: dict[tuple, dict[str, Any]] = {}
    for name, module in model.named_modules():
        desc = _describe(module)
        if desc is None or not name:
            continue
        pattern = re.sub(r"\d+", "*", name)
        key = (pattern, *desc)
        if key not in rows:
            rows[key] = {"modules": pattern, "count": 0, "weights": desc[0], "inputs": desc[1], "attention": desc[2]}
        rows[key]["count"] += 1
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            rows[(name, "emb")] = {"modules": name, "count": 1, "weights": "FP", "inputs": "-", "attention": "-"}
    return list(rows.values())


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def render_model_card(
    model: nn.Module,
    config: dict[str, Any],
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Markdown model card with YAML front matter.

    Args:
        model: the saved model (for the quantization table).
        config: the ``config.json`` dict written beside it.
        repo_id: Hub repo id used in the usage snippet (defaults to a local directory).
        base_model: Hub id of the float model this one was quantized from, if published.
        license: licence identifier for the front matter.

    Returns:
        The card text.

    Examples:
        >>> from qdetr.zoo.model_card import render_model_card
        >>> config = {"name": "demo-w4", "quantization": {"bits": 4}, "architecture": {"arch": "detr"}}
        >>> card = render_model_card(nn.Sequential(nn.Linear(8, 4)), config, base_model="facebook/detr-resnet-50")
        >>> card.splitlines()[0], "base_model: facebook/detr-resnet-50" in card, "- 4-bit" in card
        ('---', True, True)
        >>> "# demo-w4" in card, "## Citation" in card
        (True, True)
    """
    quant = config.get("quantization") or {}
    arch = config.get("architecture", {})
    bits = quant.get("bits")
    provenance = config.get("provenance") or {}
    metrics = config.get("metrics") or {}
    tags = ["object-detection", "vision", "detr"]
    if arch.get("arch") == "smca":
        tags.append("smca-detr")
    if bits is not None:
        tags += ["qat", f"{bits}-bit", "quantized"]
    front = ["---", f"license: {license}", "library_name: qdetr", "pipeline_tag: object-detection",
             "tags:", _yaml_list(tags), "datasets:", "- coco"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")

    name = repo_id or config.get("name") or "path/to/this/directory"
    backbone = f"{arch.get('backbone', '?')} ({arch.get('backbone_unit', 'torchvision')} blocks)"
    title = config.get("name") or f"qdetr {arch.get('arch', 'detr').upper()} model"
    lines = [*front, "", f"# {title}", "", "## Model description", ""]
    if bits is not None:
        lines += [
            f"A {arch.get('arch', 'detr').upper()} detector (backbone {backbone}, {arch.get('enc_layers')}+"
            f"{arch.get('dec_layers')} transformer layers, width {arch.get('hidden_dim')}, "
            f"{arch.get('num_queries')} queries) quantized to **{bits}-bit weights and activations with "
            f"{quant.get('attn_bits', 8)}-bit attention** (W{bits}/A{bits}/Attn{quant.get('attn_bits', 8)}) by "
            f"quantization-aware training, profile `{quant.get('profile')}`.",
            "",
            "Quantized weights are stored **packed** in `model.safetensors`: integer codes at their bit width "
            "(see `qdetr.zoo.packing` for the layout) plus float32 per-channel step sizes. Loading rebuilds the "
            "fake-quant model bit-exactly; fine-tuning from this file starts from the dequantised weights.",
        ]
    else:
        lines.append(f"A float {arch.get('arch', 'detr').upper()} detector (backbone {backbone}).")
    if bits is not None:
        per_tensor = (quant.get("activation") or {}).get("granularity") == "per_tensor"
        lines += ["", "## Quantization", "",
                  f"- weights / activations: {bits} bits; attention q, k, v and softmax: {quant.get('attn_bits', 8)} "
                  f"bits ({'per tensor' if per_tensor else 'per head'}); first convolution: "
                  f"{quant.get('stem_bits', 8)} bits",
                  f"- profile: `{quant.get('profile')}`; weight steps per output channel, activation steps per "
                  f"{'tensor (integer-kernel numerics, exportable with `qdetr export`)' if per_tensor else 'input channel'} "
                  f"({(quant.get('weight') or {}).get('granularity', 'per_channel')})",
                  "", "| modules | count | weights | inputs | attention q/k/v/softmax |", "|---|---|---|---|---|"]
        for row in quantization_table(model):
            lines.append(f"| `{row['modules']}` | {row['count']} | {row['weights']} | {row['inputs']} | "
                         f"{row['attention']} |")
        lines += ["", "FP = kept in floating point (heads, box MLP, input projection, queries, ResNet downsample "
                  "and the SMCA point predictors, as the profile prescribes)."]
    lines += [
        "", "## How to use", "",
        "```python",
        "import qdetr",
        "",
        f'model = qdetr.from_pretrained("{name}")',
        'detections = model.predict(["image.jpg"], threshold=0.5)',
        "for det in detections:",
        '    for score, label, box in zip(det["scores"], det["labels"], det["boxes"]):',
        '        print(model.id2label[int(label)], round(float(score), 3), box.tolist())  # xyxy pixels',
        "```",
        "",
        "## Intended uses and limitations",
        "",
        "Research on low-bit detection transformers and a starting point for integer deployment. "
        "**There is no speed-up from this checkpoint as is**: PyTorch runs it as a fake-quant float model. "
        + (
            "Its deploy-profile numerics map onto integer kernels: `qdetr export` writes QDQ ONNX that "
            "onnxruntime runs with integer convolutions and matmuls."
            if (quant.get("activation") or {}).get("granularity") == "per_tensor"
            else "Real latency and memory gains need integer kernels (per-input-channel activation steps must "
            "first be folded into the weights or replaced by the per-tensor deploy profile)."
        )
        + " The on-disk size is what shrinks.",
        "",
        "## Evaluation results",
        "",
    ]
    if metrics:
        lines += ["| metric | value | source |", "|---|---|---|"]
        for key, value in metrics.items():
            if isinstance(value, dict):
                lines.append(f"| {key} | {value.get('value')} | {value.get('source', '')} |")
            else:
                lines.append(f"| {key} | {value} | |")
    else:
        lines.append("No evaluation recorded with this file.")
    if provenance:
        lines += ["", "## Provenance", ""]
        for key, value in provenance.items():
            if value not in (None, "", {}, []):
                lines.append(f"- {key}: `{value}`")
    lines += ["", "## Citation", "", _CITATION, ""]
    return "\n".join(lines)
