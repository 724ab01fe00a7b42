"""On-disk size and load time of packed Q-DETR SMCA-R50 checkpoints vs the float32 release file.

For each bit width (4 and 2) the script:

1. builds a full-size release-layout state dict (``qdetr.testing.make_release_state_dict``
   from the shared manifest, random but valid values) and ``torch.save``s it as
   ``{"model": state_dict}`` -- the size of a release ``.pth`` holding only the model;
2. converts it with ``qdetr.zoo.load_release_checkpoint`` (safe load, key conversion,
   strict load into ``qdetr_smca_r50``);
3. saves it with ``save_pretrained`` (bit-packed ``model.safetensors``);
4. loads it back with ``load_pretrained_dir`` and checks that the outputs are bit-exact;
5. prints sizes, ratios against the targets (<= 0.16x at 4 bits, <= 0.10x at 2 bits), the
   split between packed codes and float tensors, and load times (median of ``--repeats``).

The release (``"seed"``) layout keeps 5.85 M of its 42.26 M parameters in float32
(downsample convs, cross-attention projections, ``input_proj``, heads): 23.3 MB, already
0.138x of the float32 file. A second table therefore measures the same SMCA-R50 built with
the ``"paper"`` profile and ``quantize_downsample=True`` (everything but ``input_proj``, the
heads, the SMCA point predictors and LayerNorms quantized), against its own float32 state dict.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_zoo_size.py [--bits 4 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from qdetr.testing import example_inputs, make_release_state_dict, release_manifest_path
from qdetr.zoo.hub import WEIGHTS_NAME, load_pretrained_dir, save_pretrained
from qdetr.zoo.packed_state import PACKED_SUFFIX
from qdetr.zoo.release import load_release_checkpoint

TARGETS = {4: 0.16, 2: 0.10}


def _tensor_bytes(path: Path) -> tuple[int, int]:
    """(bytes of packed codes, bytes of other tensors) in a safetensors file."""
    packed = other = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            shape = t.get_shape()
            numel = 1
            for s in shape:
                numel *= s
            size = numel * {"U8": 1, "F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8}[t.get_dtype()]
            if key.endswith(PACKED_SUFFIX):
                packed += size
            else:
                other += size
    return packed, other


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(bits: int, workdir: Path, repeats: int) -> dict:
    state = make_release_state_dict(release_manifest_path(), seed=bits)
    release = workdir / f"ckpt_{bits}_bit_smca_detr_coco.pth"
    torch.save({"model": state}, release)
    start = time.perf_counter()
    model = load_release_checkpoint(release)
    convert_s = time.perf_counter() - start
    out_dir = workdir / f"packed_w{bits}"
    start = time.perf_counter()
    save_pretrained(model, out_dir)
    save_s = time.perf_counter() - start
    load_s = _median_seconds(lambda: load_pretrained_dir(out_dir), repeats)
    pickle_s = _median_seconds(lambda: torch.load(release, map_location="cpu", weights_only=True), repeats)
    loaded = load_pretrained_dir(out_dir)
    pixel_values, pixel_mask = example_inputs(2, sizes_hw=[(96, 128), (80, 100)])
    with torch.no_grad():
        a, b = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    bit_exact = torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    release_bytes = release.stat().st_size
    packed_file = out_dir / WEIGHTS_NAME
    weights_bytes = packed_file.stat().st_size
    dir_bytes = sum(p.stat().st_size for p in out_dir.iterdir())
    codes_bytes, float_bytes = _tensor_bytes(packed_file)
    return {
        "bits": bits,
        "release_MB": release_bytes / 1e6,
        "safetensors_MB": weights_bytes / 1e6,
        "directory_MB": dir_bytes / 1e6,
        "ratio": weights_bytes / release_bytes,
        "target": TARGETS.get(bits),
        "packed_codes_MB": codes_bytes / 1e6,
        "float_tensors_MB": float_bytes / 1e6,
        "convert_from_pth_s": convert_s,
        "save_s": save_s,
        "load_packed_s": load_s,
        "torch_load_pth_s": pickle_s,
        "bit_exact": bit_exact,
    }


def run_full_quantization(bits: int, workdir: Path) -> dict:
    """Packed size of SMCA-R50 with the paper profile and quantized downsample convs."""
    from qdetr.models import create_model
    from qdetr.quant import QuantConfig, calibrate

    torch.manual_seed(bits)
    model = create_model(
        "qdetr_smca_r50", quant_config=QuantConfig(bits=bits, profile="paper", quantize_downsample=True)
    )
    pixel_values, pixel_mask = example_inputs(1, sizes_hw=[(64, 64)])
    calibrate(model, [(pixel_values, pixel_mask)])
    model.eval()
    float_file = workdir / f"float_{bits}.pth"
    latent = {k: v for k, v in model.state_dict().items() if "quantizer" not in k and "q_align" not in k}
    torch.save({"model": latent}, float_file)
    out_dir = workdir / f"paper_w{bits}"
    save_pretrained(model, out_dir)
    packed_file = out_dir / WEIGHTS_NAME
    codes_bytes, float_bytes = _tensor_bytes(packed_file)
    return {
        "bits": bits,
        "float_MB": float_file.stat().st_size / 1e6,
        "safetensors_MB": packed_file.stat().st_size / 1e6,
        "ratio": packed_file.stat().st_size / float_file.stat().st_size,
        "target": TARGETS.get(bits),
        "packed_codes_MB": codes_bytes / 1e6,
        "float_tensors_MB": float_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if not release_manifest_path().is_file():
        raise SystemExit(f"release manifest not found at {release_manifest_path()}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="qdetr-bench-zoo-") as tmp:
        rows = [run(b, Path(tmp), args.repeats) for b in args.bits]
        full = [run_full_quantization(b, Path(tmp)) for b in args.bits]
    if args.json:
        print(json.dumps({"release_seed_profile": rows, "paper_profile_quantized_downsample": full}, indent=2))
        return
    print("| bits | release .pth (fp32) | packed model.safetensors | ratio | target | packed codes | "
          "float tensors | load packed | torch.load .pth | convert .pth | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = f"<= {r['target']:.2f}x" if r["target"] else "-"
        met = "" if r["target"] is None else (" (met)" if r["ratio"] <= r["target"] else " (missed)")
        print(f"| W{r['bits']}/A{r['bits']}/Attn8 | {r['release_MB']:.1f} MB | {r['safetensors_MB']:.1f} MB | "
              f"{r['ratio']:.3f}x | {target}{met} | {r['packed_codes_MB']:.1f} MB | {r['float_tensors_MB']:.1f} MB | "
              f"{r['load_packed_s']:.2f} s | {r['torch_load_pth_s']:.2f} s | {r['convert_from_pth_s']:.2f} s | "
              f"{'yes' if r['bit_exact'] else 'NO'} |")
    print()
    print("Paper profile + quantize_downsample=True (same SMCA-R50, random weights):")
    print("| bits | float32 state dict | packed model.safetensors | ratio | target | packed codes | float tensors |")
    print("|---|---|---|---|---|---|---|")
    for r in full:
        target = f"<= {r['target']:.2f}x" if r["target"] else "-"
        met = "" if r["target"] is None else (" (met)" if r["ratio"] <= r["target"] else " (missed)")
        print(f"| W{r['bits']}/A{r['bits']}/Attn8 | {r['float_MB']:.1f} MB | {r['safetensors_MB']:.1f} MB | "
              f"{r['ratio']:.3f}x | {target}{met} | {r['packed_codes_MB']:.1f} MB | {r['float_tensors_MB']:.1f} MB |")


if __name__ == "__main__":
    main()
