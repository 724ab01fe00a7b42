"""Trainer: loss goes down, exact resume, QAT / distillation / two-stage runs, bad checkpoints."""

import json

import pytest
import torch

from qdetr.engine import Trainer
from qdetr.engine.checkpoint import load_checkpoint, save_checkpoint_atomic
from qdetr.engine.optim import build_param_groups
from qdetr.engine.config import OptimConfig

from .conftest import tiny_config


@pytest.fixture(scope="module")
def float_model_file(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("float")
    result = Trainer(tiny_config(out, synthetic_root, max_steps=2, final_eval=False)).fit()
    return result.model_path


def _weights(path):
    """State dict of a checkpoint file or of a run's final model (a save_pretrained directory)."""
    if path.is_dir():
        from qdetr.zoo import resolve_model

        return resolve_model(path).state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_training_reduces_loss_on_a_fixed_batch(tmp_path, synthetic_root):
    config = tiny_config(
        tmp_path,
        synthetic_root,
        epochs=30,
        final_eval=False,
        data={"max_train_images": 4, "batch_size": 4,
              "transforms": {"train_scales": [64], "random_crop": False, "hflip_prob": 0.0, "max_size": None, "eval_size": 64}},
        model={"name": "detr_tiny", "overrides": {"hidden_dim": 32, "dim_feedforward": 64, "dropout": 0.0}},
        optim={"lr": 1e-3, "lr_backbone": 1e-3},
    )
    result = Trainer(config).fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert result.global_step == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["float", "qat_distill"])
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, synthetic_root, float_model_file, mode):
    extra = {}
    if mode == "qat_distill":
        extra = {"quant": {"bits": 2, "float_checkpoint": str(float_model_file)}, "distill": {"enabled": True}}
    # 8 images / batch 2 = 4 steps per epoch: step 6 is in the second epoch
    full = tiny_config(tmp_path / "full", synthetic_root, epochs=2, max_steps=6, final_eval=False, **extra)
    Trainer(full).fit()
    part = tiny_config(tmp_path / "part", synthetic_root, epochs=2, max_steps=3, final_eval=False, **extra)
    Trainer(part).fit()
    state = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, 3, 3)
    resumed = Trainer(tiny_config(tmp_path / "part", synthetic_root, epochs=2, max_steps=6, final_eval=False, **extra)).fit()
    assert resumed.global_step == 6
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "part" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # and the run really moved away from its starting point
    start = _weights(float_model_file)
    assert any(not torch.equal(a[k], start[k]) for k in start if k in a)


def test_qat_distillation_run_writes_a_quantized_model(tmp_path, synthetic_root, float_model_file):
    config = tiny_config(
        tmp_path, synthetic_root, max_steps=2, quant={"bits": 4, "float_checkpoint": str(float_model_file)},
        distill={"enabled": True, "weight": 2.0},
    )
    result = Trainer(config).fit()
    assert 0.0 <= result.eval.ap <= 1.0 and result.eval.eval_batch_size == 1 and result.eval.num_images == 4
    assert "loss_drd" in result.losses
    from qdetr.zoo import resolve_model

    model = resolve_model(tmp_path)  # the run folder
    spec = model.qdetr_pretrained_config
    assert spec["quantization"]["bits"] == 4 and spec["preprocessing"]["shortest_edge"] == 64
    # the paper profile puts DA on the decoder cross-attention, as the builder does
    assert [slot["module"].rsplit(".", 1)[-1] for slot in spec["alignment"]] == ["multihead_attn"] * 2
    state = model.state_dict()
    assert any(k.endswith("weight_quantizer.scale") for k in state)
    assert any(".q_align." in k for k in state)  # distribution alignment is part of the model
    assert all(int(v) == 1 for k, v in state.items() if k.endswith(".initialized"))  # calibrated
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"event", "train", "eval"}


def test_two_stage_recipe_quantizes_backbone_first(tmp_path, synthetic_root, float_model_file):
    config = tiny_config(
        tmp_path, synthetic_root, epochs=2, final_eval=False,
        quant={"bits": 4, "float_checkpoint": str(float_model_file), "two_stage": True, "stage1_epochs": 1},
    )
    stage1 = Trainer(config.with_overrides(["max_steps=2"]))
    stage1.fit()
    stage1_keys = set(_weights(tmp_path / "checkpoint.pt"))
    assert any(k.startswith("backbone.") and "_quantizer" in k for k in stage1_keys)
    assert not any(k.startswith("transformer.") and "_quantizer" in k for k in stage1_keys)
    result = Trainer(config).fit()  # resumes inside stage 1, then switches to stage 2
    assert result.epochs_done == 2
    final = _weights(result.model_path)
    assert any(k.startswith("transformer.") and "_quantizer" in k for k in final)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "stage2" for r in events)


def test_float_checkpoint_of_another_architecture_is_rejected(tmp_path, synthetic_root, float_model_file):
    config = tiny_config(
        tmp_path, synthetic_root, max_steps=1,
        model={"name": "detr_tiny", "overrides": {"hidden_dim": 64, "dim_feedforward": 64}},
        quant={"bits": 4, "float_checkpoint": str(float_model_file)},
    )
    with pytest.raises(ValueError, match="does not fit the model.*shape mismatches"):
        Trainer(config).fit()


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_param_groups_separate_backbone_and_quantizer_parameters():
    from qdetr.models import create_model
    from qdetr.quant import quantize_model

    model = quantize_model(create_model("detr_tiny", num_classes=5), bits=4)
    groups = {g["name"]: g for g in build_param_groups(model, OptimConfig(lr=1e-4, lr_backbone=1e-5, weight_decay=0.1))}
    assert groups["backbone_decay"]["lr"] == 1e-5 and groups["main_decay"]["lr"] == 1e-4
    assert groups["main_quantizer"]["weight_decay"] == 0.0 and groups["main_no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("_quantizer." in names[id(p)] for p in groups["main_quantizer"]["params"])
    assert all(names[id(p)].startswith("backbone.") for g in groups.values() if g["name"].startswith("backbone") for p in g["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)
