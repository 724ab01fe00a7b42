"""The trainer: float training, quantization-aware training and Q-DETR distillation.

One :class:`Trainer` covers the three jobs of method.md section 7:

(a) a float model (``quant.bits = None``);
(b) QAT at 2/3/4 bits from a float checkpoint: the float weights are loaded, the model is
    quantized with :func:`qdetr.quant.quantize_model` and activation quantizers are calibrated
    on the first training batch(es) (before DDP wraps the model, so rank 0's values are
    broadcast to every rank; the quantizers also all-reduce their statistics);
(c) (b) plus :class:`qdetr.distill.DistillationLoss` against a frozen float teacher, with
    distribution alignment on the student's co-attention query.

The paper's two-stage recipe (``quant.two_stage``) quantizes only the backbone for
``quant.stage1_epochs`` epochs, then rebuilds the model fully quantized, carries stage 1's
weights and quantizer states over, and calibrates the new quantizers.

Runs under ``torchrun`` use DistributedDataParallel (gloo on CPU, NCCL on CUDA), a
:class:`~qdetr.data.ResumableDistributedSampler` and distributed evaluation. Checkpoints are
atomic and exact: a run stopped after any step and resumed ends with the same weights as an
uninterrupted run (same device and thread count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from qdetr.data import (
    CocoDetectionDataset,
    ResumableDistributedSampler,
    collate_detection,
    make_eval_transforms,
    make_synthetic_coco,
    make_train_transforms,
)
from qdetr.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint_atomic
from qdetr.engine.config import TrainConfig
from qdetr.engine.resume_check import check_resume_config
from qdetr.errors import ResumeMismatchError
from qdetr.engine.distributed import DistributedContext, init_distributed
from qdetr.engine.evaluate import CocoEvalResult, evaluate_coco
from qdetr.zoo.resolve import resolve_state_dict
from qdetr.zoo.run_files import RUN_CHECKPOINT_NAME, RUN_MODEL_DIR, load_state_dict_checked
from qdetr.engine.optim import build_param_groups
from qdetr.engine.run_log import RunLog, plot_curves

__all__ = ["Trainer", "TrainResult", "build_datasets", "train"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = RUN_CHECKPOINT_NAME
#: The final model: a ``save_pretrained`` directory inside the run folder (see :mod:`qdetr.zoo.run_files`).
MODEL_DIR_NAME = RUN_MODEL_DIR


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        output_dir: the run folder.
        model_path: the final model, a ``save_pretrained`` directory (``<output_dir>/model``).
        global_step: optimisation steps done in total.
        epochs_done: completed epochs.
        eval: final COCO evaluation (None when skipped).
        train_seconds: wall time of this invocation.
        losses: the last logged loss values.

    Examples:
        >>> from pathlib import Path
        >>> from qdetr.engine import TrainResult
        >>> result = TrainResult(output_dir=Path("runs/fp"), model_path=Path("runs/fp/model"),
        ...                      global_step=100, epochs_done=1)
        >>> result.eval is None, result.losses
        (True, {})
    """

    output_dir: Path
    model_path: Path | None
    global_step: int
    epochs_done: int
    eval: CocoEvalResult | None = None
    train_seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _synthetic_split(root: Path, split: str, config: TrainConfig, num_images: int, first_index: int) -> Path:
    ann = root / split / "instances.json"
    if not ann.is_file():
        make_synthetic_coco(
            root / split,
            num_images,
            seed=config.data.synthetic_seed,
            config=config.data.synthetic,
            first_index=first_index,
        )
    return ann


