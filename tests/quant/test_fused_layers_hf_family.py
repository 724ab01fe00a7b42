"""Every tiny Hugging Face DETR-family model: one QAT step with the fused quantized conv / linear
node equals, bit for bit, the same step through the separate nodes (loss, every gradient; the
input-step gradients of a conv on the image are the same sums in another order)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import qdetr  # noqa: E402
from qdetr.quant import fused_layers, native_kernels  # noqa: E402
from qdetr.quant.modules import QuantConv2d  # noqa: E402
from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES, build_tiny_hf_detr  # noqa: E402

pytestmark = pytest.mark.skipif(
    not native_kernels.native_kernels_available(), reason="no working C compiler on this machine"
)


def _scalar(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    logits = out.logits if getattr(out, "logits", None) is not None else out.decoder_class_logits
    boxes = out.pred_boxes if getattr(out, "pred_boxes", None) is not None else out.decoder_coord_logits
    return logits.float().square().mean() + boxes.float().sum()


def _step(tiny, seed: int) -> list[torch.Tensor]:
    tiny.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = _scalar(tiny.forward(with_labels=True))
    loss.backward()
    return [loss.detach()] + [p.grad for p in tiny.model.parameters()]


@pytest.mark.parametrize("name", TINY_HF_DETR_NAMES)
def test_fused_node_matches_separate_nodes_on_every_family_member(name, monkeypatch):
    tiny = build_tiny_hf_detr(name, seed=0)
    qdetr.quantize_model(tiny.model, bits=4)
    tiny.model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        tiny.forward()  # calibrates every quantizer (separate nodes on this first call)
    on_image = set()  # convs whose input needs no gradient: their input steps are summed in another order
    for layer_name, layer in tiny.model.named_modules():
        if isinstance(layer, QuantConv2d):
            layer.register_forward_pre_hook(
                lambda m, args, n=layer_name: None if args[0].requires_grad else on_image.add(n + ".input_quantizer.")
            )
    calls = []
    original = fused_layers._FusedQuantOp.apply
    monkeypatch.setattr(fused_layers._FusedQuantOp, "apply", lambda *a: calls.append(1) or original(*a))
    fused = _step(tiny, seed=2)
    assert calls, "no layer took the fused node"
    monkeypatch.setattr(fused_layers, "_applies", lambda *args: False)
    separate = _step(tiny, seed=2)
    assert torch.equal(fused[0], separate[0])
    names = ["loss"] + [n for n, _ in tiny.model.named_parameters()]
    for n, a, b in zip(names, fused, separate):
        assert (a is None) == (b is None), n
        if a is not None and any(n.startswith(prefix) for prefix in on_image):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9, msg=f"{name}: gradient of {n}")
        elif a is not None:
            assert torch.equal(a, b), f"{name}: gradient of {n} differs"
