"""Same detections? PyTorch fake-quant vs onnxruntime integer kernels on the same images.

Two parts:

1. **Trained models** (``--runs``): run folders of deploy-profile QAT runs (e.g. the 4- and
   2-bit rows of ``method_table.py --profiles deploy``). Each model is exported with
   ``qdetr.export_onnx`` and evaluated three ways on its validation set (COCO AP, pycocotools,
   batch 1): PyTorch fake-quant; onnxruntime with graph optimizations off (``disable``: the QDQ
   graph runs as float ops, so only float op order differs); onnxruntime fully optimized
   (``all``: integer kernels). With ``--coco-mini`` the same models also run on coco-mini
   validation images (agreement only: these models know the synthetic classes, not COCO's).
2. **Full-size models** (``--r50``): DETR-R50 / SMCA-R50 with random weights, quantized (deploy
   profile, ``--r50-bits``), calibrated on two coco-mini images, exported, and compared on
   ``--r50-images`` coco-mini images at ``--r50-size``. AP is meaningless for random weights,
   so only per-query agreement is reported.

Per-query agreement (all queries of all images): max |box difference| (normalised cxcywh),
share of queries whose top-1 class is identical, and max |score difference| (softmax or
sigmoid probability of the top class); also over "confident" queries (PyTorch score > 0.3).

Usage::

    python benchmarks/deploy_agreement.py --runs outputs/deploy_table/seed0/runs/w4_lsq_deploy \\
        outputs/deploy_table/seed0/runs/w2_lsq_deploy --coco-mini ../shared/data/coco-mini \\
        --r50 detr_r50 --out outputs/deploy_agreement
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qdetr import calibrate, export_onnx, quantize_model
from qdetr.data import CocoDetectionDataset, TransformConfig, collate_detection, make_eval_transforms
from qdetr.engine import TrainConfig, build_datasets, evaluate_coco
from qdetr.engine.predict import load_model_for_inference
from qdetr.export import OnnxDetector
from qdetr.models import create_model

__all__ = ["main", "agreement"]

CONFIDENT = 0.3


def _top1(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 (score, class) per query: softmax without the no-object class, or sigmoid."""
    logits = outputs["pred_logits"].float()
    prob = logits.softmax(-1)[..., :-1] if outputs.classification == "softmax" else logits.sigmoid()
    return prob.max(-1)


@torch.no_grad()
def agreement(reference: torch.nn.Module, other: torch.nn.Module, loader) -> dict:
    """Per-query agreement of ``other`` with ``reference`` over every query of every image."""
    box, score, same, total, conf_same, conf_total, conf_box = 0.0, 0.0, 0, 0, 0, 0, 0.0
    for batch in loader:
        a = reference(batch.pixel_values, batch.pixel_mask)
        b = other(batch.pixel_values, batch.pixel_mask)
        (sa, la), (sb, lb) = _top1(a), _top1(b)
        diff = (a["pred_boxes"].float() - b["pred_boxes"].float()).abs().amax(-1)
        box = max(box, float(diff.max()))
        score = max(score, float((sa - sb).abs().max()))
        same += int((la == lb).sum())
        total += la.numel()
        confident = sa > CONFIDENT
        conf_same += int((la == lb)[confident].sum())
        conf_total += int(confident.sum())
        if confident.any():
            conf_box = max(conf_box, float(diff[confident].max()))
    return {"queries": total, "max_box_diff": box, "top1_same": same / max(total, 1), "max_score_diff": score,
            "confident_queries": conf_total, "confident_top1_same": conf_same / max(conf_total, 1),
            "confident_max_box_diff": conf_box}


def _coco_mini_loader(root: Path, size: int, max_size: int | None, count: int) -> tuple[CocoDetectionDataset, DataLoader]:
    transforms = TransformConfig(train_scales=(size,), eval_size=size, max_size=max_size)
    dataset = CocoDetectionDataset(root / "val2017", root / "annotations" / "instances_val2017.json",
                                   make_eval_transforms(transforms))
    dataset.ids = dataset.ids[:count]
    return dataset, DataLoader(dataset, batch_size=1, collate_fn=collate_detection)


