"""Coverage matrix: qdetr on every DETR-family ``*ForObjectDetection`` class of the installed transformers.

For each class it builds the tiny offline model of :mod:`qdetr.tiny_hf_detr`, quantizes it
with ``qdetr.quantize_model(model, bits=4)``, reads the coverage and the layers kept in float
(with their reasons) from ``qdetr.quant_summary``, and runs one QAT + distillation training
step: the model's own loss (with its labels) plus ``DistillationLoss`` against the float copy
of the same model wrapped in ``FrozenTeacher``, backward, one AdamW step. It writes the table
to ``docs/hf-family-coverage.md``.

The classes are enumerated from transformers' auto mappings for (zero-shot) object detection;
a class is DETR-family when its config has object queries (``num_queries``) or detection
tokens (``num_detection_tokens``, YOLOS). A DETR-family class without a tiny config shows up
as "no tiny config", so a new transformers release cannot slip past the table.

Run (about a minute, offline)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_family_matrix.py           # rewrite the page
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_family_matrix.py --check   # exit 1 if stale

``tests/test_hf_family_matrix.py`` runs :func:`matrix_row` for every class and compares it with
the committed page.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qdetr
from qdetr.atomic_write import atomic_path
from qdetr.distill import (
    DistillationLoss,
    FrozenTeacher,
    capture_co_attention,
    find_decoder_cross_attention,
    insert_distribution_alignment,
)
from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES, build_tiny_hf_detr

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "hf-family-coverage.md"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_family_matrix.py"
BITS = 4
COLUMNS = (
    "Class",
    "Tiny config",
    "Conv",
    "Linear",
    "Attention",
    "Kept in float (why)",
    "Distillation capture",
    "Distribution alignment",
    "QAT + distillation step",
    "Losses",
)
#: Columns whose text must be reproduced exactly by a re-run (the losses are figures, not checked).
CHECKED_COLUMNS = COLUMNS[:-1]


def family_classes() -> dict[str, str]:
    """``{class name: model type}`` of the DETR-family detection classes of the installed transformers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
        MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES,
    )

    found = {}
    for mapping in (MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES, MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES):
        for model_type, class_name in mapping.items():
            config_class = CONFIG_MAPPING[model_type]
            if hasattr(config_class, "num_queries") or hasattr(config_class, "num_detection_tokens"):
                found[class_name] = model_type
    return dict(sorted(found.items()))


