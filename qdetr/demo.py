"""The main job on the embedded synthetic set, end to end, in minutes on a laptop CPU.

``python -m qdetr demo --out outputs/demo``:

1. generates the synthetic shapes set (train + val, deterministic);
2. trains a small float DETR teacher;
3. quantizes it to 4 and 2 bits and trains each with and without Q-DETR distillation
   (the QAT runs of one bit width run in parallel processes, one thread each);
4. evaluates every model with pycocotools (COCO AP at eval batch size 1);
5. saves packed models (``save_pretrained``: integer codes bit-packed in safetensors);
6. draws the predictions of the float, 4-bit and 2-bit models on a few validation images;
7. prints a table (bits, distillation, AP, AP50, model size) and writes it as markdown and
   JSON next to the picture.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qdetr.engine.config import TrainConfig

__all__ = ["DemoConfig", "DemoRow", "EpochLines", "run_demo", "demo_train_config", "format_table"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo (defaults: about 6-8 minutes on 2 CPU cores).

    Args:
        out_dir: output folder.
        seed: seed of data, initialisation and training.
        image_size: side of the synthetic images.
        train_images, val_images: synthetic split sizes.
        model: registry name of the detector (SMCA's Gaussian prior converges much faster than
            plain DETR, which matters in a few hundred steps).
        model_overrides: builder arguments (width, depth, queries).
        batch_size: training batch size.
        teacher_epochs: float training epochs.
        teacher_lr: float learning rate (backbone too: the tiny backbone starts from scratch).
        qat_epochs: epochs of each quantized run.
        qat_lr: learning rate of the quantized runs.
        bits: bit widths to run.
        distill_weight: lambda of the distillation term.
        parallel: run the quantized trainings of one bit width in parallel processes.
        num_threads: torch threads per process (tiny models run fastest single-threaded).
        predict_images: validation images drawn in the picture.
    """

    out_dir: str = "outputs/demo"
    seed: int = 0
    image_size: int = 128
    train_images: int = 320
    val_images: int = 64
    model: str = "smca_detr_tiny"
    model_overrides: dict = field(
        default_factory=lambda: {"hidden_dim": 64, "dim_feedforward": 128, "dropout": 0.0, "num_queries": 10}
    )
    batch_size: int = 16
    teacher_epochs: int = 50
    teacher_lr: float = 5e-4
    qat_epochs: int = 12
    qat_lr: float = 2e-4
    bits: tuple[int, ...] = (4, 2)
    distill_weight: float = 1.0
    parallel: bool = True
    num_threads: int = 1
    predict_images: int = 4

    def __post_init__(self) -> None:
        if self.teacher_epochs < 1 or self.qat_epochs < 1:
            raise ValueError("teacher_epochs and qat_epochs must be >= 1")
        if not self.bits:
            raise ValueError("bits must list at least one bit width, e.g. (4, 2)")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {self.num_threads}")

    @classmethod
    def quick(cls, **changes) -> "DemoConfig":
        """A smoke-test sized demo (tens of seconds; the models barely learn)."""
        base = dict(train_images=24, val_images=8, teacher_epochs=1, qat_epochs=1, predict_images=2, parallel=False)
        base.update(changes)
        return cls(**base)


@dataclass
class DemoRow:
    """One line of the demo table."""

    name: str
    bits: str
    distillation: str
    ap: float
    ap50: float
    size_bytes: int
    train_seconds: float
    eval_batch_size: int | None
    packed_dir: str


def demo_train_config(demo: DemoConfig, name: str, **sections) -> TrainConfig:
    """The TrainConfig of one demo run (``sections`` override parts, e.g. ``quant={...}``)."""
    size = demo.image_size
    data = {
        "synthetic_root": str(Path(demo.out_dir) / "data"),
        "synthetic_train_images": demo.train_images,
        "synthetic_val_images": demo.val_images,
        "synthetic_seed": demo.seed,
        # An easy variant of the shapes set (flat backgrounds, one hue family per class) so that
        # a detector trained from scratch learns in a few minutes on a CPU.
        "synthetic": {
            "image_size": size,
            "max_objects": 2,
            "min_size_frac": 0.3,
            "max_size_frac": 0.6,
            "num_classes_used": 3,
            "textured_background": False,
            "colour_by_class": True,
            "noise_std": 8.0,
        },
        # Fixed-size images: constant shapes keep CPU kernels cached (multi-scale and crops
        # are for real data; flips still augment).
        "transforms": {"train_scales": [size], "random_crop": False, "eval_size": size, "max_size": None},
        "batch_size": demo.batch_size,
        "eval_batch_size": 1,
    }
    base = {
        "output_dir": str(Path(demo.out_dir) / "runs" / name),
        "seed": demo.seed,
        "device": "cpu",
        "progress": False,
        "resume": False,
        "eval_every": 0,
        "log_every": 10,
        "data": data,
        # the tiny backbone starts from scratch: train the stem and layer1 too
        "model": {"name": demo.model, "overrides": dict(demo.model_overrides), "train_full_backbone": True},
    }
    base.update(sections)
    return TrainConfig.from_dict(base)