def trained_run(run_dir: Path, out: Path, threads: int, coco_mini: Path | None, coco_images: int) -> dict:
    """AP and agreement of one trained run: PyTorch vs onnxruntime (no optimizations / all)."""
    config = TrainConfig.from_file(run_dir / "config.json")
    _, val = build_datasets(config)
    loader = DataLoader(val, batch_size=1, collate_fn=collate_detection)
    loaded = load_model_for_inference(run_dir)
    model = loaded.model.eval()
    size = config.data.transforms.eval_size
    path = out / f"{run_dir.name}.onnx"
    t0 = time.time()
    export_onnx(model, path, example_size=(size, size))
    print(f"exported {path} ({time.time() - t0:.0f} s)", flush=True)
    torch.set_num_threads(threads)
    runtimes = {"pytorch": model,
                "ort-disable": OnnxDetector(path, intra_op_threads=threads, optimization_level="disable"),
                "ort-all": OnnxDetector(path, intra_op_threads=threads, optimization_level="all")}
    result = {"run": str(run_dir), "onnx": str(path), "bits": config.quant.bits, "profile": config.quant.quantization.profile,
              "images": len(val), "ap": {}, "ap50": {}}
    for name, runtime in runtimes.items():
        ev = evaluate_coco(runtime, loader, val.coco)
        result["ap"][name], result["ap50"][name] = ev.ap, ev.ap50
    result["agreement"] = {name: agreement(model, runtimes[name], loader) for name in ("ort-disable", "ort-all")}
    if coco_mini is not None:
        _, mini = _coco_mini_loader(coco_mini, size, None, coco_images)
        result["coco_mini_agreement"] = agreement(model, runtimes["ort-all"], mini)
        result["coco_mini_images"] = coco_images
    return result


def full_size(name: str, bits: int, coco_mini: Path, size: int, count: int, out: Path, threads: int) -> dict:
    """Random-weight DETR-R50 / SMCA-R50, deploy profile, calibrated on coco-mini: agreement only."""
    torch.manual_seed(0)
    model = quantize_model(create_model(name).eval(), bits, profile="deploy").eval()
    dataset, loader = _coco_mini_loader(coco_mini, size, int(size * 1333 / 800), count + 2)
    calibration = DataLoader(torch.utils.data.Subset(dataset, [count, count + 1]), batch_size=2,
                             collate_fn=collate_detection)
    with torch.no_grad():
        calibrate(model, calibration, forward_fn=lambda m, b: m(b.pixel_values, b.pixel_mask))
    path = out / f"{name}_deploy_w{bits}a{bits}_coco_calibrated.onnx"
    t0 = time.time()
    export_onnx(copy.deepcopy(model), path)
    print(f"exported {path} ({time.time() - t0:.0f} s)", flush=True)
    dataset.ids = dataset.ids[:count]
    torch.set_num_threads(threads)
    detector = OnnxDetector(path, intra_op_threads=threads)
    return {"model": name, "bits": bits, "size": size, "images": count, "onnx": str(path),
            "agreement": agreement(model, detector, loader)}


def _fmt(a: dict) -> str:
    return (f"max box diff {a['max_box_diff']:.2e}, top-1 same {100 * a['top1_same']:.1f} % of {a['queries']} queries, "
            f"max score diff {a['max_score_diff']:.2e}; confident ({a['confident_queries']}): top-1 same "
            f"{100 * a['confident_top1_same']:.1f} %, max box diff {a['confident_max_box_diff']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="deploy-profile run folders")
    parser.add_argument("--coco-mini", type=Path, default=None)
    parser.add_argument("--coco-mini-images", type=int, default=32)
    parser.add_argument("--r50", nargs="*", default=[], help="detr_r50 and/or smca_detr_r50")
    parser.add_argument("--r50-bits", type=int, default=4)
    parser.add_argument("--r50-size", type=int, default=512, help="short side of the coco-mini images")
    parser.add_argument("--r50-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/deploy_agreement"))
    args = parser.parse_args(argv)
    if (args.r50 or args.coco_mini) and args.coco_mini is not None and not args.coco_mini.is_dir():
        parser.error(f"--coco-mini {args.coco_mini} does not exist")
    if args.r50 and args.coco_mini is None:
        parser.error("--r50 needs --coco-mini (calibration and test images)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/deploy_agreement.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(command, flush=True)
    results = {"command": command, "runs": [], "full_size": []}
    for run_dir in args.runs:
        r = trained_run(run_dir, args.out, args.threads, args.coco_mini, args.coco_mini_images)
        results["runs"].append(r)
        print(f"{run_dir.name} ({r['bits']}-bit {r['profile']}, {r['images']} images): AP "
              + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["ap"].items())
              + f"; AP50 " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["ap50"].items()), flush=True)
        for name, a in r["agreement"].items():
            print(f"  pytorch vs {name}: {_fmt(a)}", flush=True)
        if "coco_mini_agreement" in r:
            print(f"  coco-mini ({args.coco_mini_images} images) pytorch vs ort-all: {_fmt(r['coco_mini_agreement'])}")
        (args.out / "agreement.json").write_text(json.dumps(results, indent=1))
    for name in args.r50:
        r = full_size(name, args.r50_bits, args.coco_mini, args.r50_size, args.r50_images, args.out, args.threads)
        results["full_size"].append(r)
        print(f"{name} W{r['bits']}A{r['bits']} random weights, {r['images']} coco-mini images at {r['size']} px: "
              f"{_fmt(r['agreement'])}", flush=True)
        (args.out / "agreement.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