def other_detection_classes() -> list[str]:
    """Detection classes of the auto mappings that are not DETR-family (no object queries)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
        MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES,
    )

    names = set(MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.values()) | set(
        MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES.values()
    )
    return sorted(names - set(family_classes()))


def tiny_class_name(tiny_name: str) -> str:
    """The transformers class a tiny config builds, without building the model."""
    from qdetr import tiny_hf_detr

    return tiny_hf_detr._CLASSES[tiny_name]


@dataclass
class MatrixRow:
    """One line of the table (strings as they appear in the page)."""

    class_name: str
    tiny_name: str
    conv: str = "-"
    linear: str = "-"
    attention: str = "-"
    kept_float: str = "-"
    capture: str = "-"
    alignment: str = "-"
    step: str = "not run"
    losses: str = "-"
    passed: bool = False
    notes: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        return (
            f"`{self.class_name}`",
            f"`{self.tiny_name}`" if self.tiny_name else "no tiny config",
            self.conv,
            self.linear,
            self.attention,
            self.kept_float,
            self.capture,
            self.alignment,
            self.step,
            self.losses,
        )

    def markdown(self) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in self.cells()) + " |"


def _short_reason(status: str) -> str:
    reason = status.removeprefix("float: ").strip()
    return reason.split(" (")[0]


def _kept_float(summary) -> str:
    reasons = Counter(_short_reason(status) for status in summary.float_layers.values())
    if not reasons:
        return "nothing"
    return "; ".join(f"{reason} ({count})" for reason, count in sorted(reasons.items()))


def _capture_point(model: torch.nn.Module) -> str:
    try:
        layers = find_decoder_cross_attention(model)
    except ValueError:
        return "none: encoder-only, co-attention distillation does not apply"
    name, attention = layers[-1]
    relative = name.split(".layers.", 1)[1].split(".", 1)[1]
    for proj in ("o_proj", "out_proj", "output_proj"):
        if hasattr(attention, proj):
            return f"input of `{relative}.{proj}` (x{len(layers)} layers)"
    return f"output[0] of `{relative}` (x{len(layers)} layers)"


def with_whole_image_box(labels: list[dict] | None, batch_size: int) -> list[dict]:
    """The tiny batch's labels plus one whole-image box (class 0) per image.

    With random weights, the student's and the teacher's two-stage selections pick unrelated small
    proposals, which may overlap none of the tiny labels; every query overlaps the whole-image box,
    so foreground-aware query matching has foreground queries to pair by their boxes.
    """
    whole = {"class_labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}
    if labels is None:
        return [dict(whole) for _ in range(batch_size)]
    return [
        {key: torch.cat([t[key], whole[key]]) for key in ("class_labels", "boxes")} for t in labels
    ]


def _grad_reaches_steps(model: torch.nn.Module, prefix: str = "") -> bool:
    """The backward reached the quantizers' step sizes under ``prefix`` (their ``.grad`` was written).

    Values are not required to be non-zero: a randomly initialised hybrid encoder (RT-DETR
    family, PP-DocLayout) outputs a memory of about 1e-8 to 1e-18, so the DRD term and its
    gradients can underflow on these tiny models.
    """
    steps = [p for n, p in model.named_parameters() if n.startswith(prefix) and n.endswith(".scale")]
    return bool(steps) and any(p.grad is not None for p in steps)


def matrix_row(tiny_name: str, *, seed: int = 0) -> MatrixRow:
    """Quantize the tiny ``tiny_name`` model to 4 bits and run one QAT + distillation step.

    Args:
        tiny_name: a key of ``qdetr.tiny_hf_detr.TINY_HF_DETR_NAMES``.
        seed: seeds the model, the batch and the optimizer step.

    Returns:
        The filled :class:`MatrixRow`; ``passed`` is True when quantization succeeded and the
        step gave finite losses and gradients at the quantizer steps.
    """
    tiny = build_tiny_hf_detr(tiny_name, seed=seed)
    row = MatrixRow(class_name=tiny.cls.__name__, tiny_name=tiny_name)
    row.capture = _capture_point(tiny.model)
    has_decoder = not row.capture.startswith("none")
    teacher = FrozenTeacher(copy.deepcopy(tiny.model)) if has_decoder else None
    try:
        student = qdetr.quantize_model(tiny.model, bits=BITS)
    except NotImplementedError as error:
        row.step = f"not run: quantize_model raised NotImplementedError ({str(error).split(':', 1)[0]})"
        return row
    summary = qdetr.quant_summary(student)
    for kind in ("conv", "linear", "attention"):
        quantized, total = summary.coverage[kind]
        setattr(row, kind, f"{quantized}/{total}")
    row.kept_float = _kept_float(summary)
    aligned = insert_distribution_alignment(student, where="self") if has_decoder else []
    if aligned:
        relative = aligned[-1].split(".layers.", 1)[1].split(".", 1)[1]
        row.alignment = f"`{relative}` query (x{len(aligned)} layers)"
    else:
        row.alignment = "none (no decoder)"

    student.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    parts: dict[str, torch.Tensor] = {}
    labels = with_whole_image_box(tiny.labels, tiny.inputs["pixel_values"].shape[0])
    own_loss = tiny.labels is not None  # False where transformers cannot train it (OmDet-Turbo, PP-DocLayout)
    label_kwargs = {"labels": labels} if own_loss else {}
    if has_decoder:
        teacher_outputs = teacher(**tiny.inputs)  # eval, no labels: no denoising queries
        with capture_co_attention(student) as capture:
            out = student(**tiny.inputs, **label_kwargs)
        distill = DistillationLoss()(capture.outputs(out), teacher_outputs, labels)
        parts["loss_drd"] = distill["loss_drd"]
    else:
        out = student(**tiny.inputs, **label_kwargs)
    if own_loss:
        parts["own"] = out.loss
    total = sum(parts.values())
    optimizer.zero_grad()
    total.backward()
    # The quantizers of the last decoder layer (the whole model for an encoder-only detector).
    last_attention = find_decoder_cross_attention(student)[-1][0] if has_decoder else ""
    last_layer = re.match(r"^(.*\.\d+)\.", last_attention).group(1) if has_decoder else ""
    grads_ok = _grad_reaches_steps(student, last_layer)
    align_ok = all(student.get_submodule(name).q_align.weight.grad is not None for name in aligned)
    optimizer.step()

    values = {k: v.item() for k, v in parts.items()}
    finite = all(math.isfinite(v) for v in values.values())
    row.losses = ", ".join(f"{k} {v:.3g}" for k, v in values.items())
    used = []
    if "own" in parts:
        used.append("own loss")
    else:
        used.append("no own loss (transformers cannot train this model)")
    used.append("DA + DRD" if has_decoder else "no DA or DRD (encoder-only)")
    row.passed = finite and grads_ok and align_ok and (not has_decoder or values["loss_drd"] > 0)
    if row.passed:
        row.step = "pass: " + " + ".join(used)
    else:
        checks = (
            ("non-finite loss", not finite),
            ("no gradient at the quantizer steps", not grads_ok),
            ("no gradient at the distribution alignment", not align_ok),
        )
        why = [w for w, bad in checks if bad]
        if has_decoder and values["loss_drd"] <= 0:
            why.append("loss_drd is 0")
        row.step = "FAIL: " + ", ".join(why)
    return row


def missing_row(class_name: str) -> MatrixRow:
    """Row of a DETR-family class that has no tiny config in ``qdetr.tiny_hf_detr``."""
    return MatrixRow(class_name=class_name, tiny_name="", step="not run: no tiny config")


def all_rows() -> list[MatrixRow]:
    """Every row of the table: the tiny configs, then the family classes without one."""
    rows = [matrix_row(name) for name in TINY_HF_DETR_NAMES]
    covered = {tiny_class_name(name) for name in TINY_HF_DETR_NAMES}
    rows += [missing_row(name) for name in family_classes() if name not in covered]
    return rows


def render(rows: list[MatrixRow]) -> str:
    """The markdown page."""
    import transformers

    passed = sum(row.passed for row in rows)
    lines = [
        "# Hugging Face DETR-family coverage",
        "",
        "Generated by a script; do not edit by hand. Regenerate with:",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, {BITS}-bit "
        "(`qdetr.quantize_model(model, bits=4)`, paper profile), tiny offline configs of "
        "`qdetr.tiny_hf_detr` (hidden size 32, 3 decoder layers, 5 queries, 2 x 3 x 64 x 64 images).",
        "",
        "Each row: the model is quantized; **Conv / Linear / Attention** give quantized/total modules from "
        "`qdetr.quant_summary`; **Kept in float** groups the float layers by the reason the policy gives "
        "(count in brackets); **Distillation capture** is where `capture_co_attention` reads the co-attended "
        "feature of the last decoder layer; **Distribution alignment** is where "
        "`insert_distribution_alignment(student, where=\"self\")` put DA; the **step** is one training step of "
        "the 4-bit student with the model's own loss and labels plus `DistillationLoss` against its float copy "
        "in `FrozenTeacher` (backward and one AdamW step). The step's ground truth is the tiny batch's labels "
        "plus one whole-image box per image: with random weights, student and teacher select unrelated "
        "proposals, and every query overlaps that box, so foreground-aware matching has queries to pair by their "
        "boxes. It passes when the losses are finite, the DRD loss is positive, and the backward reaches the "
        "step sizes of the last decoder layer's quantizers (of the whole model for YOLOS) and the alignment "
        "parameters. **Losses** are the step's figures on this machine (`own` = the model's loss, `loss_drd` = "
        "the distillation term). With random weights, the hybrid encoders of the RT-DETR family and PP-DocLayout "
        "output a memory of about 1e-8 to 1e-18, so their co-attended features and `loss_drd` are tiny on those "
        "rows.",
        "",
        f"**{passed} of {len(rows)} rows pass.** The DETR family is every class of transformers' "
        "(zero-shot) object-detection auto mappings whose config has object queries (`num_queries`) or "
        "detection tokens (`num_detection_tokens`). Deformable DETR appears twice: plain, and two-stage with "
        "box refinement.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += [row.markdown() for row in rows]
    others = other_detection_classes()
    lines += [
        "",
        "Not DETR-family (no object queries), so not in the table: " + ", ".join(f"`{name}`" for name in others) + ".",
        "",
        "The table is kept current by `tests/test_hf_family_matrix.py`, which reruns every row (all columns but "
        "the losses) and checks the class list against the installed transformers.",
        "",
    ]
    return "\n".join(lines)


def parse_rows(text: str) -> dict[str, tuple[str, ...]]:
    """``{first two cells: checked cells}`` of the table rows of a rendered page."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = tuple(cell.strip().replace("\\|", "|") for cell in line.strip().strip("|").split(" | "))
        rows[cells[0] + " " + cells[1]] = cells[: len(CHECKED_COLUMNS)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DOC, help="markdown page to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the page is stale")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = all_rows()
    text = render(rows)
    for row in rows:
        print(f"{row.class_name:40s} {row.tiny_name:28s} {row.step}")
    if args.check:
        stored = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if parse_rows(stored) != parse_rows(text):
            print(f"{args.output} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    with atomic_path(args.output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
