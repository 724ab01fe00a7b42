"""Distillation overhead on a Hugging Face RT-DETR-R18-sized model (built from a config, no download).

On one CPU thread it times, interleaved (so drift hits every mode alike), the median over
``--repeats`` training steps of the 4-bit student (distribution alignment in its decoder
self-attention), each step being forward + backward + AdamW:

* ``qat``:      the student's step with the model's own loss (plain QAT);
* ``+teacher``: the same + the frozen float teacher's forward (eval, no grad, hooks capturing
  its co-attended features);
* ``+distill``: the same + the student's capture hooks and ``DistillationLoss`` (foreground
  selection, box-based teacher matching, DRD), whose backward is part of the step's backward;

and prints ``+distill / +teacher`` (the distillation's own overhead; target <= 1.15x) and
``+distill / qat``, plus the ``DistillationLoss`` forward alone.

Model and batch: ``build_rt_detr_r18`` of ``benchmarks/bench_hf_family_qat.py``, so that both
benchmarks time the same model: RT-DETR with a ResNet-18-sized backbone (``RTDetrResNetConfig``
basic blocks, depths [2, 2, 2, 2], widths [64, 128, 256, 512]), d_model 256, 6 decoder layers,
300 queries, ``num_denoising=100`` (192 denoising queries for these boxes), 640 x 640 px,
batch 2 with 6 and 4 objects. The 192 denoising queries are in the student's decoder and never
distilled; the teacher (eval, no labels) has none.

Run (a few minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_hf_family_distill.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_hf_family_distill.py --quick   # 256 px, 2 repeats
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from qdetr.distill import DistillationLoss, FrozenTeacher, capture_co_attention, insert_distribution_alignment
from qdetr.quant import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf_family_qat import build_rt_detr_r18  # noqa: E402  (the QAT benchmark's model and batch)

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="256 px, 2 repeats, no warm-up: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.repeats, args.warmup = 256, 2, 0
    torch.set_num_threads(1)

    float_model, x, labels = build_rt_detr_r18(seed=0, size=args.image_size)
    teacher = FrozenTeacher(copy.deepcopy(float_model))
    student = quantize_model(float_model, bits=args.bits)
    insert_distribution_alignment(student, where="self")
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    distill = DistillationLoss()

    student(pixel_values=x, labels=labels)  # first training forward calibrates the quantizers

    def step(mode: str) -> float:
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if mode == "distill":
            with capture_co_attention(student) as capture:
                out = student(pixel_values=x, labels=labels)
            outputs = capture.outputs(out)
        else:
            out = student(pixel_values=x, labels=labels)
        loss = out.loss
        if mode != "qat":
            teacher_outputs = teacher(pixel_values=x)
        if mode == "distill":
            loss = loss + distill(outputs, teacher_outputs, labels)["loss_drd"]
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    modes = ("qat", "teacher", "distill")
    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step(mode))

    with torch.no_grad(), capture_co_attention(student) as capture:
        outputs = capture.outputs(student(pixel_values=x, labels=labels))
    teacher_outputs = teacher(pixel_values=x)
    loss_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        stats = distill(outputs, teacher_outputs, labels)
        loss_times.append(time.perf_counter() - start)

    med = {mode: statistics.median(v) for mode, v in times.items()}
    loss_fwd = statistics.median(loss_times)
    print(
        f"torch {torch.__version__}, 1 thread, RT-DETR-R18-sized (d=256, 6 decoder layers, 300 queries), "
        f"W{args.bits}, batch {x.shape[0]}, {args.image_size}x{args.image_size} px, "
        f"{[len(t['boxes']) for t in labels]} objects, median of {args.repeats} interleaved steps"
    )
    print(
        f"qat {med['qat']:.3f} s | +teacher {med['teacher']:.3f} s | +distill {med['distill']:.3f} s | "
        f"distill/teacher {med['distill'] / med['teacher']:.3f}x (target <= 1.15x) | "
        f"distill/qat {med['distill'] / med['qat']:.3f}x | DistillationLoss forward {loss_fwd * 1e3:.1f} ms "
        f"({int(stats['num_distilled'])} pairs of {outputs['pred_boxes'].shape[1]} queries x {x.shape[0]})"
    )


if __name__ == "__main__":
    main()
