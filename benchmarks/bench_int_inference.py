"""Inference speed of integer QDQ ONNX models in onnxruntime vs float and fake-quant PyTorch.

Variants (one cell = model x image size x batch x threads):

==================  =====================================================================
variant             what runs
==================  =====================================================================
torch-float         PyTorch float eager model
torch-fq-w4a4       PyTorch W4A4 fake-quant model (deploy profile), the model exported below
ort-float           onnxruntime, float ONNX (``qdetr.export_onnx`` of the float model)
ort-w8a8            onnxruntime, QDQ ONNX of the W8A8 deploy-profile model
ort-w4a4            onnxruntime, QDQ ONNX of the W4A4 deploy-profile model
ort-w2a2            onnxruntime, QDQ ONNX of the W2A2 deploy-profile model
ort-int8-static     onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights,
                    uint8 activations) of the float ONNX: the reference an int8 PTQ reaches
==================  =====================================================================

Weights are random (speed does not depend on them); quantized models are calibrated on two
random images. Exports have dynamic batch and image size (one file per variant serves every
cell) and are cached in ``--cache``. onnxruntime runs at ``ORT_ENABLE_ALL`` with
``intra_op_num_threads`` = threads; PyTorch with ``torch.set_num_threads(threads)``.

Timing: per cell, one warm-up run per variant, then ``--rounds`` rounds; in each round every
variant runs ``--runs`` times in turn (alternating, so load changes on a shared machine hit
all variants alike). Figures are medians of wall time; images/s = batch / median.
Results accumulate in ``--json`` (one entry per cell and variant); ``--write-docs`` rewrites
the marked section of docs/performance.md from it and ``--plot`` draws images/s against bits.

Usage::

    python benchmarks/bench_int_inference.py --models detr_r50 --sizes 800 --batches 1 --threads 2
    python benchmarks/bench_int_inference.py --report-only --write-docs docs/performance.md \\
        --plot docs/images/int_inference.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["VARIANTS", "main"]

VARIANTS = ("torch-float", "torch-fq-w4a4", "ort-float", "ort-w8a8", "ort-w4a4", "ort-w2a2", "ort-int8-static")
#: bits of each variant for the plot (float = 32)
BITS = {"torch-float": 32, "torch-fq-w4a4": 4, "ort-float": 32, "ort-w8a8": 8, "ort-w4a4": 4, "ort-w2a2": 2,
        "ort-int8-static": 8}
SECTION = "int-inference"


def _float_model(name: str) -> torch.nn.Module:
    from qdetr.models import create_model

    torch.manual_seed(0)
    return create_model(name).eval()


def _quantized(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    from qdetr import calibrate, quantize_model

    torch.manual_seed(0)
    quant = quantize_model(copy.deepcopy(model), bits, profile="deploy").eval()
    with torch.no_grad():
        calibrate(quant, [torch.randn(2, 3, 256, 256)])
    return quant


class _RandomReader:
    """Calibration data for ``quantize_static``: two random images at the benchmark size."""

    def __init__(self, size: int) -> None:
        rng = np.random.default_rng(0)
        self.items = iter(
            [{"pixel_values": rng.standard_normal((1, 3, size, size)).astype(np.float32),
              "pixel_mask": np.ones((1, size, size), np.int64)} for _ in range(2)]
        )

    def get_next(self):
        return next(self.items, None)


def prepare(model_name: str, variants: list[str], cache: Path, size: int) -> dict[str, object]:
    """Models and ONNX files for one model name: {variant: nn.Module or onnx path}."""
    from qdetr import export_onnx

    cache.mkdir(parents=True, exist_ok=True)
    float_model = _float_model(model_name)
    out: dict[str, object] = {}
    float_path = cache / f"{model_name}_float.onnx"
    needs_float_onnx = any(v in variants for v in ("ort-float", "ort-int8-static"))
    if needs_float_onnx and not float_path.is_file():
        t0 = time.time()
        export_onnx(float_model, float_path, metadata={"qdetr.model_name": model_name})
        print(f"exported {float_path} ({time.time() - t0:.0f} s)", flush=True)
    for variant in variants:
        if variant == "torch-float":
            out[variant] = float_model
        elif variant == "torch-fq-w4a4":
            out[variant] = _quantized(float_model, 4)
        elif variant == "ort-float":
            out[variant] = float_path
        elif variant.startswith("ort-w"):
            bits = int(variant[len("ort-w")])
            path = cache / f"{model_name}_deploy_w{bits}a{bits}.onnx"
            if not path.is_file():
                t0 = time.time()
                export_onnx(_quantized(float_model, bits), path, metadata={"qdetr.model_name": model_name})
                print(f"exported {path} ({time.time() - t0:.0f} s)", flush=True)
            out[variant] = path
        elif variant == "ort-int8-static":
            path = cache / f"{model_name}_ort_int8_static_{size}.onnx"
            if not path.is_file():
                from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

                t0 = time.time()
                quantize_static(str(float_path), str(path), _RandomReader(size), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["Conv", "MatMul", "Gemm"])
                print(f"quantize_static -> {path} ({time.time() - t0:.0f} s)", flush=True)
            out[variant] = path
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return out


def _runner(target, threads: int):
    """A zero-argument-free callable ``run(pixel_values, pixel_mask)`` for a model or ONNX file."""
    if isinstance(target, torch.nn.Module):
        def run(pixel_values, pixel_mask):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                target(pixel_values, pixel_mask)
        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(pixel_values, pixel_mask):
        feed = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
        session.run(None, {k: v for k, v in feed.items() if k in names})
    return run


def time_cell(targets: dict[str, object], size: int, batch: int, threads: int, rounds: int, runs: int) -> dict:
    """Median wall time per variant for one cell (alternating variants within each round)."""
    pixel_values = torch.randn(batch, 3, size, size)
    pixel_mask = torch.ones(batch, size, size, dtype=torch.int64)
    runners = {name: _runner(target, threads) for name, target in targets.items()}
    for run in runners.values():
        run(pixel_values, pixel_mask)  # warm-up (kernel selection, pre-packing)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            # One untimed run after each switch: the previous variant's worker threads (onnxruntime's
            # spinning pool threads, PyTorch's OpenMP threads) are still busy for a moment, which
            # would otherwise be charged to whichever variant comes next.
            run(pixel_values, pixel_mask)
            for _ in range(runs):
                t0 = time.perf_counter()
                run(pixel_values, pixel_mask)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}, "files": {}, "commands": []}


def _save(path: Path, data: dict) -> None:
    from qdetr.atomic_write import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def markdown(data: dict) -> str:
    """The performance table (one row per cell) and the file-size table, from the results JSON."""
    shown = [v for v in VARIANTS if any(v in cell["seconds"] for cell in data["cells"].values())]
    lines = ["| model | px | batch | threads | " + " | ".join(shown) + " | W4A4 / ORT float | W4A4 / fake-quant |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in shown) + " | ---: | ---: |"]
    for key in sorted(data["cells"], key=lambda k: (k.split("|")[0], -int(k.split("|")[1]), *map(int, k.split("|")[2:]))):
        model, size, batch, threads = key.split("|")
        seconds = data["cells"][key]["seconds"]
        ips = {v: int(batch) / s for v, s in seconds.items()}
        cells = [f"{ips[v]:.3g}" if v in ips else "-" for v in shown]
        ratio = lambda a, b: f"{ips[a] / ips[b]:.2f}x" if a in ips and b in ips else "-"  # noqa: E731
        lines.append(f"| {model} | {size} | {batch} | {threads} | " + " | ".join(cells)
                     + f" | {ratio('ort-w4a4', 'ort-float')} | {ratio('ort-w4a4', 'torch-fq-w4a4')} |")
    sizes = ["", "| ONNX file | MB | / float |", "| --- | ---: | ---: |"]
    for model, files in sorted(data["files"].items()):
        float_bytes = files.get("ort-float")
        for variant, size_bytes in files.items():
            rel = f"{size_bytes / float_bytes:.2f}" if float_bytes else "-"
            sizes.append(f"| {model} {variant} | {size_bytes / 2**20:.1f} | {rel} |")
    return "\n".join(lines + sizes)


def plot(data: dict, path: Path) -> None:
    """images/s against bits for every measured cell (one line per cell, onnxruntime variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    for key, cell in sorted(data["cells"].items()):
        model, size, batch, threads = key.split("|")
        points = sorted((BITS[v], int(batch) / s) for v, s in cell["seconds"].items()
                        if v.startswith("ort-") and v != "ort-int8-static")
        if points:
            ax.plot([b for b, _ in points], [y for _, y in points], marker="o",
                    label=f"{model} {size}px b{batch} t{threads}")
        for v, marker in (("torch-float", "x"), ("torch-fq-w4a4", "s")):
            if v in cell["seconds"]:
                ax.scatter([BITS[v]], [int(batch) / cell["seconds"][v]], marker=marker, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 32], ["W2A2", "W4A4", "W8A8", "float"])
    ax.set_ylabel("images / s")
    ax.set_title("onnxruntime CPU (lines); PyTorch float x, fake-quant W4A4 square", fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from qdetr.atomic_write import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_section(path: Path, body: str) -> None:
    text = path.read_text()
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["detr_r50"], help="registry names (detr_r50, smca_detr_r50)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[800])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:-1]), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per variant per round")
    parser.add_argument("--cache", type=Path, default=Path("outputs/bench_int"), help="ONNX files are kept here")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: CACHE/results.json)")
    parser.add_argument("--report-only", action="store_true", help="only print/write the table from --json")
    parser.add_argument("--write-docs", type=Path, default=None, help="rewrite the marked section of this page")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of images/s against bits")
    args = parser.parse_args(argv)
    results_path = args.json or args.cache / "results.json"
    data = _load(results_path)
    if not args.report_only:
        command = "python benchmarks/bench_int_inference.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        data["commands"].append(command)
        for model_name in args.models:
            for size in args.sizes:
                targets = prepare(model_name, args.variants, args.cache, size)
                files = data["files"].setdefault(model_name, {})
                for variant, target in targets.items():
                    if isinstance(target, Path) and variant != "ort-int8-static":
                        files[variant] = os.path.getsize(target)
                    elif isinstance(target, Path):
                        files[f"{variant} ({size}px calibration)"] = os.path.getsize(target)
                for batch in args.batches:
                    for threads in args.threads:
                        seconds = time_cell(targets, size, batch, threads, args.rounds, args.runs)
                        key = f"{model_name}|{size}|{batch}|{threads}"
                        data["cells"][key] = {"seconds": seconds, "rounds": args.rounds, "runs": args.runs,
                                              "command": command}
                        print(f"{key}: " + ", ".join(f"{v} {batch / s:.2f} img/s" for v, s in seconds.items()),
                              flush=True)
                        _save(results_path, data)
    table = markdown(data)
    print(table)
    if args.plot:
        plot(data, args.plot)
    if args.write_docs:
        commands = "\n".join(dict.fromkeys(data["commands"]))
        _write_section(args.write_docs, f"{table}\n\nCommands (in this order; each cell's figures come from one run):\n\n"
                       f"```\n{commands}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