def build_datasets(
    config: TrainConfig, ctx: DistributedContext | None = None
) -> tuple[CocoDetectionDataset, CocoDetectionDataset]:
    """The training and validation datasets of ``config`` (generating the synthetic set if needed).

    The synthetic set is written once by rank 0 to ``data.synthetic_root`` (default
    ``<output_dir>/data``) and reused when already there.

    Args:
        config: the run (only ``data`` and ``output_dir`` are used).
        ctx: the distributed context (None: a single process).

    Returns:
        ``(train, val)`` datasets with the train and eval transforms; items are
        ``(image (3, H, W) float32, target)`` with ``target["boxes"]`` (N, 4) normalised cxcywh.

    Examples:
        >>> import tempfile
        >>> from qdetr.engine import TrainConfig, build_datasets
        >>> data = {"synthetic_train_images": 2, "synthetic_val_images": 1, "synthetic": {"image_size": 64}}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     train_ds, val_ds = build_datasets(TrainConfig(output_dir=tmp, data=data))
        ...     image, target = val_ds[0]
        >>> len(train_ds), len(val_ds), image.shape[0], target["boxes"].shape[-1]
        (2, 1, 3, 4)
    """
    data = config.data
    if data.dataset == "synthetic":
        root = Path(data.synthetic_root or Path(config.output_dir) / "data")
        if ctx is None or ctx.is_main:
            _synthetic_split(root, "train", config, data.synthetic_train_images, 0)
            _synthetic_split(root, "val", config, data.synthetic_val_images, data.synthetic_train_images)
        if ctx is not None:
            ctx.barrier()
        train_paths = (root / "train" / "images", root / "train" / "instances.json")
        val_paths = (root / "val" / "images", root / "val" / "instances.json")
    else:
        train_paths = (data.train_images, data.train_ann)
        val_paths = (data.val_images, data.val_ann)
    train_ds = CocoDetectionDataset(
        *train_paths, make_train_transforms(data.transforms), missing_images=data.missing_images
    )
    val_ds = CocoDetectionDataset(*val_paths, make_eval_transforms(data.transforms), missing_images=data.missing_images)
    if data.max_train_images is not None:
        train_ds.ids = train_ds.ids[: data.max_train_images]
    if data.max_val_images is not None:
        val_ds.ids = val_ds.ids[: data.max_val_images]
    return train_ds, val_ds


