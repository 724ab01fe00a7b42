"""State-dict compatibility with facebookresearch/detr and SMCA-DETR (checkpoints.md 3.2).

The expected key/shape lists are built here independently of qdetr: the backbone from
torchvision's own ResNet (without ``fc`` and ``num_batches_tracked``), the transformer and
heads from the table of checkpoints.md 3.2.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from qdetr.models import create_model, load_backbone_weights
from qdetr.models.backbone import RESNET_LAYOUTS, ResNetBody


def _torchvision_body_shapes(builder) -> dict[str, tuple[int, ...]]:
    resnet = builder(weights=None, norm_layer=FrozenBatchNorm2d)
    return {
        f"backbone.0.body.{k}": tuple(v.shape)
        for k, v in resnet.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _transformer_shapes(d=256, f=2048, enc=6, dec=6) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def attn(p):
        shapes[f"{p}.in_proj_weight"] = (3 * d, d)
        shapes[f"{p}.in_proj_bias"] = (3 * d,)
        shapes[f"{p}.out_proj.weight"] = (d, d)
        shapes[f"{p}.out_proj.bias"] = (d,)

    def ffn_norms(p, norms):
        shapes.update({f"{p}.linear1.weight": (f, d), f"{p}.linear1.bias": (f,)})
        shapes.update({f"{p}.linear2.weight": (d, f), f"{p}.linear2.bias": (d,)})
        for n in norms:
            shapes.update({f"{p}.{n}.weight": (d,), f"{p}.{n}.bias": (d,)})

    for i in range(enc):
        attn(f"transformer.encoder.layers.{i}.self_attn")
        ffn_norms(f"transformer.encoder.layers.{i}", ("norm1", "norm2"))
    for i in range(dec):
        attn(f"transformer.decoder.layers.{i}.self_attn")
        attn(f"transformer.decoder.layers.{i}.multihead_attn")
        ffn_norms(f"transformer.decoder.layers.{i}", ("norm1", "norm2", "norm3"))
    shapes.update({"transformer.decoder.norm.weight": (d,), "transformer.decoder.norm.bias": (d,)})
    return shapes


def _detr_shapes(builder, num_queries=100, query_width=256):
    shapes = _transformer_shapes()
    shapes.update({"class_embed.weight": (92, 256), "class_embed.bias": (92,)})
    for i, out in enumerate((256, 256, 4)):
        shapes.update({f"bbox_embed.layers.{i}.weight": (out, 256), f"bbox_embed.layers.{i}.bias": (out,)})
    shapes["query_embed.weight"] = (num_queries, query_width)
    shapes.update({"input_proj.weight": (256, 2048, 1, 1), "input_proj.bias": (256,)})
    shapes.update(_torchvision_body_shapes(builder))
    return shapes


def _smca_extra_shapes(dec=6, d=256):
    shapes = {}
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        shapes.update({f"{p}.norm4.weight": (d,), f"{p}.norm4.bias": (d,)})
        shapes.update({f"{p}.point2.weight": (16, d), f"{p}.point2.bias": (16,)})
        shapes.update({f"{p}.point3.weight": (16, d), f"{p}.point3.bias": (16,)})
    for j, out in enumerate((256, 256, 2)):
        shapes.update({f"transformer.decoder.layers.0.point1.layers.{j}.weight": (out, d)})
        shapes.update({f"transformer.decoder.layers.0.point1.layers.{j}.bias": (out,)})
    return shapes


def _random_state(shapes):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 1
    return state


def _load_and_check(model, shapes):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    state = _random_state(shapes)
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)  # tolerated by FrozenBN
    model.load_state_dict(state, strict=True)
    for k in ("transformer.encoder.layers.0.self_attn.in_proj_weight", "query_embed.weight", "backbone.0.body.layer4.2.conv3.weight"):
        assert torch.equal(model.state_dict()[k], state[k])


@pytest.mark.slow
def test_detr_r50_state_dict_loads_strict():
    shapes = _detr_shapes(torchvision.models.resnet50)
    assert len(shapes) == 458  # checkpoints.md 3.2
    _load_and_check(create_model("detr_r50"), shapes)


@pytest.mark.slow
def test_detr_r101_key_count():
    shapes = _detr_shapes(torchvision.models.resnet101)
    assert len(shapes) == 713
    model = create_model("detr_r101")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


@pytest.mark.slow
@pytest.mark.parametrize("query_width", [256, 512])
def test_smca_r50_float_layouts_load_strict(query_width):
    shapes = _detr_shapes(torchvision.models.resnet50, num_queries=300, query_width=query_width)
    shapes.update(_smca_extra_shapes())
    _load_and_check(create_model("smca_detr_r50", query_width=query_width), shapes)


def test_resnet50_body_equals_torchvision():
    """Same names, shapes and outputs as torchvision's ResNet-50 (FrozenBN) trunk."""
    reference = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for name, buf in reference.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")):
                buf.normal_(0, 0.1)
    body = ResNetBody(RESNET_LAYOUTS["resnet50"]).eval()
    state = reference.state_dict()
    state["bn1.num_batches_tracked"] = torch.tensor(3)
    dropped = load_backbone_weights(body, state)
    assert sorted(dropped) == ["bn1.num_batches_tracked", "fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-2])
        torch.testing.assert_close(body(x), trunk(x), rtol=0, atol=0)


def test_load_backbone_weights_from_file_and_prefix(tmp_path):
    body = ResNetBody(RESNET_LAYOUTS["resnet_tiny"])
    other = ResNetBody(RESNET_LAYOUTS["resnet_tiny"])
    torch.nn.init.normal_(other.conv1.weight)
    path = tmp_path / "trunk.pth"
    torch.save({"model": {f"backbone.0.body.{k}": v for k, v in other.state_dict().items()}}, path)
    load_backbone_weights(body, path)
    assert torch.equal(body.conv1.weight, other.conv1.weight)
    bad = dict(other.state_dict())
    bad.pop("conv1.weight")
    with pytest.raises(RuntimeError, match="conv1.weight"):
        load_backbone_weights(body, bad)


def test_backbone_freezing_rule():
    model = create_model("detr_tiny")
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert not any(".layer1." in n or n.endswith("conv1.weight") and "layer" not in n for n in trainable)
    assert any(".layer4." in n for n in trainable)
    frozen = create_model("detr_tiny", train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
