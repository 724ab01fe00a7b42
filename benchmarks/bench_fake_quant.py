"""Training-step time and memory of a W4A4 (attention 8-bit) quantized DETR-sized model vs float.

Two workloads, both a torchvision ResNet-50 trunk + 1x1 input projection + a transformer
(d=256, 8 heads, FFN 2048, 100 queries) on a batch of 2 RGB images:

* ``detr``: 6+6 transformer layers, AdamW (DETR's shapes and optimizer);
* ``sgd2``: 2+2 transformer layers, SGD with momentum (a larger convolution share and a
  cheaper optimizer step, so a fixed fake-quant cost weighs more).

The quantized model is what a library user gets by default: ``quantize_model(model, bits=4,
profile="paper")`` followed by an ordinary training loop (forward, backward, optimizer step),
with no backend selected (the native kernels of ``qdetr.quant.native_kernels`` where a C
compiler works). ``--eager`` and ``--compiled`` add the PyTorch-operation kernels and the
``torch.compile`` kernels (``qdetr.quant.kernels.set_kernel_backend(...)``) as further variants;
``--separate`` adds the default kernels with every quantizer its own autograd node (no fused
conv / linear node, ``qdetr.quant.fused_layers``: the previous release's default path).

Timing: after two warm-up steps per model, the float and quantized steps alternate
(``--pairs`` pairs, the order flipped every pair) and each pair gives one ratio
quantized / float, so load on a shared machine hits both sides of a pair alike. The script
prints the median ratio and its range over the pairs. Step times are the process's CPU time
(``time.process_time``; one thread by default), which does not count time spent waiting for
a core; ``--wall`` uses wall-clock time instead.

Memory, per workload:

* ``saved``: bytes of the distinct tensors autograd keeps for backward (activation memory,
  the part fake quantization can inflate), counted with saved-tensor hooks;
* ``peak RSS``: the peak resident memory (``VmHWM``) of a fresh process that builds the model
  and runs two training steps (median of ``--rss-runs`` processes).

``--breakdown`` prints, instead, where the quantized step's extra time goes: the time spent
inside each of the four fake-quantization kernels per step (default backend), and the
quantized step with kernels that only copy their input into the same output buffers (no
arithmetic), i.e. the overhead that is not the kernels' own work.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_fake_quant.py [--workload detr sgd2] [--pairs 9]
        [--size 256] [--threads 1] [--separate] [--eager] [--compiled] [--breakdown] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

from qdetr.layers import MultiheadAttention
from qdetr.quant import calibrate, fused_layers, quantize_model
from qdetr.quant.kernels import get_kernel_backend, set_kernel_backend

#: The backend a library user gets without selecting one (read before any variant sets one).
DEFAULT_BACKEND = get_kernel_backend()
#: Quantized variants and their kernel backends.
BACKENDS = {"w4a4": DEFAULT_BACKEND, "w4a4_separate": DEFAULT_BACKEND, "w4a4_eager": "eager", "w4a4_compiled": "compiled"}
_FUSED_APPLIES = fused_layers._applies


def select_path(variant: str) -> None:
    """Kernel backend of ``variant``; ``w4a4_separate`` also turns the fused conv / linear node
    off (every quantizer its own autograd node: the default path of the previous release)."""
    set_kernel_backend(BACKENDS.get(variant, DEFAULT_BACKEND))
    fused_layers._applies = (lambda *args: False) if variant == "w4a4_separate" else _FUSED_APPLIES

WORKLOADS = {
    "detr": {"layers": 6, "optimizer": "adamw"},
    "sgd2": {"layers": 2, "optimizer": "sgd"},
}


class DetrLikeWorkload(nn.Module):
    """ResNet-50 + transformer with DETR's shapes; attention through qdetr's explicit path."""

    def __init__(self, layers: int = 6, torch_attention: bool = False, num_queries: int = 100) -> None:
        super().__init__()
        r = torchvision.models.resnet50()
        self.backbone = nn.Sequential(*list(r.children())[:-2])
        self.input_proj = nn.Conv2d(2048, 256, 1)
        self.transformer = nn.Transformer(256, 8, layers, layers, 2048, dropout=0.1, batch_first=True)
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


def build(variant: str, workload: str = "detr") -> nn.Module:
    """``float_torch_mha``, ``float``, ``w4a4`` (library default), ``w4a4_separate``, ``w4a4_eager`` or ``w4a4_compiled``."""
    torch.manual_seed(0)
    model = DetrLikeWorkload(WORKLOADS[workload]["layers"], torch_attention=(variant == "float_torch_mha"))
    if variant.startswith("w4a4"):
        set_kernel_backend(BACKENDS[variant])
        quantize_model(model, bits=4, profile="paper")
    return model.train()


def make_optimizer(model: nn.Module, workload: str) -> torch.optim.Optimizer:
    if WORKLOADS[workload]["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-5)


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


class Trainer:
    """One model, its optimizer and its input; ``step()`` returns the step's time."""

    def __init__(self, variant: str, workload: str, x: torch.Tensor, clock) -> None:
        self.variant, self.x, self.clock = variant, x, clock
        self.model = build(variant, workload)
        self.opt = make_optimizer(self.model, workload)
        if variant.startswith("w4a4"):
            calibrate(self.model, [x])
        select_path(variant)
        self.saved_mib = saved_tensor_bytes(self.model, x) / 2**20
        self.times: list[float] = []

    def step(self) -> float:
        select_path(self.variant)
        start = self.clock()
        self.model(self.x).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed = self.clock() - start
        self.times.append(elapsed)
        return elapsed


