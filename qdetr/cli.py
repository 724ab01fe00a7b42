"""The ``qdetr`` command line: ``train``, ``eval``, ``predict``, ``export``, ``demo`` (and the zoo commands).

Examples::

    qdetr demo --out outputs/demo
    qdetr train configs/w4_distill.yaml --set optim.lr=2e-4
    torchrun --nproc_per_node=2 -m qdetr train run.yaml
    qdetr train --output-dir runs/float
    qdetr train --output-dir runs/w4 --bits 4 --distill --float-checkpoint runs/float
    qdetr eval runs/w4 --images coco/val2017 --ann coco/annotations/instances_val2017.json
    qdetr predict runs/w4 img1.jpg img2.jpg --out predictions/
    qdetr export runs/w4 model.onnx
    qdetr predict model.onnx img1.jpg --out predictions-ort/ --backend onnxruntime

Every argument that names a model (``--float-checkpoint``, ``--teacher``, ``eval MODEL``,
``predict MODEL``, ``export MODEL``) accepts a run folder, a ``save_pretrained`` folder, a model or checkpoint
file, a release ``.pth``, a zoo name or a Hub id (:func:`qdetr.zoo.resolve_model`).

argparse lives only here; the library takes dataclass configs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


_MODEL_HELP = "a run folder, save_pretrained folder, model/checkpoint file, release .pth, zoo name or Hub id"


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a float, quantized (QAT) or distilled model",
        description="Train from a YAML/JSON TrainConfig file and/or flags. Flags override the file; "
        "--set section.key=value overrides anything (e.g. --set optim.lr=2e-4). "
        "Run under torchrun for several processes.",
    )
    p.add_argument("config", nargs="?", help="YAML or JSON TrainConfig file (optional)")
    p.add_argument("--output-dir", help="run folder (checkpoints, logs, curves)")
    p.add_argument("--model", help="registry name, e.g. detr_tiny, smca_detr_r50")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--bits", type=int, help="quantize to this bit width (QAT); omit for float")
    p.add_argument("--float-checkpoint", help="float weights to start QAT from (a float run folder, ...)")
    p.add_argument("--distill", action="store_true", help="add Q-DETR distillation (needs a teacher)")
    p.add_argument("--teacher", help="teacher float weights (default: --float-checkpoint)")
    p.add_argument("--two-stage", type=int, metavar="STAGE1_EPOCHS", help="paper's two-stage recipe")
    p.add_argument("--train-images", help="COCO-format training image folder (switches data to coco)")
    p.add_argument("--train-ann", help="COCO-format training annotations")
    p.add_argument("--val-images", help="COCO-format validation image folder")
    p.add_argument("--val-ann", help="COCO-format validation annotations")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="COCO box AP of a model with pycocotools")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--eval-size", type=int, help="short side (default: the model's)")
    p.add_argument("--max-size", type=int, help="long side cap (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="evaluation batch size (recorded; default 1)")
    p.add_argument("--per-class", action="store_true", help="also report AP per category")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--missing-images", choices=("error", "skip"), default="error")
    p.add_argument("--out", help="write the result JSON here (and detections next to it)")
    p.add_argument("--device", default="cpu")


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="draw detections on images and write JSON")
    p.add_argument("model", help=_MODEL_HELP + "; with --backend onnxruntime, an exported .onnx file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder (<image stem>.pred.png per image + predictions.json)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run (never an input image)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="onnxruntime: MODEL is an exported .onnx file, run on CPU (qdetr export)")


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job on the embedded synthetic set (float teacher, 4/2-bit QAT with and without "
        "distillation, evaluation, packed models, predictions, table)",
    )
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; AP stays low)")
    p.add_argument("--seed", type=int, default=0)


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as ONNX (quantized models as QDQ ONNX for integer kernels)",
        description="MODEL is anything qdetr.zoo.resolve_model accepts (a run folder, a save_pretrained "
        "folder, a model or checkpoint file, a release .pth, a zoo name or a Hub id). "
        "Inputs pixel_values/pixel_mask, outputs pred_logits/pred_boxes.",
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..21 (default 18)")
    p.add_argument("--target", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="tensorrt: int8 activations with zero points 0 (needs a symmetric deploy model)")
    p.add_argument("--static", type=int, nargs=2, metavar=("H", "W"),
                   help="fix batch 1 and this image size instead of dynamic shapes")


def build_parser() -> argparse.ArgumentParser:
    """The ``qdetr`` argument parser."""
    parser = argparse.ArgumentParser(prog="qdetr", description="Low-bit quantized DETR: train, evaluate, predict.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_predict(subparsers)
    _add_demo(subparsers)
    _add_export(subparsers)
    try:
        from qdetr.zoo.commands import add_zoo_commands
    except ImportError:
        pass
    else:
        add_zoo_commands(subparsers)
    return parser


def _train_config_from_args(args):
    from qdetr.engine.config import TrainConfig

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    flags: dict = {}
    simple = {
        "output_dir": args.output_dir,
        "model.name": args.model,
        "epochs": args.epochs,
        "data.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "quant.bits": args.bits,
        "quant.float_checkpoint": args.float_checkpoint,
        "distill.teacher_checkpoint": args.teacher,
        "device": args.device,
        "data.train_images": args.train_images,
        "data.train_ann": args.train_ann,
        "data.val_images": args.val_images,
        "data.val_ann": args.val_ann,
    }
    flags.update({k: v for k, v in simple.items() if v is not None})
    if args.train_images or args.train_ann:
        flags["data.dataset"] = "coco"
    if args.distill:
        flags["distill.enabled"] = True
    if args.two_stage:
        flags.update({"quant.two_stage": True, "quant.stage1_epochs": args.two_stage})
    if args.no_resume:
        flags["resume"] = False
    if flags:
        config = config.with_overrides(flags)
    if args.overrides:
        config = config.with_overrides(args.overrides)
    return config


def _cmd_train(args) -> int:
    from qdetr.engine.trainer import Trainer

    config = _train_config_from_args(args)
    result = Trainer(config).fit()
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished: {result.global_step} steps, {result.epochs_done} epochs, {result.train_seconds:.0f} s")
        if result.eval is not None:
            print(result.eval.summary)
            print(f"AP {result.eval.ap:.4f}  AP50 {result.eval.ap50:.4f}  (eval batch size {result.eval.eval_batch_size})")
        print(f"model: {result.model_path}")
    return 0


def _cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from qdetr.data import CocoDetectionDataset, TransformConfig, collate_detection, make_eval_transforms
    from qdetr.engine.evaluate import evaluate_coco
    from qdetr.engine.predict import load_model_for_inference

    loaded = load_model_for_inference(args.model)
    pre = loaded.preprocessing
    eval_size = args.eval_size or pre.shortest_edge
    max_size = args.max_size if args.max_size is not None else pre.longest_edge
    if max_size is not None and max_size <= eval_size:
        max_size = None
    transforms = TransformConfig(
        train_scales=(eval_size,), eval_size=eval_size, max_size=max_size, mean=pre.image_mean, std=pre.image_std
    )
    dataset = CocoDetectionDataset(
        args.images, args.ann, make_eval_transforms(transforms), missing_images=args.missing_images
    )
    if args.max_images:
        dataset.ids = dataset.ids[: args.max_images]
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    detections = Path(args.out).with_suffix(".detections.json") if args.out else None
    result = evaluate_coco(
        loaded.model, loader, dataset.coco, device=args.device, per_class=args.per_class, detections_path=detections
    )
    print(result.summary)
    print(f"AP {result.ap:.4f}  AP50 {result.ap50:.4f}  images {result.num_images}  eval batch size {result.eval_batch_size}")
    if result.per_class_ap:
        for cat_id, ap in sorted(result.per_class_ap.items()):
            print(f"  {cat_id:>4} {dataset.category_names.get(cat_id, '?'):<20} AP {ap:.4f}")
    if args.out:
        from qdetr.atomic_write import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2))
    return 0


def _cmd_predict(args) -> int:
    from qdetr.engine.predict import load_model_for_inference, predict_images

    loaded = load_model_for_inference(args.model, backend=args.backend)
    records = predict_images(
        loaded, args.images, args.out, threshold=args.threshold, device=args.device, overwrite=args.overwrite
    )
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
    print(f"wrote {Path(args.out) / 'predictions.json'}")
    return 0


def _cmd_demo(args) -> int:
    from qdetr.demo import DemoConfig, run_demo

    config = DemoConfig.quick(out_dir=args.out, seed=args.seed) if args.quick else DemoConfig(out_dir=args.out, seed=args.seed)
    run_demo(config, echo=print)
    return 0


def _cmd_export(args) -> int:
    from qdetr.export import export_onnx
    from qdetr.zoo import resolve_model

    model = resolve_model(args.model)
    options = {"opset": args.opset, "target": args.target}
    if args.static:
        options.update(dynamic=False, example_size=tuple(args.static))
    path = export_onnx(model, args.out, metadata={"qdetr.model_name": str(args.model)}, **options)
    print(f"wrote {path}")
    return 0


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "demo": _cmd_demo, "export": _cmd_export}


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a bad input (file, format, value, image, unpickling, offline), not a bug."""
    import pickle

    from qdetr.errors import QdetrError

    types: list[type[BaseException]] = [QdetrError, OSError, ValueError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    try:
        from yaml import YAMLError

        types.append(YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        pass
    return tuple(types)


def _add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after any (sub)command too, without overriding one given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("-v" in a.option_strings for a in sub._actions):
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log INFO messages and show tracebacks of errors")
                _add_verbose_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qdetr`` console script and ``python -m qdetr``.

    A user error of any subcommand (a missing or damaged file, a bad value, an unreadable
    image, an unsafe pickle, offline mode) prints one line ``qdetr <command>: error: ...`` on
    stderr and returns 2; with ``-v`` the traceback is printed too. Bugs still raise.

    Examples:
        >>> import contextlib, io
        >>> stderr = io.StringIO()
        >>> with contextlib.redirect_stderr(stderr):
        ...     code = main(["predict", "missing-model-dir", "missing.jpg", "--out", "out"])
        >>> code, stderr.getvalue().startswith("qdetr predict: error:"), "Traceback" in stderr.getvalue()
        (2, True, False)
    """
    parser = build_parser()
    _add_verbose_everywhere(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler = _COMMANDS.get(args.command) or getattr(args, "func", None)  # zoo/export commands set func
    if handler is None:
        parser.error(f"unknown command {args.command!r}")
    command = " ".join(str(part) for part in (args.command, getattr(args, "zoo_command", None)) if part)
    try:
        return int(handler(args) or 0)
    except _user_error_types() as error:
        if args.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"qdetr {command}: error: {message}" + ("" if args.verbose else " (run with -v for the traceback)"),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
