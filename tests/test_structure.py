"""Package structure: import layering, one resolver for every model source, one DA placement."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "qdetr"


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('qdetr'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_importing_models_does_not_import_the_zoo_quant_or_engine():
    loaded = _imported_after("import qdetr.models")
    assert "qdetr.models" in loaded
    assert not {m for m in loaded if m.startswith(("qdetr.zoo", "qdetr.engine", "qdetr.quant", "qdetr.distill"))}


def test_distill_imports_neither_models_nor_quant():
    loaded = _imported_after("import qdetr.distill")
    assert not {m for m in loaded if m.startswith(("qdetr.models", "qdetr.quant", "qdetr.zoo"))}


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_models_never_import_the_zoo_at_module_level():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(n for n in _module_level_imports(path) if n.startswith("qdetr.zoo"))
        for path in (PACKAGE / "models").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_one_resolver_reads_a_legacy_run_folder(tmp_path):
    from qdetr.engine.model_files import save_model_file
    from qdetr.models import create_model
    from qdetr.quant import QuantConfig, calibrate, quantize_model
    from qdetr.zoo import resolve_model

    model = quantize_model(create_model("detr_tiny", num_classes=5), config=QuantConfig(bits=4))
    from qdetr.distill import insert_distribution_alignment

    insert_distribution_alignment(model, where="cross")
    pixel_values = torch.rand(1, 3, 64, 64)
    calibrate(model.eval(), [pixel_values])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        save_model_file(tmp_path / "model_final.pt", model, model_name="detr_tiny", model_config={}, num_classes=5,
                        quant=QuantConfig(bits=4).to_dict(), alignment=True, categories={1: "cat"},
                        preprocessing={"eval_size": 64, "max_size": None, "mean": [0.5] * 3, "std": [0.25] * 3})
    loaded = resolve_model(tmp_path)  # a qdetr 0.1 run folder
    assert loaded.id2label == {1: "cat"}
    assert loaded.qdetr_pretrained_config["preprocessing"]["shortest_edge"] == 64
    assert loaded.qdetr_pretrained_config["preprocessing"]["image_mean"] == [0.5] * 3
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values)["pred_logits"], model(pixel_values)["pred_logits"])
    # and it saves as a standard directory that loads back the same
    repacked = resolve_model(loaded.save_pretrained(tmp_path / "packed"))
    with torch.no_grad():
        assert torch.equal(repacked(pixel_values)["pred_logits"], model(pixel_values)["pred_logits"])


def test_resolver_rejects_files_it_cannot_read(tmp_path):
    from qdetr.errors import ConfigError
    from qdetr.zoo import resolve_model

    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="pass the directory"):
        resolve_model(tmp_path / "weights.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="expected a run folder"):
        resolve_model(tmp_path / "notes.txt")


def test_foreign_modules_get_the_same_mixin_as_qdetr_models():
    from qdetr.models import create_model
    from qdetr.models.pretrained_methods import PretrainedMethodsMixin
    from qdetr.zoo import attach_pretrained_methods

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = create_model("detr_tiny")
            self.config = self.inner.config

        def forward(self, pixel_values, pixel_mask=None):
            return self.inner(pixel_values, pixel_mask)

    first, second = attach_pretrained_methods(Wrapper()), attach_pretrained_methods(Wrapper())
    assert isinstance(first, PretrainedMethodsMixin) and isinstance(first, Wrapper)
    assert type(first) is type(second)  # one subclass per class, not per instance
    assert "predict" not in vars(first)  # methods come from the class
    detections = first.predict(torch.rand(3, 64, 64), threshold=0.0)
    assert detections[0]["boxes"].shape == (10, 4)


@pytest.mark.parametrize("profile,slot", [("seed", "self_attn"), ("paper", "multihead_attn")])
def test_builder_and_trainer_place_alignment_in_the_same_slot(profile, slot):
    from qdetr.distill.alignment import alignment_slots, insert_distribution_alignment
    from qdetr.models import build_qdetr_smca, create_model, model_config

    built = alignment_slots(build_qdetr_smca(model_config("qdetr_smca_tiny"), bits=4, profile=profile))
    float_model = create_model("smca_detr_tiny")
    insert_distribution_alignment(float_model, profile=profile)  # what the trainer calls
    assert alignment_slots(float_model) == built
    assert all(s["module"].endswith(slot) for s in built) and all(s["unbiased"] == (profile == "seed") for s in built)
