"""The Hugging Face DETR-family coverage page is current: one test per class reruns its row.

``benchmarks/hf_family_matrix.py`` writes ``docs/hf-family-coverage.md``; here every row is
rebuilt by the same function (tiny offline model, 4-bit quantization, one QAT + distillation
step) and compared with the committed page, all columns but the loss figures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "hf_family_matrix.py"
DOC = ROOT / "docs" / "hf-family-coverage.md"

#: Tiny configs whose step is expected not to pass, with the reason; empty: every class passes.
EXPECTED_NOT_PASSING: dict[str, str] = {}


def _load_script():
    spec = importlib.util.spec_from_file_location("hf_family_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


matrix = _load_script()
COMMITTED = matrix.parse_rows(DOC.read_text(encoding="utf-8"))


def test_page_lists_every_family_class_of_the_installed_transformers():
    family = matrix.family_classes()
    assert {"DetrForObjectDetection", "RTDetrForObjectDetection", "YolosForObjectDetection"} <= set(family)
    assert "OwlViTForObjectDetection" not in family  # no object queries: not DETR-family
    documented = {cells[0].strip("`") for cells in COMMITTED.values()}
    assert documented == set(family), "stale page: run " + matrix.COMMAND
    tiny_classes = {matrix.tiny_class_name(name) for name in TINY_HF_DETR_NAMES}
    for class_name in set(family) - tiny_classes:
        row = matrix.missing_row(class_name)
        assert COMMITTED[f"`{class_name}` no tiny config"] == row.cells()[: len(matrix.CHECKED_COLUMNS)]
    assert len(COMMITTED) == len(TINY_HF_DETR_NAMES) + len(set(family) - tiny_classes)
    text = DOC.read_text(encoding="utf-8")
    assert matrix.COMMAND in text
    passing = len(TINY_HF_DETR_NAMES) - len(EXPECTED_NOT_PASSING)
    assert f"**{passing} of {len(COMMITTED)} rows pass.**" in text


@pytest.mark.parametrize("name", TINY_HF_DETR_NAMES)
def test_row_is_current(name):
    row = matrix.matrix_row(name)
    key = f"`{row.class_name}` `{name}`"
    assert key in COMMITTED, "stale page: run " + matrix.COMMAND
    assert row.cells()[: len(matrix.CHECKED_COLUMNS)] == COMMITTED[key], "stale page: run " + matrix.COMMAND
    if name in EXPECTED_NOT_PASSING:
        assert not row.passed, f"{name} passes now: remove it from EXPECTED_NOT_PASSING"
    else:
        assert row.passed, row.step
        assert row.step.startswith("pass")
        assert row.conv != "-" and row.attention.split("/")[0] == row.attention.split("/")[1]


def test_whole_image_box_is_added_to_each_image():
    import torch

    labels = [{"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]
    (out,) = matrix.with_whole_image_box(labels, 1)
    assert out["class_labels"].tolist() == [2, 0]
    assert out["boxes"].tolist()[-1] == [0.5, 0.5, 1.0, 1.0]
    assert len(matrix.with_whole_image_box(None, 3)) == 3
