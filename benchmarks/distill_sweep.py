"""Where does Q-DETR distillation's gain go at 2 bits? A bounded sweep on the synthetic shapes set.

One float teacher (the demo / ``method_table.py`` recipe, seed 0) is trained once, or reused
with ``--teacher``; every variant below is a 2-bit QAT run from it with the same recipe as
``method_table.py``'s quantized runs (12 epochs, lr 2e-4) and only the training seed varies
(``--seeds``; the synthetic data set is always seed 0's, the teacher's).

==========================  ===========================================================
variant                     what changes
==========================  ===========================================================
baseline                    LSQ QAT, detection loss only
DA                          + distribution alignment on the co-attention query
FQM w=1 (no DA)             DRD/FQM only, lambda 1 (the method table's "+ matching")
DA+FQM w=<lambda>           DA + DRD/FQM with lambda in {0.1, 0.3, 1, 3}
DA+FQM w=1 all layers       DRD on every decoder layer (mean over layers)
DA+FQM w=1 tau=0            tau 0: every query whose GIoU with some GT is > 0
DA+FQM w=1 std. features    DRD on per-query standardised features (scale-free distance)
==========================  ===========================================================

Besides AP/AP50 each run reports, on the validation images, the mean L2 distance and the
cosine similarity between the student's and the teacher's last-layer co-attended features
``Â·V̂`` over the FQM-matched pairs (tau 0.5), to check whether distillation actually moves the
student's features towards the teacher's, and the last training ``loss_drd``.

Usage::

    python benchmarks/distill_sweep.py --seeds 0 1 2 --out outputs/distill_sweep
    python benchmarks/distill_sweep.py --teacher outputs/method_table/seed0/runs/float ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qdetr.demo import DemoConfig, demo_train_config
from qdetr.distill import DistillationLoss
from qdetr.engine.trainer import Trainer

__all__ = ["VARIANTS", "main"]

#: name -> (alignment, distill enabled, weight, tau, layers, standardise features)
VARIANTS: dict[str, tuple[bool, bool, float, float, tuple[int, ...], bool]] = {
    "baseline": (False, False, 0.0, 0.5, (-1,), False),
    "DA": (True, False, 0.0, 0.5, (-1,), False),
    "FQM w=1 (no DA)": (False, True, 1.0, 0.5, (-1,), False),
    "DA+FQM w=0.1": (True, True, 0.1, 0.5, (-1,), False),
    "DA+FQM w=0.3": (True, True, 0.3, 0.5, (-1,), False),
    "DA+FQM w=1": (True, True, 1.0, 0.5, (-1,), False),
    "DA+FQM w=3": (True, True, 3.0, 0.5, (-1,), False),
    "DA+FQM w=1 all layers": (True, True, 1.0, 0.5, (0, 1), False),
    "DA+FQM w=1 tau=0": (True, True, 1.0, 0.0, (-1,), False),
    "DA+FQM w=1 std. features": (True, True, 1.0, 0.5, (-1,), True),
}


def _standardised(outputs: dict) -> dict:
    feats = outputs["co_attn_features"]  # (L, B, Q, d)
    return {**outputs, "co_attn_features": F.layer_norm(feats, feats.shape[-1:])}


class _StandardisedDistillationLoss(DistillationLoss):
    """DRD on per-query standardised features: removes the scale part of the distance."""

    def forward(self, student_outputs, teacher_outputs, targets):
        return super().forward(_standardised(student_outputs), _standardised(teacher_outputs), targets)


class _SweepTrainer(Trainer):
    """The library trainer with the distillation loss's layers / feature transform swapped in."""

    def __init__(self, config, layers: tuple[int, ...], standardise: bool) -> None:
        super().__init__(config)
        self._layers, self._standardise = layers, standardise

    def _train_step(self, batch, use_amp):
        if self.distill_loss is not None and not getattr(self, "_swapped", False):
            cls = _StandardisedDistillationLoss if self._standardise else DistillationLoss
            self.distill_loss = cls(tau=self.config.distill.loss.tau, weight=self.config.distill.loss.weight, layers=self._layers)
            self._swapped = True
        return super()._train_step(batch, use_amp)


