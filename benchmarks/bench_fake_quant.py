"""Training-step time and memory of a W4A4 (attention 8-bit) quantized DETR-sized model vs float.

Workload: torchvision ResNet-50 trunk + 1x1 input projection + a 6+6-layer transformer
(d=256, 8 heads, FFN 2048, 100 queries) on a batch of 2 RGB images, one CPU thread by
default. Every figure is a median over repeats measured in this one run; ratios are
quantized / float. Step times are the process's CPU time (``time.process_time``), which
with one thread is the compute time of the step and does not count time the process
spent waiting for a core on a shared machine; ``--wall`` reports wall-clock time instead.

Variants: the float model with PyTorch's fused ``nn.MultiheadAttention``; the same float
model with qdetr's explicit attention (what the quantized model is built from); the W4A4
(attention 8-bit, ``"paper"`` profile) model with eager fake-quant kernels (the library
default) and with compiled kernels (``qdetr.quant.kernels.set_kernel_backend("compiled")``,
the training engine's default).

Memory is reported two ways:
* ``saved``: bytes of the distinct tensors autograd keeps for backward (activation memory,
  the part fake quantization can inflate), counted with saved-tensor hooks;
* ``peak RSS``: the peak resident memory of a fresh process doing one training step.

Usage:
    python benchmarks/bench_fake_quant.py [--size 256] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

from qdetr.layers import MultiheadAttention
from qdetr.quant import calibrate, quantize_model
from qdetr.quant.kernels import set_kernel_backend


class DetrLikeWorkload(nn.Module):
    """ResNet-50 + transformer with DETR's shapes; attention through qdetr's explicit path."""

    def __init__(self, torch_attention: bool = False, num_queries: int = 100) -> None:
        super().__init__()
        r = torchvision.models.resnet50()
        self.backbone = nn.Sequential(*list(r.children())[:-2])
        self.input_proj = nn.Conv2d(2048, 256, 1)
        self.transformer = nn.Transformer(256, 8, 6, 6, 2048, dropout=0.1, batch_first=True)
        if not torch_attention:
            for name, m in list(self.transformer.named_modules()):
                for child_name, child in list(m.named_children()):
                    if isinstance(child, nn.MultiheadAttention):
                        setattr(m, child_name, MultiheadAttention.from_torch(child))
        self.query_embed = nn.Embedding(num_queries, 256)
        self.class_embed = nn.Linear(256, 92)
        self.bbox_embed = nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.input_proj(self.backbone(x))  # (B, 256, H/32, W/32)
        src = f.flatten(2).transpose(1, 2)  # (B, HW, 256)
        tgt = self.query_embed.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        hs = self.transformer(src, tgt)
        return self.class_embed(hs).sum() + self.bbox_embed(hs).sigmoid().sum()


def build(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = DetrLikeWorkload(torch_attention=(variant == "float_torch_mha"))
    if variant.startswith("w4a4"):
        set_kernel_backend("compiled" if variant == "w4a4_compiled" else "eager")
        quantize_model(model, bits=4, profile="paper")
    return model.train()


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" and not isinstance(t, nn.Parameter):
            try:
                key = t.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            except RuntimeError:
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_times(model: nn.Module, x: torch.Tensor, repeats: int, clock=time.process_time) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(repeats + 1):
        t0 = clock()
        loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # first step warms up (and calibrates the quantized model)
            times.append(clock() - t0)
    return times


def peak_rss_child(variant: str, size: int, threads: int) -> float:
    code = (
        "import sys, resource, torch; sys.path.insert(0, 'benchmarks');"
        f"torch.set_num_threads({threads});"
        "from bench_fake_quant import build;"
        f"m = build({variant!r}); x = torch.randn(2, 3, {size}, {size});"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "m(x).backward(); m(x).backward();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024.0  # MiB (ru_maxrss is KiB on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--wall", action="store_true", help="wall-clock step times instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(2, 3, args.size, args.size)
    results = {}
    for variant in ("float_torch_mha", "float", "w4a4", "w4a4_compiled"):
        model = build(variant)
        if variant.startswith("w4a4"):
            calibrate(model, [x])
            model(x).backward()  # first training step also compiles the kernels (not timed)
        saved = saved_tensor_bytes(model, x)
        times = step_times(model, x, args.repeats, time.perf_counter if args.wall else time.process_time)
        rss = peak_rss_child(variant, args.size, args.threads)
        results[variant] = {"step_s": statistics.median(times), "saved_mib": saved / 2**20, "peak_rss_mib": rss}
        del model
    f, q, t, c = results["float"], results["w4a4"], results["float_torch_mha"], results["w4a4_compiled"]
    summary = {
        "workload": f"ResNet-50 + 6+6 transformer d=256, batch 2x3x{args.size}x{args.size}, {args.threads} thread(s)",
        "repeats": args.repeats,
        **{f"{k}_{m}": round(v, 4) for k, r in results.items() for m, v in r.items()},
        "time_ratio": round(q["step_s"] / f["step_s"], 3),
        "time_ratio_vs_torch_mha": round(q["step_s"] / t["step_s"], 3),
        "time_ratio_compiled_kernels": round(c["step_s"] / f["step_s"], 3),
        "peak_rss_ratio_compiled_kernels": round(c["peak_rss_mib"] / f["peak_rss_mib"], 3),
        "saved_memory_ratio": round(q["saved_mib"] / f["saved_mib"], 3),
        "peak_rss_ratio": round(q["peak_rss_mib"] / f["peak_rss_mib"], 3),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(summary["workload"], f"median of {args.repeats} steps")
    print(f"{'variant':<32}{'step (s)':>10}{'saved (MiB)':>14}{'peak RSS (MiB)':>16}")
    for name, label in (("float_torch_mha", "float (nn.MultiheadAttention)"), ("float", "float (qdetr attention)"), ("w4a4", "W4A4 attn8, eager kernels"), ("w4a4_compiled", "W4A4 attn8, compiled kernels")):
        r = results[name]
        print(f"{label:<32}{r['step_s']:>10.3f}{r['saved_mib']:>14.1f}{r['peak_rss_mib']:>16.1f}")
    print(f"step time ratio  W4A4 / float: {summary['time_ratio']:.3f}  (vs nn.MultiheadAttention float: {summary['time_ratio_vs_torch_mha']:.3f})")
    print(f"step time ratio, compiled kernels: {summary['time_ratio_compiled_kernels']:.3f}")
    print(f"saved-for-backward ratio     : {summary['saved_memory_ratio']:.3f}")
    print(f"peak RSS ratio               : {summary['peak_rss_ratio']:.3f} (compiled kernels: {summary['peak_rss_ratio_compiled_kernels']:.3f})")


if __name__ == "__main__":
    main()