class EpochLines:
    """Prints one line per finished epoch of a demo run (at most one every ``min_seconds``,
    always the last), so ``make demo`` visibly moves; plain lines stay clean in logs and CI
    output, where progress bars would not.

    Args:
        name: the run's name in the lines.
        min_seconds: least time between two lines of this run.
        echo: the printer (default: ``print`` with flush).

    Examples:
        >>> lines = []
        >>> printer = EpochLines("float", min_seconds=0, echo=lines.append)
        >>> printer({"epoch": 1, "epochs": 2, "step": 20, "loss": 1.5, "seconds": 3.0})
        >>> lines
        ['[demo]     float: epoch 1/2, step 20, loss 1.500 (3 s)']
    """

    def __init__(self, name: str, min_seconds: float = 10.0, echo: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.min_seconds = min_seconds
        self.echo = echo or (lambda line: print(line, flush=True))
        self._last = float("-inf")

    def __call__(self, info: dict) -> None:
        last = info["epoch"] == info["epochs"]
        if not last and info["seconds"] - self._last < self.min_seconds:
            return
        self._last = info["seconds"]
        loss = f", loss {info['loss']:.3f}" if info.get("loss") is not None else ""
        self.echo(f"[demo]     {self.name}: epoch {info['epoch']}/{info['epochs']}, step {info['step']}{loss} "
                  f"({info['seconds']:.0f} s)")


def _train_and_pack(args: tuple) -> dict:
    """Worker: trains one config, saves the packed model; returns a plain-data summary."""
    config_dict, packed_dir, meta, num_threads, *show = args
    torch.set_num_threads(num_threads)
    from qdetr.engine.trainer import Trainer
    from qdetr.zoo.hub import save_pretrained
    from qdetr.zoo.resolve import resolve_model

    config = TrainConfig.from_dict(config_dict)
    result = Trainer(config, on_epoch_end=EpochLines(meta["name"]) if show and show[0] else None).fit()
    model = resolve_model(result.output_dir)  # the run folder is the model (labels and preprocessing included)

    metrics = {
        "synthetic_val_box_ap": {"value": result.eval.ap, "eval_batch_size": result.eval.eval_batch_size},
    }
    save_pretrained(
        model,
        packed_dir,
        provenance={"recipe": "qdetr demo", **meta},
        metrics=metrics,
        name=meta.get("name"),
    )
    size = sum(p.stat().st_size for p in Path(packed_dir).glob("*.safetensors"))
    return {
        "ap": result.eval.ap,
        "ap50": result.eval.ap50,
        "eval_batch_size": result.eval.eval_batch_size,
        "train_seconds": result.train_seconds,
        "size_bytes": size,
        "model_path": str(result.model_path),
    }


def format_table(rows: list[DemoRow]) -> str:
    """Markdown table of the demo rows."""
    lines = [
        "| model | bits (W/A/attn) | distillation | AP | AP50 | packed size | train time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.bits} | {r.distillation} | {100 * r.ap:.1f} | {100 * r.ap50:.1f} | "
            f"{r.size_bytes / 1024:.0f} KiB | {r.train_seconds:.0f} s |"
        )
    return "\n".join(lines)


def _prediction_picture(model_paths: list[tuple[str, str]], image_paths: list[Path], out_png: Path) -> Path:
    """Rows = models, columns = images; each cell shows the model's detections (score > 0.3)."""
    from PIL import Image, ImageDraw

    from qdetr.engine.predict import load_model_for_inference, predict_images

    rows = []
    for title, path in model_paths:
        loaded = load_model_for_inference(path)
        records = predict_images(
            loaded, image_paths, out_png.parent / "predictions" / title.replace(" ", "_"), threshold=0.3,
            display_short_side=256, overwrite=True,
        )
        rows.append((title, [Image.open(r["output"]).convert("RGB") for r in records]))
    cell = max(im.size[0] for _, ims in rows for im in ims)
    label_w = 120
    canvas = Image.new("RGB", (label_w + cell * len(image_paths), cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), title, fill="black")
        for c, image in enumerate(images):
            canvas.paste(image, (label_w + c * cell, r * cell))
    from qdetr.atomic_write import atomic_path

    with atomic_path(out_png) as tmp:
        canvas.save(tmp, format="PNG")
    return out_png


def run_demo(config: DemoConfig | None = None, echo: Callable[[str], None] | None = None) -> list[DemoRow]:
    """Runs the demo and writes ``table.md``, ``results.json`` and ``predictions.png`` to ``out_dir``.

    Args:
        config: sizes (default :class:`DemoConfig`).
        echo: progress printer (the CLI passes ``print``); default: log at INFO.

    Returns:
        The table rows (float teacher first).
    """
    config = config or DemoConfig()
    say = echo or logger.info
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.set_num_threads(config.num_threads)
    from qdetr.engine.trainer import build_datasets

    # 1. data
    teacher_cfg = demo_train_config(
        config,
        "float",
        epochs=config.teacher_epochs,
        data={**demo_train_config(config, "float").to_dict()["data"], "num_workers": 1},
        eval_every=max(1, config.teacher_epochs // 5),  # a few points for the AP curve
        optim={"lr": config.teacher_lr, "lr_backbone": config.teacher_lr, "lr_drop": max(1, int(config.teacher_epochs * 0.8))},
    )
    build_datasets(teacher_cfg)
    say(
        f"[demo] synthetic shapes: {config.train_images} train / {config.val_images} val images of "
        f"{config.image_size} px in {out / 'data'}"
    )

    # 2. float teacher
    say(f"[demo] training the float teacher ({config.model}, {config.teacher_epochs} epochs) ...")
    packed_root = out / "packed"
    teacher = _train_and_pack(
        (teacher_cfg.to_dict(), str(packed_root / "float"), {"name": "demo-float", "bits": "fp32"}, config.num_threads,
         echo is not None)
    )
    say(f"[demo]   float: AP {100 * teacher['ap']:.1f}  AP50 {100 * teacher['ap50']:.1f}  ({teacher['train_seconds']:.0f} s)")
    rows = [
        DemoRow("float teacher", "32/32/32", "-", teacher["ap"], teacher["ap50"], teacher["size_bytes"],
                teacher["train_seconds"], teacher["eval_batch_size"], str(packed_root / "float"))
    ]
    teacher_path = teacher["model_path"]

    # 3-5. quantized runs
    for bits in config.bits:
        jobs = []
        for distill in (False, True):
            name = f"w{bits}a{bits}" + ("_qdetr" if distill else "_lsq")
            run_cfg = demo_train_config(
                config,
                name,
                epochs=config.qat_epochs,
                optim={"lr": config.qat_lr, "lr_backbone": config.qat_lr},
                quant={"bits": bits, "float_checkpoint": teacher_path},
                distill={"enabled": distill, "weight": config.distill_weight},
            )
            meta = {"name": f"demo-{name}", "bits": f"w{bits}a{bits}attn8", "distillation": distill}
            jobs.append((run_cfg.to_dict(), str(packed_root / name), meta, config.num_threads, echo is not None))
        say(f"[demo] quantization-aware training at {bits} bits, LSQ baseline and Q-DETR distillation ...")
        if config.parallel:
            with mp.get_context("spawn").Pool(len(jobs)) as pool:
                results = pool.map(_train_and_pack, jobs)
        else:
            results = [_train_and_pack(job) for job in jobs]
        for (job_cfg, packed_dir, meta, *_), res in zip(jobs, results):
            distill = meta["distillation"]
            say(
                f"[demo]   {bits}-bit {'Q-DETR (DA + FQM distillation)' if distill else 'LSQ baseline'}: "
                f"AP {100 * res['ap']:.1f}  AP50 {100 * res['ap50']:.1f}  ({res['train_seconds']:.0f} s)"
            )
            rows.append(
                DemoRow(
                    f"{bits}-bit " + ("Q-DETR" if distill else "LSQ"),
                    f"{bits}/{bits}/8",
                    "DA + FQM" if distill else "none",
                    res["ap"],
                    res["ap50"],
                    res["size_bytes"],
                    res["train_seconds"],
                    res["eval_batch_size"],
                    packed_dir,
                )
            )

    # 6. picture
    val_images = sorted((out / "data" / "val" / "images").iterdir())[: config.predict_images]
    picture_models = [("float", teacher_path)]
    for bits in config.bits:
        picture_models.append((f"{bits}-bit Q-DETR", str(out / "runs" / f"w{bits}a{bits}_qdetr")))
    picture = _prediction_picture(picture_models, val_images, out / "predictions.png")

    # 7. table
    table = format_table(rows)
    elapsed = time.time() - start
    from qdetr.atomic_write import atomic_path

    table_text = (
        "# qdetr demo: synthetic shapes, "
        f"{config.model} at {config.image_size} px\n\n{table}\n\n"
        f"COCO AP (pycocotools, IoU .50:.95) on {config.val_images} synthetic validation images, eval batch size 1. "
        "Packed size: `model.safetensors` written by `save_pretrained` (integer codes bit-packed). "
        f"Total run time {elapsed:.0f} s.\n"
    )
    results = {"config": dataclasses.asdict(config), "rows": [dataclasses.asdict(r) for r in rows], "seconds": elapsed}
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table_text)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    say("")
    say(table)
    say("")
    say(f"[demo] picture: {picture}")
    say(f"[demo] table: {out / 'table.md'} and {out / 'results.json'}; packed models in {packed_root}")
    say(f"[demo] done in {elapsed:.0f} s")
    return rows

