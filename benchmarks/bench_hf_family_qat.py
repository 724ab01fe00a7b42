"""QAT step time and memory of a Hugging Face RT-DETR-R18-sized detector vs float.

Workload: transformers ``RTDetrForObjectDetection`` built from a config (no download) with a
ResNet-18-sized backbone (``RTDetrResNetConfig``: depths [2, 2, 2, 2], hidden sizes
[64, 128, 256, 512], basic blocks), d_model 256, 1 AIFI encoder layer, 6 decoder layers with
multi-scale deformable cross-attention, 300 queries, ``num_denoising=100`` (192 denoising queries for
this batch of 6 + 4 boxes); batch 2 x 3 x
640 x 640 (``--quick``: 320 x 320, 3 pairs); one training step = forward with the model's own
loss (Hungarian matching, denoising), backward, AdamW. The QAT model is ``quantize_model(model,
bits=4)`` (W4/A4, attention 8-bit: q/k/v/softmax of the self-attention, value / softmax weights
/ sampled values of the deformable attention, ``"paper"`` profile).

The float and the QAT model step alternately (float, QAT, float, QAT, ...); step times are the
process's CPU time with one thread (``--wall`` for wall clock); the ratio is the median of the
per-pair ratios. Memory: bytes autograd saves for backward (saved-tensor hooks) and the peak
RSS of a fresh process doing two training steps.

Usage:
    python benchmarks/bench_hf_family_qat.py [--quick] [--pairs 5] [--size 640] [--threads 1]
        [--kernels eager|compiled] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from qdetr.quant import QuantConfig, calibrate, quantize_model
from qdetr.quant.attention_adapters import find_attention_adapter
from qdetr.quant.kernels import set_kernel_backend


def build_rt_detr_r18(seed: int = 0, size: int = 640) -> tuple[nn.Module, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """RT-DETR with a ResNet-18-sized backbone, a batch of 2 images (2, 3, size, size) and labels.

    Returns:
        ``(model in training mode, pixel_values, labels)``; labels are one dict per image with
        ``class_labels`` (n,) and normalised cxcywh ``boxes`` (n, 4).
    """
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        encoder_in_channels=[128, 256, 512],
        d_model=256,
        encoder_hidden_dim=256,
        decoder_layers=6,
        num_queries=300,
        num_denoising=100,
    )
    torch.manual_seed(seed)
    model = RTDetrForObjectDetection(config).train()
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, size, size, generator=g)
    labels = []
    for n in (6, 4):
        boxes = torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g), 0.05 + 0.3 * torch.rand(n, 2, generator=g)], 1)
        labels.append({"class_labels": torch.randint(0, config.num_labels, (n,), generator=g), "boxes": boxes})
    return model, pixel_values, labels


def build(variant: str, size: int) -> tuple[nn.Module, torch.Tensor, list]:
    """``"float"``, ``"qat"`` or ``"qat_float_attention"`` (every attention module kept float:
    shows how much of the overhead comes from the attention data path)."""
    model, x, labels = build_rt_detr_r18(size=size)
    if variant.startswith("qat"):
        keep = ()
        if variant == "qat_float_attention":
            keep = tuple(n for n, m in model.named_modules() if n and find_attention_adapter(m) is not None)
        quantize_model(model, config=QuantConfig(bits=4, keep_float=keep))
        calibrate(model, [x], forward_fn=lambda m, batch: m(pixel_values=batch))
    return model, x, labels


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor, labels: list) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" and not isinstance(t, nn.Parameter):
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            except RuntimeError:
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, labels: list, clock) -> float:
    t0 = clock()
    loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clock() - t0


def peak_rss_child(variant: str, size: int, threads: int, kernels: str = "eager") -> float:
    code = (
        "import sys, resource, torch; sys.path.insert(0, 'benchmarks');"
        f"torch.set_num_threads({threads});"
        "from bench_hf_family_qat import build;"
        f"m, x, labels = build({variant!r}, {size});"
        "m(pixel_values=x, labels=labels).loss.backward(); m(pixel_values=x, labels=labels).loss.backward();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    env = {**os.environ, "QDETR_QUANT_KERNELS": kernels}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1]) / 1024.0  # MiB (ru_maxrss is KiB on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="320 px, 3 pairs, no peak-RSS subprocesses")
    parser.add_argument("--wall", action="store_true", help="wall-clock step times instead of CPU time")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--kernels",
        choices=("eager", "compiled"),
        default="eager",
        help="fake-quant kernels of the QAT model: eager (library default) or compiled (qdetr train's default "
        "for models of 5 M parameters or more; the warm-up step compiles them)",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time QAT with every attention module kept float (no RSS)"
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.pairs = 320, 3
    torch.set_num_threads(args.threads)
    set_kernel_backend(args.kernels)
    clock = time.perf_counter if args.wall else time.process_time

    variants = ("float", "qat", "qat_float_attention") if args.breakdown else ("float", "qat")
    runs = {}
    for variant in variants:
        model, x, labels = build(variant, args.size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        train_step(model, opt, x, labels, clock)  # warm-up
        runs[variant] = (model, opt, x, labels)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.pairs):
        for variant in variants:
            model, opt, x, labels = runs[variant]
            times[variant].append(train_step(model, opt, x, labels, clock))
    ratios = [q / f for f, q in zip(times["float"], times["qat"])]
    saved = {v: saved_tensor_bytes(m, x, labels) / 2**20 for v, (m, _, x, labels) in runs.items() if v != "qat_float_attention"}
    params = sum(p.numel() for p in runs["float"][0].parameters())
    del runs
    skip_rss = args.quick or args.no_rss
    rss = {v: (None if skip_rss else peak_rss_child(v, args.size, args.threads, args.kernels)) for v in ("float", "qat")}

    summary = {
        "workload": f"RT-DETR-R18-sized ({params / 1e6:.1f} M params), batch 2x3x{args.size}x{args.size}, "
        f"{args.threads} thread(s), {'wall' if args.wall else 'CPU'} time, {args.kernels} fake-quant kernels",
        "pairs": args.pairs,
        "float_step_s": round(statistics.median(times["float"]), 3),
        "qat_step_s": round(statistics.median(times["qat"]), 3),
        "time_ratio": round(statistics.median(ratios), 3),
        "time_ratios": [round(r, 3) for r in ratios],
        "float_saved_mib": round(saved["float"], 1),
        "qat_saved_mib": round(saved["qat"], 1),
        "saved_ratio": round(saved["qat"] / saved["float"], 3),
    }
    if rss["float"] is not None:
        summary.update(
            float_peak_rss_mib=round(rss["float"]),
            qat_peak_rss_mib=round(rss["qat"]),
            peak_rss_ratio=round(rss["qat"] / rss["float"], 3),
        )
    if args.breakdown:
        summary["qat_float_attention_step_s"] = round(statistics.median(times["qat_float_attention"]), 3)
        summary["time_ratio_float_attention"] = round(
            statistics.median(a / f for f, a in zip(times["float"], times["qat_float_attention"])), 3
        )
    if args.json:
        print(json.dumps(summary))
        return
    print(summary["workload"], f"- median of {args.pairs} alternating pairs")
    print(f"{'variant':<10}{'step (s)':>10}{'saved (MiB)':>14}{'peak RSS (MiB)':>16}")
    for v in ("float", "qat"):
        peak = f"{rss[v]:>16.0f}" if rss[v] is not None else f"{'-':>16}"
        print(f"{v:<10}{summary[v + '_step_s']:>10.3f}{summary[v + '_saved_mib']:>14.1f}{peak}")
    print(f"step time ratio QAT / float: {summary['time_ratio']:.3f} (pairs: {summary['time_ratios']})")
    print(f"saved-for-backward ratio   : {summary['saved_ratio']:.3f}")
    if rss["float"] is not None:
        print(f"peak RSS ratio             : {summary['peak_rss_ratio']:.3f}")
    if args.breakdown:
        print(
            f"QAT with attention kept float: {summary['qat_float_attention_step_s']:.3f} s, "
            f"ratio {summary['time_ratio_float_attention']:.3f}"
        )


if __name__ == "__main__":
    main()