@torch.no_grad()
def _feature_gap(trainer: Trainer, teacher_path: str) -> dict:
    """Student-teacher distance of last-layer co-attended features over FQM-matched val pairs."""
    from qdetr.data import collate_detection
    from qdetr.distill import FrozenTeacher
    from qdetr.distill.fqm import match_teacher_queries, select_foreground_queries, stack_target_boxes
    from qdetr.models import create_model
    from qdetr.zoo import resolve_state_dict
    from qdetr.zoo.run_files import load_state_dict_checked

    cfg = trainer.config
    teacher = create_model(cfg.model.name, num_classes=trainer.num_classes, **cfg.model.overrides)
    load_state_dict_checked(teacher, resolve_state_dict(teacher_path), source=teacher_path)
    teacher = FrozenTeacher(teacher)
    student = trainer.model.eval()
    dist, cos, norm_s, norm_t, pairs = 0.0, 0.0, 0.0, 0.0, 0
    ds = trainer.val_ds
    for start in range(0, len(ds), 16):
        batch = collate_detection([ds[i] for i in range(start, min(len(ds), start + 16))])
        out = student(batch.pixel_values, batch.pixel_mask)
        tout = teacher(batch.pixel_values, batch.pixel_mask)
        gt, valid = stack_target_boxes(batch.targets)
        fg = select_foreground_queries(out["pred_boxes"], gt, valid, 0.5)
        index, matched = match_teacher_queries(out["pred_boxes"], tout["pred_boxes"], fg)
        s = out["co_attn_features"][-1]  # (B, Q, d)
        t = torch.gather(tout["co_attn_features"][-1], 1, index[..., None].expand_as(s))
        dist += (s - t).norm(dim=-1)[matched].sum().item()
        cos += F.cosine_similarity(s, t, dim=-1)[matched].sum().item()
        norm_s += s.norm(dim=-1)[matched].sum().item()
        norm_t += t.norm(dim=-1)[matched].sum().item()
        pairs += int(matched.sum())
    n = max(1, pairs)
    return {"feat_dist": dist / n, "feat_cos": cos / n, "norm_s": norm_s / n, "norm_t": norm_t / n}


def _run(job: dict) -> dict:
    torch.set_num_threads(1)
    from qdetr.engine.config import TrainConfig

    config = TrainConfig.from_dict(job["config"])
    if job["variant"] is None:
        trainer = Trainer(config)
    else:
        _, _, _, _, layers, standardise = VARIANTS[job["variant"]]
        trainer = _SweepTrainer(config, layers, standardise)
    result = trainer.fit()
    out = {"ap": result.eval.ap, "ap50": result.eval.ap50, "seconds": result.train_seconds,
           "model_path": str(result.model_path), "loss_drd_last": result.losses.get("loss_drd"),
           "frac_distilled_last": result.losses.get("frac_distilled")}
    if job["variant"] is not None:
        out.update(_feature_gap(trainer, job["teacher"]))
    return out


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the QAT runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--qat-epochs", type=int, default=DemoConfig().qat_epochs)
    parser.add_argument("--teacher", default=None,
                        help="a float run folder (or model file) trained with the demo recipe, seed 0 (default: train one)")
    parser.add_argument("--processes", type=int, default=2, help="runs trained in parallel (1 thread each)")
    parser.add_argument("--out", default="outputs/distill_sweep")
    args = parser.parse_args(argv)

    start = time.time()
    demo = dataclasses.replace(DemoConfig(), out_dir=args.out, seed=0, qat_epochs=args.qat_epochs)
    teacher_path = args.teacher
    if teacher_path is None:
        teacher_cfg = demo_train_config(
            demo, "float", epochs=demo.teacher_epochs,
            optim={"lr": demo.teacher_lr, "lr_backbone": demo.teacher_lr, "lr_drop": max(1, int(demo.teacher_epochs * 0.8))},
        )
        teacher = _run({"config": teacher_cfg.to_dict(), "variant": None})
        teacher_path = teacher["model_path"]
        print(f"float teacher: AP {100 * teacher['ap']:.1f} AP50 {100 * teacher['ap50']:.1f}", flush=True)

    jobs = []
    for seed in args.seeds:
        for name in args.variants:
            align, distill, weight, tau, _, _ = VARIANTS[name]
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            cfg = demo_train_config(
                demo, f"w{args.bits}_{slug}_s{seed}", seed=seed, epochs=demo.qat_epochs,
                optim={"lr": demo.qat_lr, "lr_backbone": demo.qat_lr},
                quant={"bits": args.bits, "float_checkpoint": teacher_path},
                distill={"enabled": distill, "alignment": align, "weight": weight if distill else 1.0, "tau": tau},
            )
            jobs.append({"config": cfg.to_dict(), "variant": name, "teacher": teacher_path, "seed": seed})
    results: dict[str, list[dict]] = {}
    with mp.get_context("spawn").Pool(args.processes) as pool:
        for job, result in zip(jobs, pool.imap(_run, jobs)):
            results.setdefault(job["variant"], []).append(result)
            print(f"seed {job['seed']} {job['variant']}: AP {100 * result['ap']:.1f} AP50 {100 * result['ap50']:.1f} "
                  f"feat dist {result['feat_dist']:.2f} cos {result['feat_cos']:.2f}", flush=True)

    lines = [
        f"| {args.bits}-bit variant | AP | AP50 | feature distance | feature cosine | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.variants:
        runs = results[name]
        lines.append(
            f"| {name} | {_mean_sd([r['ap'] for r in runs])} | {_mean_sd([r['ap50'] for r in runs])} | "
            f"{_mean_sd([r['feat_dist'] for r in runs], 1.0, 2)} | {_mean_sd([r['feat_cos'] for r in runs], 1.0, 2)} | "
            f"{len(runs)} |"
        )
    elapsed = time.time() - start
    table = "\n".join(lines)
    print(table)
    print(f"{elapsed:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/distill_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "distill_sweep.json").write_text(json.dumps(
        {"command": command, "seconds": elapsed, "teacher": teacher_path, "table": table, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
