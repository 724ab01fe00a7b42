"""Training configuration: frozen dataclasses loadable from YAML or JSON.

A :class:`TrainConfig` groups one section per concern, and each section embeds the
library's own config dataclass instead of copying its fields:

=============  =================================================================================
section        holds
=============  =================================================================================
``data``       :class:`DataConfig` (embeds :class:`~qdetr.data.TransformConfig` and
               :class:`~qdetr.data.SyntheticShapesConfig`)
``model``      :class:`ModelConfig`: a registry name plus ``overrides``, the fields of the
               entry's :class:`~qdetr.models.DetrConfig` / :class:`~qdetr.models.SmcaConfig`
``quant``      :class:`QATConfig`: the QAT recipe plus ``quantization``, a full
               :class:`~qdetr.quant.QuantConfig` (``null`` = float model)
``distill``    :class:`QDetrMethodConfig`: DA / DRD switches, the teacher, and ``loss``, a full
               :class:`~qdetr.distill.DistillationConfig`
``optim``      :class:`OptimConfig`
=============  =================================================================================

Every field is settable from the file and from ``--set section.key=value`` (nested keys too:
``--set quant.quantization.weight.granularity=per_tensor``). Every field has a default, so a
config file only lists what it changes::

    output_dir: runs/w4_distill
    epochs: 50
    data: {dataset: coco, train_images: coco/train2017, train_ann: coco/ann/instances_train2017.json,
           val_images: coco/val2017, val_ann: coco/ann/instances_val2017.json, batch_size: 2}
    model: {name: smca_detr_r50}
    quant: {quantization: {bits: 4, stem_bits: 8}, float_checkpoint: runs/fp}
    distill: {enabled: true, loss: {tau: 0.5, mu_giou: 2.0}}

Files carry ``config_version`` (:data:`CONFIG_VERSION`). Version 1 files (no
``config_version``) spelled the quantization and loss settings flat (``quant.bits``,
``quant.attn_bits``, ``quant.profile``, ``distill.tau``, ...); those keys are still read,
from files and from ``--set``, through one table (:data:`FLAT_KEYS`). An unknown version is
refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qdetr.data.synthetic import SyntheticShapesConfig
from qdetr.data.transforms import TransformConfig
from qdetr.distill.config import DistillationConfig
from qdetr.quant.config import QuantConfig

__all__ = [
    "CONFIG_VERSION",
    "DataConfig",
    "ModelConfig",
    "QATConfig",
    "QDetrMethodConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config_file",
]

#: Version of the TrainConfig schema written by this qdetr (see the module docstring).
CONFIG_VERSION = 2

#: Version-1 (flat) keys -> where they live now. Read from files and from ``--set``.
FLAT_KEYS: dict[str, str] = {
    "quant.bits": "quant.quantization.bits",
    "quant.attn_bits": "quant.quantization.attn_bits",
    "quant.profile": "quant.quantization.profile",
    **{f"distill.{name}": f"distill.loss.{name}"
       for name in ("tau", "weight", "mu_giou", "mu_l1", "layers", "feature", "one_to_one", "qfd_weight")},
}


def _fail(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are batched.

    Args:
        dataset: ``"synthetic"`` (generated shapes, the embedded default) or ``"coco"`` (any
            COCO-format folder + annotation file).
        train_images, train_ann, val_images, val_ann: COCO image folders and annotation files
            (``dataset="coco"``).
        synthetic_root: folder the synthetic set is written to (default ``<output_dir>/data``).
        synthetic_train_images, synthetic_val_images: sizes of the synthetic splits.
        synthetic_seed: seed of the synthetic set.
        synthetic: drawing parameters of the synthetic set.
        transforms: image sizes of the train/eval transforms.
        batch_size: training images per process.
        eval_batch_size: evaluation images per process (1 = no padding effects; recorded).
        num_workers: DataLoader workers.
        missing_images: ``"error"`` or ``"skip"`` for images listed but absent on disk.
        max_train_images, max_val_images: use only the first N images (quick runs).

    Examples:
        >>> from qdetr.engine import DataConfig
        >>> data = DataConfig(batch_size=4, synthetic={"image_size": 64})
        >>> data.synthetic.image_size, data.transforms.eval_size
        (64, 128)
        >>> DataConfig(dataset="coco")
        Traceback (most recent call last):
        ...
        ValueError: data.dataset='coco' needs data.train_images (a path); it is missing
    """

    dataset: Literal["synthetic", "coco"] = "synthetic"
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    synthetic_root: str | None = None
    synthetic_train_images: int = 256
    synthetic_val_images: int = 64
    synthetic_seed: int = 0
    synthetic: SyntheticShapesConfig = field(default_factory=SyntheticShapesConfig)
    transforms: TransformConfig = field(default_factory=lambda: TransformConfig.small(128))
    batch_size: int = 2
    eval_batch_size: int = 1
    num_workers: int = 0
    missing_images: Literal["error", "skip"] = "error"
    max_train_images: int | None = None
    max_val_images: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):
            object.__setattr__(self, "synthetic", SyntheticShapesConfig(**self.synthetic))
        if isinstance(self.transforms, dict):
            object.__setattr__(self, "transforms", TransformConfig(**self.transforms))
        if self.dataset not in ("synthetic", "coco"):
            _fail(f"data.dataset must be 'synthetic' or 'coco'; got {self.dataset!r}")
        if self.dataset == "coco":
            for name in ("train_images", "train_ann", "val_images", "val_ann"):
                if getattr(self, name) is None:
                    _fail(f"data.dataset='coco' needs data.{name} (a path); it is missing")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            _fail(f"batch sizes must be >= 1; got batch_size={self.batch_size}, eval_batch_size={self.eval_batch_size}")
        if self.num_workers < 0:
            _fail(f"data.num_workers must be >= 0; got {self.num_workers}")
        if self.missing_images not in ("error", "skip"):
            _fail(f"data.missing_images must be 'error' or 'skip'; got {self.missing_images!r}")
        if self.synthetic_train_images < 1 or self.synthetic_val_images < 1:
            _fail("data.synthetic_train_images and data.synthetic_val_images must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which architecture to build (``qdetr.models.create_model(name, **overrides)``).

    Args:
        name: registry name, e.g. ``"detr_tiny"``, ``"smca_detr_r50"``.
        overrides: fields of the entry's architecture config (:func:`qdetr.models.model_config`,
            a ``DetrConfig`` or ``SmcaConfig``), e.g. ``{"hidden_dim": 64}``; checked against
            its fields. Quantization is set in the ``quant`` section, never here.
        num_classes: DETR ``num_classes`` (largest category id + 1); ``None`` derives it from
            the training set.
        train_full_backbone: also train the stem and ``layer1`` (frozen in the DETR recipe,
            which assumes ImageNet weights); use it for backbones trained from scratch.

    Examples:
        >>> from qdetr.engine import ModelConfig
        >>> ModelConfig(name="detr_tiny", overrides={"hidden_dim": 32}).overrides
        {'hidden_dim': 32}
        >>> ModelConfig(name="detr_tiny", overrides={"hidden_dim": 32}).architecture().hidden_dim
        32
        >>> ModelConfig(num_classes=1)
        Traceback (most recent call last):
        ...
        ValueError: model.num_classes must be >= 2 (largest category id + 1); got 1
        >>> ModelConfig(overrides={"hiden_dim": 32})
        Traceback (most recent call last):
        ...
        ValueError: model.overrides: unknown DetrConfig fields ['hiden_dim']; valid fields: [...]
    """

    name: str = "detr_tiny"
    overrides: dict = field(default_factory=dict)
    num_classes: int | None = None
    train_full_backbone: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("model.name must be a registry name such as 'detr_tiny'")
        if not isinstance(self.overrides, dict):
            _fail(f"model.overrides must be a mapping of builder arguments; got {type(self.overrides).__name__}")
        if self.num_classes is not None and self.num_classes < 2:
            _fail(f"model.num_classes must be >= 2 (largest category id + 1); got {self.num_classes}")
        self.architecture()  # checks the name and the override fields

    def architecture(self):
        """The library's architecture config of this entry with ``overrides`` applied.

        Raises:
            ValueError: for an unknown registry name or an unknown field.
        """
        from qdetr.models import model_config

        try:
            base = model_config(self.name)
        except (KeyError, ValueError) as err:
            raise ValueError(f"model.name: {err}") from err
        if "num_classes" in self.overrides:
            _fail("model.overrides.num_classes: set model.num_classes instead (null derives it from the data)")
        names = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(self.overrides) - names)
        if unknown:
            _fail(f"model.overrides: unknown {type(base).__name__} fields {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(base, **self.overrides)


def _embedded(cls, value, prefix: str):
    """A library config from its dict (its own ``from_dict`` validates), errors prefixed with the section."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        _fail(f"{prefix} must be a mapping of {cls.__name__} fields; got {type(value).__name__}")
    try:
        return cls.from_dict(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix}: {err}") from err


