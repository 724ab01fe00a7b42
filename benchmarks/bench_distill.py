"""Distillation overhead per training step, relative to the float student and to plain QAT.

For each model it times, on one CPU thread (process CPU time), ``--repeats`` interleaved
rounds (the order flipped every round) of

* ``float``:    the float student's forward + detection loss + backward;
* ``qat``:      the quantized student's forward + detection loss + backward (plain QAT);
* ``+teacher``: the same + the frozen teacher's forward (one pass, no grad);
* ``+distill``: the same + ``DistillationLoss`` (foreground selection, teacher matching and
  the DRD term, whose backward is part of the step's backward);

and prints, as medians and ranges of per-round ratios, ``+distill / float`` (the full Q-DETR
step against the float student step), ``qat / float`` and ``+distill / +teacher`` (the loss's
own overhead), plus the ``DistillationLoss`` forward alone and its share of a step.

Models: qdetr's DETR and SMCA-DETR with the paper-size transformer (d=256, 8 heads, 6+6
layers, FFN 2048, 100 / 300 queries) on a test-sized ResNet backbone, the student quantized
to 4 bits with distribution alignment on the cross-attention query; if ``qdetr.models`` is not
importable, Hugging Face DETR with the same transformer sizes.

Run (a few minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distill.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qdetr.distill import DistillationLoss, FrozenTeacher, capture_co_attention, insert_distribution_alignment


def _targets(pred_boxes: torch.Tensor, per_image: int, generator: torch.Generator) -> list[dict]:
    targets = []
    for b in range(pred_boxes.shape[0]):
        idx = torch.randperm(pred_boxes.shape[1], generator=generator)[:per_image]
        boxes = (pred_boxes[b, idx].detach() + 0.05 * torch.randn(per_image, 4, generator=generator)).clamp(0.05, 0.95)
        labels = torch.ones(per_image, dtype=torch.int64)
        targets.append({"labels": labels, "class_labels": labels, "boxes": boxes})  # qdetr and HF spellings
    return targets


def _qdetr_setup(name: str, bits: int):
    from qdetr.models import build_criterion, create_model
    from qdetr.quant import quantize_model

    sizes = dict(
        backbone="resnet_tiny",
        num_classes=91,
        num_queries=100 if name.startswith("detr") else 300,
        hidden_dim=256,
        nheads=8,
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=2048,
    )
    torch.manual_seed(0)
    float_student = create_model(name, **sizes).train()
    torch.manual_seed(0)
    student = create_model(name, **sizes)
    quantize_model(student, bits=bits)
    insert_distribution_alignment(student, where="cross")
    torch.manual_seed(1)
    teacher = FrozenTeacher(create_model(name, **sizes))
    criterion = build_criterion(student.config)

    def step_of(model):
        def run(x, targets):
            outputs = model(x)
            losses = criterion(outputs, targets)
            return outputs, criterion.total_loss(losses)

        return run

    return student, teacher, step_of(student), (lambda x: teacher(x)), float_student, step_of(float_student)


def _hf_setup(kind: str, bits: int):
    import transformers

    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck",
        out_features=["stage4"],
    )
    num_queries = 100 if kind == "detr" else 300
    cls = transformers.DetrForObjectDetection if kind == "detr" else transformers.ConditionalDetrForObjectDetection
    config_cls = transformers.DetrConfig if kind == "detr" else transformers.ConditionalDetrConfig
    config = config_cls(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        num_queries=num_queries, num_labels=91,
    )
    torch.manual_seed(0)
    student = cls(config)
    try:
        from qdetr.quant import quantize_model

        quantize_model(student, bits=bits)
        insert_distribution_alignment(student, where="cross")
    except (ImportError, NotImplementedError) as err:
        print(f"hf {kind}: student stays in float ({type(err).__name__}: {str(err)[:80]}...)")
    torch.manual_seed(1)
    teacher = FrozenTeacher(cls(config))
    torch.manual_seed(0)
    float_student = cls(config).train()

    def step_of(model):
        def run(x, targets):
            with capture_co_attention(model) as capture:
                out = model(pixel_values=x, labels=targets)
            return capture.outputs(out), out.loss

        return run

    return student, teacher, step_of(student), (lambda x: teacher(pixel_values=x)), float_student, step_of(float_student)


def bench(label: str, setup, args) -> dict:
    student, teacher, student_step, teacher_forward, float_student, float_step = setup
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    distill = DistillationLoss()
    student.train()
    with torch.no_grad():
        outputs, _ = student_step(x, _targets(torch.rand(args.batch_size, 10, 4), 1, g))  # calibrates quantizers
    targets = _targets(outputs["pred_boxes"], args.gt_per_image, g)

    def step(mode: str) -> float:
        model = float_student if mode == "float" else student
        model.zero_grad(set_to_none=True)
        start = time.process_time()
        outputs, loss = (float_step if mode == "float" else student_step)(x, targets)
        if mode in ("teacher", "distill"):
            t_out = teacher_forward(x)
        if mode == "distill":
            loss = loss + distill(outputs, t_out, targets)["loss_drd"]
        loss.backward()
        return time.process_time() - start

    def loss_only(outputs, t_out) -> float:
        start = time.process_time()
        distill(outputs, t_out, targets)
        return time.process_time() - start

    modes = ("float", "qat", "teacher", "distill")
    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times = {mode: [] for mode in modes}
    for i in range(args.repeats):  # interleaved (order flipped every round), so drift hits all modes alike
        for mode in modes if i % 2 == 0 else modes[::-1]:
            times[mode].append(step(mode))
    with torch.no_grad():
        outputs, _ = student_step(x, targets)
        t_out = teacher_forward(x)
        loss_times = [loss_only(outputs, t_out) for _ in range(args.repeats)]
        stats = distill(outputs, t_out, targets)
    med = {mode: statistics.median(v) for mode, v in times.items()}

    def ratio(num: str, den: str) -> tuple[float, float, float]:
        r = [a / b for a, b in zip(times[num], times[den])]
        return statistics.median(r), min(r), max(r)

    full, qat, own = ratio("distill", "float"), ratio("qat", "float"), ratio("distill", "teacher")
    loss_fwd = statistics.median(loss_times)
    num_queries = outputs["pred_boxes"].shape[1]
    print(
        f"{label:<14} Q={num_queries:<4} float {med['float'] * 1e3:7.1f} ms | qat {med['qat'] * 1e3:7.1f} ms | "
        f"+teacher {med['teacher'] * 1e3:7.1f} ms | +distill {med['distill'] * 1e3:7.1f} ms"
    )
    print(
        f"{'':<14} full Q-DETR step / float student step {full[0]:.3f}x (range {full[1]:.3f}-{full[2]:.3f}) | "
        f"qat / float {qat[0]:.3f}x (range {qat[1]:.3f}-{qat[2]:.3f}) | distill / teacher {own[0]:.3f}x | "
        f"loss fwd {loss_fwd * 1e3:6.2f} ms = {loss_fwd / med['teacher'] * 100:.2f}% of a +teacher step "
        f"({int(stats['num_distilled'])} pairs)"
    )
    return {"label": label, "full_over_float": full, "qat_over_float": qat, "distill_over_teacher": own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--gt-per-image", type=int, default=7, help="COCO averages about 7 objects per image")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--hf", action="store_true", help="use Hugging Face DETR / ConditionalDETR even if qdetr.models exists"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, batch {args.batch_size}, {args.image_size}x{args.image_size} px, "
        f"{args.gt_per_image} GT/image, median of {args.repeats}"
    )
    use_qdetr = not args.hf
    if use_qdetr:
        try:
            import qdetr.models  # noqa: F401
        except ImportError:
            use_qdetr = False
    if use_qdetr:
        for name in ("detr_tiny", "smca_detr_tiny"):
            label = name.replace("_tiny", "") + f" w{args.bits}"
            bench(label, _qdetr_setup(name, args.bits), args)
    else:
        for kind in ("detr", "conditional_detr"):
            bench(f"hf {kind}", _hf_setup(kind, args.bits), args)


if __name__ == "__main__":
    main()