class Trainer:
    """Runs one :class:`TrainConfig` to the end (or to ``max_steps``), resuming if possible.

    Args:
        config: the run.
        on_epoch_end: called on the main process after every finished epoch with
            ``{"epoch", "epochs", "step", "loss", "seconds"}`` (1-based epoch, last logged
            loss, seconds since :meth:`fit` started); the demo prints one line per epoch with
            it, which stays readable when stdout is not a terminal (unlike progress bars).

    Examples:
        >>> cfg = TrainConfig(output_dir="runs/fp", epochs=20)      # doctest: +SKIP
        >>> result = Trainer(cfg).fit()                             # doctest: +SKIP
        >>> result.eval.ap                                          # doctest: +SKIP

        A one-step run of a tiny model on 64 px synthetic images:

        >>> import tempfile
        >>> from qdetr.engine import TrainConfig, Trainer
        >>> tiny = {
        ...     "device": "cpu", "progress": False, "max_steps": 1,
        ...     "data": {"synthetic_train_images": 2, "synthetic_val_images": 2, "synthetic": {"image_size": 64},
        ...              "transforms": {"train_scales": [64], "max_size": 100, "eval_size": 64, "random_crop": False}},
        ...     "model": {"name": "detr_tiny", "overrides": {"hidden_dim": 32, "dim_feedforward": 64}},
        ... }
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = Trainer(TrainConfig.from_dict({**tiny, "output_dir": tmp})).fit()
        ...     files = sorted(p.name for p in result.output_dir.iterdir())
        >>> result.global_step, result.model_path.name, len(result.eval.stats)
        (1, 'model', 12)
        >>> {"checkpoint.pt", "config.json", "log.jsonl", "model"} <= set(files)
        True
    """

    def __init__(self, config: TrainConfig, on_epoch_end=None) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.on_epoch_end = on_epoch_end

    # ------------------------------------------------------------------ setup
    def _stage_for_epoch(self, epoch: int) -> int:
        quant = self.config.quant
        return 1 if quant.two_stage and epoch < quant.stage1_epochs else 2

    def _quant_config(self, stage: int):
        """The library ``QuantConfig`` of ``stage`` (None: float)."""
        return self.config.quant.for_stage(stage)

    def _float_model(self, spec) -> nn.Module:
        """The float detector of a ``ModelConfig`` for this run's ``num_classes``."""
        from qdetr.models import create_model

        return create_model(spec.name, num_classes=self.num_classes, **dict(spec.overrides))

    def _quantize(self, model: nn.Module, stage: int) -> nn.Module:
        """Quantize ``model`` for ``stage`` and place distribution alignment where the profile says."""
        quant = self._quant_config(stage)
        if quant is not None:
            from qdetr.quant import quantize_model

            quantize_model(model, config=quant)
        if self.config.distill.use_alignment and stage == 2:
            from qdetr.distill.alignment import insert_distribution_alignment

            insert_distribution_alignment(model, profile=quant.profile)
        return model

    def _build_student(self, stage: int) -> nn.Module:
        cfg = self.config
        model = self._float_model(cfg.model)
        self._unfreeze_backbone(model)
        if cfg.quant.bits is not None and cfg.quant.float_checkpoint:
            load_state_dict_checked(
                model, resolve_state_dict(cfg.quant.float_checkpoint), source=f"float checkpoint {cfg.quant.float_checkpoint}"
            )
        quant = self._quant_config(stage)
        self._quantize(model, stage)
        if quant is not None:
            self._select_quant_kernels(model)
        return model.to(self.ctx.device)

    def _select_quant_kernels(self, model: nn.Module) -> None:
        """Apply ``quant.kernels`` (process-wide, see :mod:`qdetr.quant.kernels`)."""
        from qdetr.quant.kernels import set_kernel_backend

        choice = self.config.quant.kernels
        if choice == "auto":
            big = sum(p.numel() for p in model.parameters()) >= self.config.quant.AUTO_COMPILED_MIN_PARAMS
            choice = "compiled" if big and torch.device(self.ctx.device).type == "cuda" else "native"
        set_kernel_backend(choice)

    def _unfreeze_backbone(self, model: nn.Module) -> None:
        if self.config.model.train_full_backbone and hasattr(model, "backbone"):
            for param in model.backbone.parameters():
                param.requires_grad_(True)

    def _build_teacher(self) -> nn.Module | None:
        cfg = self.config
        if not cfg.distill.enabled:
            return None
        from qdetr.distill import FrozenTeacher

        spec = cfg.distill.teacher_model or cfg.model
        teacher = self._float_model(spec)
        path = cfg.distill.teacher_checkpoint or cfg.quant.float_checkpoint
        load_state_dict_checked(teacher, resolve_state_dict(path), source=f"teacher checkpoint {path}")
        return FrozenTeacher(teacher.to(self.ctx.device))

    def _calibration_batches(self, epoch: int):
        """The first batches of ``epoch``'s data order (deterministic, consumes no global RNG)."""
        sampler = ResumableDistributedSampler(
            len(self.train_ds),
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=self.config.seed,
        )
        sampler.set_epoch(epoch)
        loader = DataLoader(
            self.train_ds,
            batch_size=self.config.data.batch_size,
            sampler=sampler,
            collate_fn=collate_detection,
            generator=torch.Generator().manual_seed(self.config.seed),  # leaves the global RNG alone
        )
        for i, batch in enumerate(loader):
            if i >= self.config.quant.calibration_batches:
                break
            yield batch.to(self.ctx.device)

    def _calibrate(self, model: nn.Module, epoch: int, recalibrate: bool = False) -> None:
        from qdetr.quant import calibrate

        was_training = model.training
        model.eval()  # no dropout while measuring ranges
        calibrate(
            model,
            self._calibration_batches(epoch),
            forward_fn=lambda m, b: m(b.pixel_values, b.pixel_mask),
            recalibrate=recalibrate,
        )
        model.train(was_training)

    def _make_optimizer(self, model: nn.Module, start_epoch: int = 0):
        """AdamW over :func:`build_param_groups` and a StepLR positioned at ``start_epoch``."""
        optim = self.config.optim
        optimizer = torch.optim.AdamW(build_param_groups(model, optim), lr=optim.lr, weight_decay=optim.weight_decay)
        step_size = optim.lr_drop if optim.lr_drop is not None else 10**9
        if start_epoch:
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"]
                group["lr"] = group["lr"] * optim.lr_gamma ** (start_epoch // step_size)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=step_size, gamma=optim.lr_gamma, last_epoch=start_epoch - 1
        )
        return optimizer, scheduler

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return model
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def _stage_transition(self, epoch: int) -> None:
        """Stage 1 -> 2: rebuild fully quantized, carry stage-1 state over, calibrate new quantizers."""
        old_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        model = self._float_model(self.config.model)
        self._unfreeze_backbone(model)
        self._quantize(model, 2)
        model = model.to(self.ctx.device)
        new_state = model.state_dict()
        unexpected = sorted(set(old_state) - set(new_state))
        if unexpected:
            raise RuntimeError(f"stage-1 state has keys the stage-2 model lacks: {unexpected[:5]}")
        new_state.update(old_state)
        model.load_state_dict(new_state, strict=True)
        self._calibrate(model, epoch)  # only quantizers not yet initialised
        self.model = model
        self.optimizer, self.scheduler = self._make_optimizer(model, start_epoch=epoch)
        self.ddp_model = self._wrap(model)
        self.stage = 2
        self.log.write("event", event="stage2", epoch=epoch)

    # ------------------------------------------------------------------ checkpoints
    def _check_resume(self, resume_state: dict | None, checkpoint_path: Path) -> list:
        """Refuse a resume that changes the run's settings (ResumeMismatchError); log and save harmless changes."""
        if resume_state is None:
            return []
        saved = resume_state.get("config")
        if saved is None:  # a checkpoint of an older qdetr: nothing to compare against
            if self.ctx.is_main:
                self.config.save(self.output_dir / "config.json")
            return []
        try:  # normalise configs recorded by older versions of TrainConfig
            saved = TrainConfig.from_dict(saved).to_dict()
        except (ValueError, TypeError, KeyError):
            pass
        changes = check_resume_config(
            saved, self.config.to_dict(), source=str(checkpoint_path),
            saved_train_images=resume_state.get("num_train_images"), current_train_images=len(self.train_ds),
        )
        for key, old, new in changes:
            logger.info("resuming %s with %s changed: %r -> %r", self.output_dir, key, old, new)
        if self.ctx.is_main:
            self.config.save(self.output_dir / "config.json")
        return changes

    def _save(self, epoch: int, batch_in_epoch: int, global_step: int) -> None:
        if not self.ctx.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "stage": self.stage,
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "num_train_images": len(self.train_ds),
            "model_spec": self._model_spec(),
        }
        save_checkpoint_atomic(state, self.output_dir / CHECKPOINT_NAME)

    def _preprocessing(self):
        """The inference preprocessing matching this run's evaluation transforms."""
        from qdetr.models.preprocessing import PreprocessingConfig

        transforms = self.config.data.transforms
        return PreprocessingConfig(
            shortest_edge=transforms.eval_size,
            longest_edge=transforms.max_size,
            image_mean=tuple(transforms.mean),
            image_std=tuple(transforms.std),
        )

    def _model_spec(self) -> dict:
        """The model's ``config.json`` dict (structure, labels, preprocessing), stored in checkpoints."""
        from qdetr.zoo.hub import model_config_dict

        return model_config_dict(
            self.model, id2label=self.train_ds.category_names, preprocessing=self._preprocessing(),
            provenance={"recipe": "qdetr train", "run": str(self.output_dir)},
        )

    def _save_model_file(self) -> Path | None:
        """Write the final model as a ``save_pretrained`` directory, ``<output_dir>/model``."""
        if not self.ctx.is_main:
            return None
        from qdetr.zoo.hub import save_pretrained

        spec = self._model_spec()
        return save_pretrained(
            self.model, self.output_dir / MODEL_DIR_NAME, id2label=self.train_ds.category_names,
            provenance=spec["provenance"], preprocessing=self._preprocessing(),
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, epoch: int) -> CocoEvalResult:
        """COCO evaluation of the current model on the validation set (all ranks take part).

        Needs the state set up by :meth:`fit` (model, datasets, distributed context, log).

        Args:
            epoch: epoch number recorded in the log.

        Returns:
            The COCO result; detections are written to ``<output_dir>/detections_val.json``.

        Examples:
            >>> trainer.evaluate(epoch=20).ap  # after trainer.fit()  # doctest: +SKIP
        """
        sampler = ResumableDistributedSampler(
            len(self.val_ds), num_replicas=self.ctx.world_size, rank=self.ctx.rank, shuffle=False, pad=False
        )
        loader = DataLoader(
            self.val_ds,
            batch_size=self.config.data.eval_batch_size,
            sampler=sampler,
            collate_fn=collate_detection,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        )
        result = evaluate_coco(
            self.model,
            loader,
            self.val_ds.coco,
            device=self.ctx.device,
            progress=self.config.progress,
            detections_path=self.output_dir / "detections_val.json",
        )
        self.log.write(
            "eval",
            epoch=epoch,
            eval_batch_size=result.eval_batch_size,
            num_images=result.num_images,
            **result.stats,
        )
        return result

    # ------------------------------------------------------------------ main loop
    def fit(self) -> TrainResult:
        """Trains (resuming from ``<output_dir>/checkpoint.pt`` when present) and evaluates.

        Returns:
            Steps and epochs done, the final model file and the final COCO evaluation.

        Examples:
            >>> result = Trainer(TrainConfig(output_dir="runs/fp", epochs=50)).fit()  # doctest: +SKIP
            >>> result.model_path  # doctest: +SKIP
            PosixPath('runs/fp/model')
        """
        cfg = self.config
        t0 = time.time()
        self.ctx = init_distributed(cfg.device)
        try:
            return self._fit(t0)
        finally:
            self.ctx.close()

    def _fit(self, t0: float) -> TrainResult:
        cfg, ctx = self.config, self.ctx
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = self.output_dir / CHECKPOINT_NAME
        resuming = cfg.resume and checkpoint_path.is_file()
        if ctx.is_main and not resuming:
            cfg.save(self.output_dir / "config.json")  # a resumed run rewrites it only after the check below
            (self.output_dir / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        ctx.barrier()
        self.log = RunLog(self.output_dir / "log.jsonl", enabled=ctx.is_main)
        _seed_everything(cfg.seed)
        self.train_ds, self.val_ds = build_datasets(cfg, ctx)
        self.num_classes = cfg.model.num_classes or self.train_ds.num_classes

        resume_state = load_checkpoint(checkpoint_path) if resuming else None
        start_epoch = resume_state["epoch"] if resume_state else 0
        start_batch = resume_state["batch_in_epoch"] if resume_state else 0
        global_step = resume_state["global_step"] if resume_state else 0
        resume_changes = self._check_resume(resume_state, checkpoint_path)
        if resume_state is not None and resume_state.get("num_classes") not in (None, self.num_classes):
            raise ResumeMismatchError(
                f"{checkpoint_path} was trained with num_classes={resume_state['num_classes']} but this run has "
                f"{self.num_classes}; use another output_dir or resume: false"
            )
        self.stage = resume_state["stage"] if resume_state else self._stage_for_epoch(0)

        self.model = self._build_student(self.stage)
        self.criterion = self._criterion_for(self.model)
        self.teacher = self._build_teacher()
        self.distill_loss = None
        if cfg.distill.enabled:
            from qdetr.distill import DistillationLoss

            self.distill_loss = DistillationLoss(config=cfg.distill.loss)
        if resume_state is not None:
            load_state_dict_checked(self.model, resume_state["model"], source=str(checkpoint_path))
        elif cfg.quant.bits is not None:
            self._calibrate(self.model, 0)
        self.optimizer, self.scheduler = self._make_optimizer(self.model)
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.scheduler.load_state_dict(resume_state["scheduler"])
            restore_rng_state(resume_state["rng"])
            self.log.write("event", event="resume", epoch=start_epoch, step=global_step, world_size=ctx.world_size,
                           changed={key: [old, new] for key, old, new in resume_changes})
        else:
            self.log.write("event", event="start", world_size=ctx.world_size, device=str(ctx.device), config=cfg.to_dict())
        self.ddp_model = self._wrap(self.model)

        sampler = ResumableDistributedSampler(
            len(self.train_ds), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
        )
        loader = DataLoader(
            self.train_ds,
            batch_size=cfg.data.batch_size,
            sampler=sampler,
            collate_fn=collate_detection,
            num_workers=cfg.data.num_workers,
            # Its own generator: creating an iterator draws a worker seed, which must not move
            # the global RNG (dropout) or resumed runs would diverge. Samples carry their own seeds.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        use_amp = cfg.amp and ctx.device.type == "cuda"
        last_losses: dict[str, float] = {}
        eval_result: CocoEvalResult | None = None
        stopped = False
        epochs_done = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.stage == 1 and self._stage_for_epoch(epoch) == 2:
                self._stage_transition(epoch)
            skip = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=skip * cfg.data.batch_size)
            self.ddp_model.train()
            progress = None
            if cfg.progress and ctx.is_main:
                from tqdm.auto import tqdm

                progress = tqdm(total=len(loader) + skip, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            for batch_index, batch in enumerate(loader, start=skip):
                batch = batch.to(ctx.device)
                losses = self._train_step(batch, use_amp)
                global_step += 1
                last_losses = losses
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{losses['loss']:.3f}")
                if global_step % cfg.log_every == 0 or batch_index == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log.write("train", epoch=epoch, step=global_step, lr=lr, **losses)
                reached_max = cfg.max_steps is not None and global_step >= cfg.max_steps
                if reached_max or (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0):
                    self._save(epoch, batch_index + 1, global_step)
                if reached_max:
                    stopped = True
                    break
            if progress is not None:
                progress.close()
            if stopped:
                break
            self.scheduler.step()
            epochs_done = epoch + 1
            self._save(epoch + 1, 0, global_step)
            if self.on_epoch_end is not None and ctx.is_main:
                self.on_epoch_end({"epoch": epoch + 1, "epochs": cfg.epochs, "step": global_step,
                                   "loss": last_losses.get("loss"), "seconds": time.time() - t0})
            last_epoch = epoch + 1 == cfg.epochs
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and not last_epoch:
                self.evaluate(epoch + 1)
                if ctx.is_main:
                    plot_curves(self.output_dir / "log.jsonl", self.output_dir / "curves.png")
        if cfg.final_eval:
            eval_result = self.evaluate(epochs_done)
        model_path = self._save_model_file()
        if ctx.is_main:
            plot_curves(self.output_dir / "log.jsonl", self.output_dir / "curves.png")
        ctx.barrier()
        return TrainResult(
            output_dir=self.output_dir,
            model_path=model_path,
            global_step=global_step,
            epochs_done=epochs_done,
            eval=eval_result,
            train_seconds=time.time() - t0,
            losses=last_losses,
        )

    @staticmethod
    def _criterion_for(model: nn.Module):
        from qdetr.models.criterion import build_criterion

        return build_criterion(model.config)

    def _train_step(self, batch, use_amp: bool) -> dict[str, float]:
        cfg = self.config
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.ddp_model(batch.pixel_values, batch.pixel_mask)
            loss_dict = self.criterion(outputs, batch.targets)
            loss = self.criterion.total_loss(loss_dict)
            if self.distill_loss is not None:
                with torch.no_grad():
                    teacher_outputs = self.teacher(batch.pixel_values, batch.pixel_mask)
                drd = self.distill_loss(outputs, teacher_outputs, batch.targets)
                loss = loss + drd["loss_drd"].float()
                loss_dict = {**loss_dict, "loss_drd": drd["loss_drd"], "frac_distilled": drd["frac_distilled"]}
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at this step ({ {k: float(v) for k, v in loss_dict.items()} }); "
                "lower optim.lr, check the float checkpoint, or calibrate on more batches (quant.calibration_batches)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_max_norm)
        self.optimizer.step()
        out = {"loss": float(loss.detach())}
        for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_drd", "frac_distilled", "class_error"):
            if key in loss_dict:
                value = float(loss_dict[key].detach()) if isinstance(loss_dict[key], torch.Tensor) else float(loss_dict[key])
                if math.isfinite(value):
                    out[key] = value
        return out


def train(config: TrainConfig) -> TrainResult:
    """Shorthand for ``Trainer(config).fit()``.

    Args:
        config: the run.

    Returns:
        What the run produced (see :class:`TrainResult`).

    Examples:
        >>> import tempfile
        >>> from qdetr.engine import TrainConfig, train
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config = TrainConfig(
        ...         output_dir=tmp, device="cpu", progress=False, max_steps=1, final_eval=False,
        ...         data={"synthetic_train_images": 2, "synthetic_val_images": 1, "synthetic": {"image_size": 64},
        ...               "transforms": {"train_scales": [64], "max_size": 100, "eval_size": 64, "random_crop": False}},
        ...         model={"name": "detr_tiny", "overrides": {"hidden_dim": 32, "dim_feedforward": 64}},
        ...     )
        ...     result = train(config)
        >>> result.global_step, result.eval is None, "loss" in result.losses
        (1, True, True)
    """
    return Trainer(config).fit()