@dataclass(frozen=True, kw_only=True)
class QATConfig:
    """The ``quant`` section: what to quantize (a library :class:`~qdetr.quant.QuantConfig`)
    and how quantization-aware training starts and is scheduled.

    Args:
        quantization: the full :class:`~qdetr.quant.QuantConfig` (``bits``, ``act_bits``,
            ``attn_bits``, ``stem_bits``, ``profile``, ``quantize_downsample``, ``overrides``,
            ``keep_float`` and the ``weight`` / ``activation`` quantizer numerics), or ``None``
            to train a float model.
        float_checkpoint: float weights to start QAT from: a float run folder, a
            ``save_pretrained`` folder or a checkpoint file. Strongly recommended: QAT from
            scratch rarely converges.
        calibration_batches: training batches used to initialise step sizes and zero points.
        two_stage: the paper's recipe: stage 1 quantizes only the backbone (the rest stays
            float) for ``stage1_epochs``, stage 2 quantizes everything from stage 1's weights.
        stage1_epochs: epochs of stage 1 (part of ``TrainConfig.epochs``).
        stage1_keep_float: module-name globs kept float in stage 1 (default: all but the
            backbone), added to ``quantization.keep_float``.
        kernels: fake-quantization kernels (:mod:`qdetr.quant.kernels`): ``"native"`` (single-pass
            C loops on CPU, eager elsewhere), ``"compiled"`` (``torch.compile``, a few seconds of
            compilation at start), ``"eager"``, or ``"auto"``: compiled on CUDA for models with at
            least ``AUTO_COMPILED_MIN_PARAMS`` parameters, where the compilation pays off, native
            otherwise.

    Examples:
        >>> from qdetr.engine import QATConfig
        >>> quant = QATConfig(quantization={"bits": 4, "stem_bits": 4}, float_checkpoint="runs/fp")
        >>> quant.bits, quant.quantization.stem_bits, quant.quantization.profile, quant.kernels
        (4, 4, 'paper', 'auto')
        >>> QATConfig().bits is None  # float
        True
        >>> QATConfig(quantization={"bits": 1})
        Traceback (most recent call last):
        ...
        ValueError: quant.quantization: bits must be an integer from 2 to 8 (...); got 1
    """

    quantization: QuantConfig | None = None
    float_checkpoint: str | None = None
    calibration_batches: int = 1
    two_stage: bool = False
    stage1_epochs: int = 0
    stage1_keep_float: tuple[str, ...] = ("transformer*", "input_proj*", "class_embed*", "bbox_embed*")
    kernels: Literal["auto", "native", "eager", "compiled"] = "auto"

    #: ``kernels="auto"`` compiles the fake-quant kernels for models at least this large.
    AUTO_COMPILED_MIN_PARAMS = 5_000_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantization", _embedded(QuantConfig, self.quantization, "quant.quantization"))
        object.__setattr__(self, "stage1_keep_float", tuple(self.stage1_keep_float))
        if self.kernels not in ("auto", "native", "eager", "compiled"):
            _fail(f"quant.kernels must be 'auto', 'native', 'eager' or 'compiled'; got {self.kernels!r}")
        if self.calibration_batches < 1:
            _fail(f"quant.calibration_batches must be >= 1; got {self.calibration_batches}")
        if self.two_stage and self.quantization is None:
            _fail("quant.two_stage needs quant.quantization.bits (2, 3 or 4)")
        if self.two_stage and self.stage1_epochs < 1:
            _fail("quant.two_stage needs quant.stage1_epochs >= 1")

    @property
    def bits(self) -> int | None:
        """``quantization.bits``, or None for a float model."""
        return None if self.quantization is None else self.quantization.bits

    def for_stage(self, stage: int) -> QuantConfig | None:
        """The ``QuantConfig`` used in ``stage`` (1: ``stage1_keep_float`` kept float too)."""
        if self.quantization is None or not (self.two_stage and stage == 1):
            return self.quantization
        keep = tuple(dict.fromkeys(self.quantization.keep_float + self.stage1_keep_float))
        return dataclasses.replace(self.quantization, keep_float=keep)


