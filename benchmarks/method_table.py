"""The Q-DETR ablation in miniature: float, LSQ baseline, +DA, +FQM, +both at 4 and 2 bits.

Per seed, a float teacher is trained on the synthetic shapes set (the demo's settings), then
each quantized variant is trained from it for the same number of epochs:

==================  ==================================================================
row                 what it trains
==================  ==================================================================
float               the teacher itself
LSQ baseline        QAT (LSQ weights / LSQ+ activations), detection loss only
+ alignment (DA)    QAT with distribution alignment on the decoder co-attention query
+ matching (FQM)    QAT + DRD distillation with foreground-aware query matching
+ both (Q-DETR)     DA + DRD/FQM
==================  ==================================================================

The table reports the mean and the spread (sample standard deviation) over seeds of COCO
AP and AP50 (pycocotools, eval batch size 1) and writes it, with the exact command, to
``docs/results.md`` (``--write-docs``).

``--profiles paper deploy`` trains each selected variant with both layer profiles: ``paper``
(the paper's quantizers: per-head attention scales, LSQ+ everywhere) and ``deploy`` (the
numerics onnxruntime's integer kernels run: per-tensor activations, 8-bit stem and residual
outputs; docs/deployment.md), so the accuracy cost of deployability is a measured number.
``--variants`` selects rows and ``--section`` names the marked docs section that is replaced.

Usage::

    python benchmarks/method_table.py --seeds 0 1 2 --out outputs/method_table --write-docs docs/results.md
    python benchmarks/method_table.py --coco-mini ../shared/data/coco-mini ...   # real images (optional)
    python benchmarks/method_table.py --variants "LSQ baseline" --profiles paper deploy \
        --section deploy-table --out outputs/deploy_table --write-docs docs/results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from qdetr.demo import DemoConfig, demo_train_config
from qdetr.engine.trainer import Trainer

__all__ = ["VARIANTS", "main"]

#: (row name, distillation enabled, alignment enabled)
VARIANTS = (
    ("LSQ baseline", False, False),
    ("+ alignment (DA)", False, True),
    ("+ matching (FQM)", True, False),
    ("+ both (Q-DETR)", True, True),
)


def _coco_mini_sections(root: Path) -> dict:
    ann = root / "annotations"
    return {
        "dataset": "coco",
        "train_images": str(root / "train2017"),
        "train_ann": str(ann / "instances_train2017.json"),
        "val_images": str(root / "val2017"),
        "val_ann": str(ann / "instances_val2017.json"),
        "transforms": {"train_scales": [112, 128, 144], "max_size": 240, "eval_size": 128,
                       "crop_resize_scales": [128], "crop_size": [96, 128]},
    }


def _finished(output_dir: Path) -> dict | None:
    """The result of a run that already finished in ``output_dir`` (final model + final eval), else None."""
    from qdetr.zoo.run_files import RUN_MODEL_DIR, LEGACY_MODEL_FILE

    log = output_dir / "log.jsonl"
    model_path = output_dir / RUN_MODEL_DIR
    if not (model_path / "config.json").is_file():
        model_path = output_dir / LEGACY_MODEL_FILE
    if not (model_path.exists() and log.is_file()):
        return None
    evals = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "eval"]
    if not evals:
        return None
    return {"ap": evals[-1]["AP"], "ap50": evals[-1]["AP50"], "seconds": None, "model_path": str(model_path),
            "eval_batch_size": evals[-1].get("eval_batch_size"), "reused": True}


def _run(job: tuple[dict, int, bool]) -> dict:
    config_dict, threads, reuse = job
    if reuse and (done := _finished(Path(config_dict["output_dir"]))) is not None:
        return done
    torch.set_num_threads(threads)
    from qdetr.engine.config import TrainConfig

    result = Trainer(TrainConfig.from_dict(config_dict)).fit()
    return {"ap": result.eval.ap, "ap50": result.eval.ap50, "seconds": result.train_seconds,
            "model_path": str(result.model_path), "eval_batch_size": result.eval.eval_batch_size}


def _config(demo: DemoConfig, name: str, coco_mini: Path | None, **sections):
    config = demo_train_config(demo, name, **sections)
    if coco_mini is not None:
        data = config.to_dict()["data"]
        data.update(_coco_mini_sections(coco_mini))
        config = config.with_overrides({"data": data})
    return config


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def _write_section(path: Path, section: str, name: str = "method-table") -> None:
    """Replaces the marked ``name`` section of ``path`` (or appends it / creates the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else "# Results\n\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--teacher-epochs", type=int, default=DemoConfig().teacher_epochs)
    parser.add_argument("--qat-epochs", type=int, default=DemoConfig().qat_epochs)
    parser.add_argument("--train-images", type=int, default=DemoConfig().train_images)
    parser.add_argument("--distill-weight", type=float, default=DemoConfig().distill_weight)
    parser.add_argument("--coco-mini", type=Path, default=None, help="use this coco-mini folder instead of the synthetic set")
    parser.add_argument("--shared-teacher", action="store_true",
                        help="train one float teacher (first seed) and vary only the quantized runs' seeds")
    parser.add_argument("--processes", type=int, default=2, help="quantized runs trained in parallel (1 thread each)")
    parser.add_argument("--out", default="outputs/method_table")
    parser.add_argument("--write-docs", default=None, help="write the markdown table here (e.g. docs/results.md)")
    parser.add_argument("--variants", nargs="+", default=[name for name, _, _ in VARIANTS],
                        help="quantized rows to train (names of VARIANTS)")
    parser.add_argument("--profiles", nargs="+", default=["paper"], choices=("paper", "deploy"),
                        help="layer profiles each variant is trained with")
    parser.add_argument("--section", default="method-table", help="marked docs section to replace")
    parser.add_argument("--kernels", default="auto", choices=("auto", "native", "eager", "compiled"),
                        help="fake-quant kernels of the quantized runs (quant.kernels); the step-size gradients "
                        "of each are summed in another order, so runs land on slightly different weights")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="read back runs whose folder already holds model_final.pt and a final eval")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - {name for name, _, _ in VARIANTS}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {[name for name, _, _ in VARIANTS]}")
    if args.coco_mini is not None and not args.coco_mini.is_dir():
        parser.error(f"--coco-mini {args.coco_mini} does not exist")

    start = time.time()
    rows: dict[tuple[str, int | None, str], list[dict]] = {}
    teacher = None
    teacher_data = None
    for seed in args.seeds:
        demo = dataclasses.replace(
            DemoConfig(), out_dir=str(Path(args.out) / f"seed{seed}"), seed=seed,
            teacher_epochs=args.teacher_epochs, qat_epochs=args.qat_epochs, train_images=args.train_images,
            distill_weight=args.distill_weight,
        )
        teacher_cfg = _config(
            demo, "float", args.coco_mini, epochs=demo.teacher_epochs,
            optim={"lr": demo.teacher_lr, "lr_backbone": demo.teacher_lr, "lr_drop": max(1, int(demo.teacher_epochs * 0.8))},
        )
        if teacher is None or not args.shared_teacher:
            teacher_data = {k: teacher_cfg.to_dict()["data"][k] for k in ("synthetic_seed", "synthetic_root")}
            teacher = _run((teacher_cfg.to_dict(), 1, args.reuse_finished))
            print(f"seed {seed}: float AP {100 * teacher['ap']:.1f}", flush=True)
            rows.setdefault(("float", None, "-"), []).append(teacher)
        jobs, keys = [], []
        for bits, profile, (name, distill, align) in (
            (b, p, v) for b in args.bits for p in args.profiles for v in VARIANTS if v[0] in args.variants
        ):
            run_name = f"w{bits}_" + name.strip("+ ").split(" ")[0].lower()
            run_name += "" if profile == "paper" else f"_{profile}"
            quant = {"bits": bits, "float_checkpoint": teacher["model_path"], "kernels": args.kernels}
            if profile != "paper":
                quant["profile"] = profile
            cfg = _config(
                demo, run_name, args.coco_mini, epochs=demo.qat_epochs,
                optim={"lr": demo.qat_lr, "lr_backbone": demo.qat_lr},
                quant=quant,
                distill={"enabled": distill, "alignment": align, "weight": demo.distill_weight},
            )
            if args.shared_teacher and teacher_data is not None:
                # Only the quantized runs' seed varies: keep the teacher's data set.
                data = cfg.to_dict()["data"]
                data.update(teacher_data)
                cfg = cfg.with_overrides({"data": data})
            jobs.append((cfg.to_dict(), 1, args.reuse_finished))
            keys.append((name, bits, profile))
        with mp.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(_run, jobs)
        for key, result in zip(keys, results):
            rows.setdefault(key, []).append(result)
            print(f"seed {seed}: {key[1]}-bit {key[0]} ({key[2]} profile): AP {100 * result['ap']:.1f}", flush=True)

    dataset = f"coco-mini ({args.coco_mini})" if args.coco_mini else "synthetic shapes"
    profiles = len(args.profiles) > 1 or args.profiles != ["paper"]
    lines = [
        f"| method |{' profile |' if profiles else ''} bits (W/A/attn) | AP (mean ± sd) | AP50 (mean ± sd) | seeds |",
        f"| --- |{' --- |' if profiles else ''} --- | ---: | ---: | ---: |",
    ]
    for (name, bits, profile), results in rows.items():
        lines.append(
            f"| {name} |{f' {profile} |' if profiles else ''} {'32/32/32' if bits is None else f'{bits}/{bits}/8'} | "
            f"{_mean_spread([r['ap'] for r in results])} | {_mean_spread([r['ap50'] for r in results])} | {len(results)} |"
        )
    table = "\n".join(lines)
    elapsed = time.time() - start
    command = "python benchmarks/method_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(table)
    print(f"{elapsed:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "method_table.json").write_text(json.dumps(
        {"command": command, "seconds": elapsed, "rows": [{"method": k[0], "bits": k[1], "profile": k[2], "runs": v} for k, v in rows.items()]},
        indent=2))
    if args.write_docs:
        demo = DemoConfig()
        Path(args.write_docs).parent.mkdir(parents=True, exist_ok=True)
        title = (f"Q-DETR ablation in miniature ({dataset})" if not profiles
                 else f"The accuracy cost of deployability ({dataset})")
        section = (
            f"<!-- {args.section}:start -->\n"
            f"## {title}\n\n"
            f"{table}\n\n"
            f"COCO box AP in percent (pycocotools, IoU .50:.95, eval batch size 1) on the validation split; "
            f"mean ± sample standard deviation over seeds {args.seeds}"
            + (" (one float teacher, seed {}, shared by all quantized runs)".format(args.seeds[0]) if args.shared_teacher else "")
            + f". Model `{demo.model}` ({demo.model_overrides}) at {demo.image_size} px, float teacher trained for "
            f"{args.teacher_epochs} epochs on {args.train_images} images, every quantized run trained "
            f"{args.qat_epochs} epochs from it (lr {demo.qat_lr}, distillation weight {args.distill_weight}, tau 0.5). "
            f"Wall time {elapsed / 60:.0f} min on 2 CPU cores"
            + (" (runs that had finished in earlier invocations were read back: --reuse-finished)"
               if any(r.get("reused") for runs in rows.values() for r in runs) else "")
            + ".\n\n"
            f"Command:\n\n```\n{command}\n```\n"
            f"<!-- {args.section}:end -->"
        )
        _write_section(Path(args.write_docs), section, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