def peak_rss_child(variant: str, workload: str, size: int, threads: int) -> float:
    code = (
        "import sys, resource, torch; sys.path.insert(0, 'benchmarks');"
        f"torch.set_num_threads({threads});"
        "from bench_fake_quant import build, make_optimizer, select_path;"
        f"select_path({variant!r});"
        f"m = build({variant!r}, {workload!r}); opt = make_optimizer(m, {workload!r});"
        f"x = torch.randn(2, 3, {size}, {size});"
        "[(m(x).backward(), opt.step(), opt.zero_grad(set_to_none=True)) for _ in range(2)];"
        # VmHWM belongs to this process image; ru_maxrss would also count the parent's RSS at fork.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')];"
        "print(hwm[0].split()[1] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024.0  # MiB (both figures are KiB on Linux)


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_workload(workload: str, args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    clock = time.perf_counter if args.wall else time.process_time
    variants = (
        ["float", "w4a4"]
        + (["w4a4_separate"] if args.separate else [])
        + (["w4a4_eager"] if args.eager else [])
        + (["w4a4_compiled"] if args.compiled else [])
    )
    trainers = {v: Trainer(v, workload, x, clock) for v in variants}
    for t in trainers.values():  # warm-up (compiles the kernels of the compiled variant)
        for _ in range(2):
            t.step()
        t.times.clear()
    ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
    for i in range(args.pairs):
        for v in variants[1:]:
            order = ("float", v) if i % 2 == 0 else (v, "float")
            times = {name: trainers[name].step() for name in order}
            ratios[v].append(times[v] / times["float"])
    result = {"workload": workload, "pairs": args.pairs, "variants": {}}
    for v, t in trainers.items():
        entry = {"step_s": statistics.median(t.times), "saved_mib": t.saved_mib}
        if not args.no_rss:
            rss = [peak_rss_child(v, workload, args.size, args.threads) for _ in range(args.rss_runs)]
            entry["peak_rss_mib"] = statistics.median(rss)
        if v != "float":
            entry["time_ratio"] = summarize(ratios[v])
            entry["saved_ratio"] = t.saved_mib / trainers["float"].saved_mib
            if not args.no_rss:
                entry["peak_rss_ratio"] = entry["peak_rss_mib"] / result["variants"]["float"]["peak_rss_mib"]
        result["variants"][v] = entry
    del trainers
    return result


_KERNELS = ("weight_forward", "weight_backward", "act_forward", "act_backward")


def _copy_kernels() -> dict:
    """Stand-ins for the kernels that only copy (forward, into the native kernels' output
    buffers) or pass the gradient through: the dispatching kernels of ``qdetr.quant.kernels``
    and the native loops that the fused conv / linear node calls directly."""
    from qdetr.quant.native_kernels import OUTPUTS

    def zeros(c):
        return torch.zeros(c)

    return {
        "weight_forward": lambda w, s, qn, qp: OUTPUTS.empty(w.shape, w.dtype).copy_(w),
        "act_forward": lambda x, s, z, qn, qp: OUTPUTS.empty(x.shape, x.dtype).copy_(x),
        "weight_backward": lambda w, s, g, qn, qp, grad_in_place=False: (g, torch.zeros_like(s)),
        "act_backward": lambda x, s, z, g, qn, qp, grad_in_place=False: (g, torch.zeros_like(s), torch.zeros_like(z)),
        "weight_forward_rows": lambda w, s, dims, qn, qp: OUTPUTS.empty(w.shape, w.dtype).copy_(w),
        "act_forward_rows": lambda x, s, z, dims, qn, qp: OUTPUTS.empty(x.shape, x.dtype).copy_(x),
        "weight_backward_rows": lambda w, s, g, dims, qn, qp, in_place: (g, zeros(dims[1])),
        "act_backward_rows": lambda x, s, z, g, dims, qn, qp, in_place: (g, zeros(dims[1]), zeros(dims[1])),
    }


def breakdown(workload: str, args) -> None:
    """Print kernel time per step and the step with copy-only kernels (see the module docstring).

    Kernel time is counted in the dispatching kernels of ``qdetr.quant.kernels`` (quantizers
    called on their own) and in the native loops (``*_rows``) that the fused conv / linear
    node calls directly; a loop called from a dispatching kernel counts once."""
    from qdetr.quant import kernels, native_kernels

    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    trainers = {v: Trainer(v, workload, x, time.process_time) for v in ("float", "w4a4")}
    homes = {name: kernels for name in _KERNELS} | {f"{name}_rows": native_kernels for name in _KERNELS}
    real = {name: getattr(home, name) for name, home in homes.items()}
    spent = {name: 0.0 for name in _KERNELS}
    depth = [0]

    def timed(name):
        kind = name.removesuffix("_rows")

        def run(*a, **k):
            if depth[0]:
                return real[name](*a, **k)
            depth[0] += 1
            start = time.process_time()
            try:
                return real[name](*a, **k)
            finally:
                spent[kind] += time.process_time() - start
                depth[0] -= 1

        return run

    def install(table):
        for name, fn in table.items():
            setattr(homes[name], name, fn)

    modes = {"float": None, "quantized": {n: timed(n) for n in homes}, "copy-only kernels": _copy_kernels()}
    times = {m: [] for m in modes}
    try:
        for i in range(args.pairs + 1):  # round 0 warms up
            for mode, table in modes.items() if i % 2 else reversed(modes.items()):
                if table is not None:
                    install(table)
                if i == 1 and mode == "quantized":
                    spent.update({n: 0.0 for n in _KERNELS})
                elapsed = trainers["float" if table is None else "w4a4"].step()
                if i:
                    times[mode].append(elapsed)
                install(real)
    finally:
        install(real)
    float_s = statistics.median(times["float"])
    print(f"[{workload}] where the quantized step's time goes ({DEFAULT_BACKEND} kernels, {args.pairs} rounds, CPU time)")
    for mode, t in times.items():
        ratios = [a / b for a, b in zip(t, times["float"])]
        print(f"  {mode:<18} step {statistics.median(t):.3f} s  ratio {statistics.median(ratios):.3f}x "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    for name in _KERNELS:
        per_step = spent[name] / args.pairs
        print(f"  inside {name:<16} {per_step * 1e3:6.1f} ms per step = {per_step / float_s:.3f} of the float step")


def report(result: dict, args) -> None:
    w = result["workload"]
    spec = WORKLOADS[w]
    print(
        f"[{w}] ResNet-50 + {spec['layers']}+{spec['layers']} transformer d=256, {spec['optimizer']}, "
        f"batch 2x3x{args.size}x{args.size}, {args.threads} thread(s), {result['pairs']} alternating pairs"
    )
    labels = {
        "float": "float (qdetr attention)",
        "w4a4": f"W4A4 attn8, default ({DEFAULT_BACKEND})",
        "w4a4_separate": "W4A4 attn8, separate nodes",
        "w4a4_eager": "W4A4 attn8, eager",
        "w4a4_compiled": "W4A4 attn8, compiled",
    }
    for v, e in result["variants"].items():
        line = f"  {labels[v]:<30} step {e['step_s']:.3f} s  saved {e['saved_mib']:7.1f} MiB"
        if "peak_rss_mib" in e:
            line += f"  peak RSS {e['peak_rss_mib']:7.1f} MiB"
        print(line)
        if v != "float":
            r = e["time_ratio"]
            line = (
                f"    step time ratio {r['median']:.3f}x (range {r['min']:.3f}-{r['max']:.3f})"
                f"  saved-for-backward ratio {e['saved_ratio']:.3f}x"
            )
            if "peak_rss_ratio" in e:
                line += f"  peak RSS ratio {e['peak_rss_ratio']:.3f}x"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["detr", "sgd2"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-runs", type=int, default=1, help="fresh processes per variant for peak RSS")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--separate", action="store_true", help="also time the default kernels without the fused conv / linear node")
    parser.add_argument("--eager", action="store_true", help="also time the PyTorch-operation (eager) kernels")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile kernels")
    parser.add_argument("--breakdown", action="store_true", help="kernel time per step and the copy-only floor")
    parser.add_argument("--json", action="store_true", help="print one JSON line per workload")
    parser.add_argument("--wall", action="store_true", help="wall-clock step times instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for workload in args.workload:
        if args.breakdown:
            breakdown(workload, args)
            continue
        result = run_workload(workload, args)
        if args.json:
            print(json.dumps(result))
        else:
            report(result, args)


if __name__ == "__main__":
    main()