@dataclass(frozen=True, kw_only=True)
class QDetrMethodConfig:
    """The ``distill`` section: Q-DETR's two parts, distribution alignment (DA) and
    distillation with foreground-aware query matching (DRD/FQM) from a frozen float teacher.

    The paper's ablation (method.md section 8) maps to: baseline = neither,
    "+DA" = ``alignment=True``, "+FQM" = ``enabled=True, alignment=False``,
    Q-DETR = both (the default when ``enabled``).

    Args:
        enabled: add ``DistillationLoss`` (DRD with FQM) to the detection loss.
        alignment: put distribution alignment on the student's decoder attention query (the
            slot of the quantization profile, :data:`qdetr.distill.ALIGNMENT_BY_PROFILE`);
            ``None`` follows ``enabled``.
        teacher_checkpoint: the teacher's float weights: a run folder, a ``save_pretrained``
            folder or a checkpoint file (default: ``quant.float_checkpoint``).
        teacher_model: architecture of the teacher (default: the student's).
        loss: the full :class:`~qdetr.distill.DistillationConfig` (``tau``, ``weight``,
            ``mu_giou``, ``mu_l1``, ``layers``, ``feature``, ``one_to_one``, ``qfd_weight``).

    Examples:
        >>> from qdetr.engine import QDetrMethodConfig
        >>> QDetrMethodConfig(enabled=True).use_alignment  # Q-DETR: DA + FQM
        True
        >>> QDetrMethodConfig(enabled=True, alignment=False).use_alignment  # "+FQM" ablation
        False
        >>> QDetrMethodConfig(loss={"mu_l1": 2.0}).loss.mu_l1
        2.0
        >>> QDetrMethodConfig(loss={"tau": 2.0})
        Traceback (most recent call last):
        ...
        ValueError: distill.loss: tau must be in [0, 1] (0.5 is the released value), got 2.0
    """

    enabled: bool = False
    alignment: bool | None = None
    teacher_checkpoint: str | None = None
    teacher_model: ModelConfig | None = None
    loss: DistillationConfig = field(default_factory=DistillationConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", _embedded(DistillationConfig, self.loss, "distill.loss"))
        if isinstance(self.teacher_model, dict):
            object.__setattr__(self, "teacher_model", _from_mapping(ModelConfig, self.teacher_model, "distill.teacher_model"))

    @property
    def use_alignment(self) -> bool:
        """Whether DA is inserted (``alignment``, or ``enabled`` when it is None)."""
        return self.enabled if self.alignment is None else bool(self.alignment)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with parameter groups and a step schedule.

    Args:
        lr: learning rate of the transformer and heads.
        lr_backbone: learning rate of the backbone (0 freezes it).
        lr_quant: learning rate of quantizer step sizes and zero points (default: ``lr``).
        weight_decay: weight decay of weights; quantizer, DA, PReLU, LearnableBias, norm
            parameters and biases get 0.
        lr_drop: epoch after which the learning rate is multiplied by ``lr_gamma`` (None: never).
        lr_gamma: the drop factor.
        clip_max_norm: gradient clipping max norm (0 disables).

    Examples:
        >>> from qdetr.engine import OptimConfig
        >>> optim = OptimConfig(lr=2e-4, lr_drop=40)
        >>> optim.lr_drop, optim.lr_backbone
        (40, 1e-05)
        >>> OptimConfig(lr=0)
        Traceback (most recent call last):
        ...
        ValueError: optim.lr must be > 0 and optim.lr_backbone >= 0; got 0, 1e-05
    """

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_quant: float | None = None
    weight_decay: float = 1e-4
    lr_drop: int | None = None
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_backbone < 0:
            _fail(f"optim.lr must be > 0 and optim.lr_backbone >= 0; got {self.lr}, {self.lr_backbone}")
        if self.lr_quant is not None and self.lr_quant < 0:
            _fail(f"optim.lr_quant must be >= 0; got {self.lr_quant}")
        if self.lr_drop is not None and self.lr_drop < 1:
            _fail(f"optim.lr_drop must be an epoch >= 1 or null (no drop); got {self.lr_drop}")
        if self.weight_decay < 0 or self.clip_max_norm < 0:
            _fail("optim.weight_decay and optim.clip_max_norm must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A complete training run.

    Args:
        output_dir: where checkpoints, logs and curves go.
        epochs: total epochs (including stage 1 of a two-stage run).
        seed: seed of model init, data order and augmentation.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        eval_every: evaluate every N epochs (0: only at the end).
        checkpoint_every_steps: also checkpoint every N optimisation steps (0: per epoch only).
        max_steps: stop after this many optimisation steps in total (quick runs, tests).
        log_every: write a JSON log line every N steps.
        progress: show tqdm progress bars.
        resume: resume from ``<output_dir>/checkpoint.pt`` when it exists.
        final_eval: evaluate on the validation set at the end of the run.
        data, model, quant, distill, optim: the parts of the run.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine import TrainConfig
        >>> config = TrainConfig.from_dict({"epochs": 2, "quant": {"bits": 4}})
        >>> config.quant.bits, config.data.dataset, config.model.name
        (4, 'synthetic', 'detr_tiny')
        >>> config.with_overrides(["optim.lr=2e-4", "quant.bits=2"]).optim.lr
        0.0002
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config.save(Path(tmp) / "run.yaml")
        ...     TrainConfig.from_file(Path(tmp) / "run.yaml") == config
        True
        >>> TrainConfig.from_dict({"optim": {"learning_rate": 1e-4}})
        Traceback (most recent call last):
        ...
        ValueError: unknown key(s) ['learning_rate'] in section 'optim'; valid keys: ...
    """

    config_version: int = CONFIG_VERSION
    output_dir: str = "outputs/train"
    epochs: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_every: int = 1
    checkpoint_every_steps: int = 0
    max_steps: int | None = None
    log_every: int = 10
    progress: bool = True
    resume: bool = True
    final_eval: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QATConfig = field(default_factory=QATConfig)
    distill: QDetrMethodConfig = field(default_factory=QDetrMethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.config_version != CONFIG_VERSION:
            _fail(f"config_version {self.config_version!r} is not supported: this qdetr reads versions 1 and "
                  f"{CONFIG_VERSION} (files without config_version are version 1); upgrade qdetr for newer files")
        for name, cls in _NESTED["TrainConfig"].items():
            value = getattr(self, name)
            if isinstance(value, dict):
                value = _move_flat_keys({name: value})[name]
                object.__setattr__(self, name, _from_mapping(cls, value, prefix=name))
        if self.epochs < 1:
            _fail(f"epochs must be >= 1; got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            _fail(f"max_steps must be >= 1 or null; got {self.max_steps}")
        if self.eval_every < 0 or self.checkpoint_every_steps < 0 or self.log_every < 1:
            _fail("eval_every and checkpoint_every_steps must be >= 0, log_every >= 1")
        if (self.distill.enabled or self.distill.use_alignment) and self.quant.bits is None:
            _fail("distill.enabled / distill.alignment need a quantized student: set quant.bits (2, 3 or 4)")
        if self.distill.enabled and (self.distill.teacher_checkpoint or self.quant.float_checkpoint) is None:
            _fail("distill.enabled needs the teacher's weights: set distill.teacher_checkpoint")
        if self.quant.two_stage and self.quant.stage1_epochs >= self.epochs:
            _fail(f"quant.stage1_epochs ({self.quant.stage1_epochs}) must be < epochs ({self.epochs})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (tuples become lists).

        Examples:
            >>> from qdetr.engine import TrainConfig
            >>> data = TrainConfig(epochs=3).to_dict()
            >>> data["epochs"], sorted(data["optim"])[:2]
            (3, ['clip_max_norm', 'lr'])
        """
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Builds a config from a (possibly partial) nested dict.

        Raises:
            ValueError: on unknown keys (with the valid ones) or invalid values.

        Examples:
            >>> from qdetr.engine import TrainConfig
            >>> config = TrainConfig.from_dict({"model": {"name": "detr_tiny"}, "data": {"batch_size": 4}})
            >>> config.data.batch_size, config.epochs
            (4, 1)
        """
        if not isinstance(data, dict):
            _fail(f"a TrainConfig must be a mapping of sections; got {type(data).__name__}")
        data = dict(data)
        version = data.get("config_version", 1)
        if version not in (1, CONFIG_VERSION):
            _fail(f"config_version {version!r} is not supported: this qdetr reads versions 1 and {CONFIG_VERSION} "
                  "(files without config_version are version 1); upgrade qdetr for newer files")
        data["config_version"] = CONFIG_VERSION
        return _from_mapping(cls, _move_flat_keys(data), prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Loads a YAML (``.yaml``/``.yml``) or JSON file.

        Examples:
            >>> import tempfile
            >>> from pathlib import Path
            >>> from qdetr.engine import TrainConfig
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     _ = (Path(tmp) / "run.yaml").write_text("{epochs: 5, quant: {quantization: {bits: 3}}}")
            ...     config = TrainConfig.from_file(Path(tmp) / "run.yaml")
            >>> config.epochs, config.quant.bits
            (5, 3)
        """
        return cls.from_dict(load_config_file(path))

    def save(self, path: str | Path) -> None:
        """Writes the config as YAML (``.yaml``/``.yml``) or JSON.

        Examples:
            >>> import json, tempfile
            >>> from pathlib import Path
            >>> from qdetr.engine import TrainConfig
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     TrainConfig(epochs=4).save(Path(tmp) / "config.json")
            ...     saved = json.loads((Path(tmp) / "config.json").read_text())
            >>> saved["epochs"]
            4
        """
        from qdetr.atomic_write import atomic_path

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        with atomic_path(path) as tmp:  # a killed run never leaves a half-written config
            tmp.write_text(text)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "TrainConfig":
        """Returns a copy with dotted-key overrides, e.g. ``["optim.lr=2e-4", "quant.bits=2"]``.

        Values are parsed as YAML scalars (``2e-4``, ``true``, ``null``, ``[1, 2]``). Keys may
        reach into the embedded library configs (``quant.quantization.stem_bits=4``,
        ``distill.loss.mu_l1=2``); the version-1 flat keys (``quant.bits``, ``distill.tau``, ...)
        still work.

        Examples:
            >>> from qdetr.engine import TrainConfig
            >>> config = TrainConfig().with_overrides(["optim.lr=2e-4", "quant.bits=4", "optim.lr_drop=null"])
            >>> config.optim.lr, config.quant.bits, config.optim.lr_drop
            (0.0002, 4, None)
            >>> TrainConfig().with_overrides({"data.batch_size": 8}).data.batch_size
            8
            >>> config.with_overrides(["quant.quantization.weight.granularity=per_tensor"]).quant.quantization.weight
            QuantizerConfig(granularity='per_tensor', init='channel', grad_scale_numel='per_step', zero_point_init='zero', learn_zero_point=True)
        """
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
        for key, value in items:
            if isinstance(value, str):
                value = _parse_scalar(value)
            _set_path(data, FLAT_KEYS.get(key, key), value)
        return TrainConfig.from_dict(data)


def _set_path(data: dict, key: str, value: Any) -> None:
    """Set a dotted ``key`` in nested dicts, creating sections (``quant.quantization`` included).

    ``quant.quantization.bits = null`` means a float model: the whole ``quantization`` becomes null.
    """
    if key == "quant.quantization.bits" and value is None:
        key = "quant.quantization"
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            if node.get(part) is not None:
                _fail(f"cannot set {key}: {part} is not a section")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _move_flat_keys(data: dict) -> dict:
    """Move version-1 flat keys (:data:`FLAT_KEYS`) to their place in the nested sections."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    quant = data.get("quant")
    if isinstance(quant, dict) and "bits" in quant and quant["bits"] is None:
        # a float run of version 1: no quantization, whatever attn_bits / profile say
        for name in ("bits", "attn_bits", "profile"):
            quant.pop(name, None)
        quant.setdefault("quantization", None)
    for old, new in FLAT_KEYS.items():
        section, name = old.split(".")
        if isinstance(data.get(section), dict) and name in data[section]:
            _set_path(data, new, data[section].pop(name))
    return data


def _parse_scalar(text: str) -> Any:
    """YAML scalar, but numbers like ``2e-4`` (a string in YAML 1.1) become floats."""
    import yaml

    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. optim.lr=2e-4")
    key, value = text.split("=", 1)
    return key.strip(), value


def _from_mapping(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping; got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section {prefix!r}" if prefix else "the config"
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    kwargs = dict(data)
    for name, sub_cls in _NESTED.get(cls.__name__, {}).items():
        if isinstance(kwargs.get(name), dict):
            kwargs[name] = _from_mapping(sub_cls, kwargs[name], f"{prefix}.{name}".strip("."))
    for name, value in list(kwargs.items()):
        if isinstance(value, list):
            kwargs[name] = tuple(value)
    return cls(**kwargs)


#: Sections built field by field here; the embedded library configs (``quant.quantization``,
#: ``distill.loss``) are built by their own ``from_dict``.
_NESTED: dict[str, dict[str, type]] = {
    "TrainConfig": {
        "data": DataConfig,
        "model": ModelConfig,
        "quant": QATConfig,
        "distill": QDetrMethodConfig,
        "optim": OptimConfig,
    },
    "DataConfig": {"synthetic": SyntheticShapesConfig, "transforms": TransformConfig},
    "QDetrMethodConfig": {"teacher_model": ModelConfig},
}

#: Deprecated names of the sections (one release): ``QuantTrainConfig`` -> :class:`QATConfig`,
#: ``DistillConfig`` -> :class:`QDetrMethodConfig` (it collided with ``DistillationConfig``).
_DEPRECATED_SECTIONS = {"QuantTrainConfig": ("QATConfig", "quant"), "DistillConfig": ("QDetrMethodConfig", "distill")}


def __getattr__(name: str):
    """Deprecated section names; their constructors still take the version-1 flat keywords."""
    if name not in _DEPRECATED_SECTIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    new_name, section = _DEPRECATED_SECTIONS[name]
    warnings.warn(f"qdetr.engine.{name} is deprecated; use qdetr.engine.{new_name}", DeprecationWarning, stacklevel=2)
    cls = globals()[new_name]

    def construct(**kwargs):
        moved = _move_flat_keys({section: kwargs})[section]
        return _from_mapping(cls, moved, prefix=section)

    construct.__name__ = name
    construct.__doc__ = f"Deprecated: builds a :class:`{new_name}` from version-1 keywords."
    return construct


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a YAML or JSON config file into a dict.

    Args:
        path: a ``.yaml``/``.yml`` file (any other suffix is read as JSON).

    Returns:
        The file's top-level mapping, unvalidated (pass it to :meth:`TrainConfig.from_dict`).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it does not hold a mapping.

    Examples:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine import load_config_file
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "run.json"
        ...     _ = path.write_text(json.dumps({"epochs": 3, "quant": {"bits": 2}}))
        ...     load_config_file(path)
        {'epochs': 3, 'quant': {'bits': 2}}
        >>> load_config_file("missing.yaml")
        Traceback (most recent call last):
        ...
        FileNotFoundError: config file not found: missing.yaml
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a mapping of config sections")
    return data if data is not None else {}
