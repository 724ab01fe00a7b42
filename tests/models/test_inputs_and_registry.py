"""Bad inputs, registry behaviour and config serialisation."""

from __future__ import annotations

import pytest
import torch

from qdetr.models import DetrConfig, SmcaConfig, config_from_dict, create_model, list_models, register_model
from qdetr.models.registry import model_config


@pytest.fixture(scope="module")
def model():
    return create_model("detr_tiny").eval()


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        model(torch.randn(1, 64, 64, 3))


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 64, 64))


def test_mask_image_mismatch(model):
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 64, 60))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.randn(2, 3, 64, 64), torch.ones(1, 64, 64))


def test_non_batched_and_integer_images(model):
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'detr_r5'.*detr_r50"):
        create_model("detr_r5")


def test_unknown_override():
    with pytest.raises(ValueError, match="unknown DetrConfig fields \\['num_class'\\]"):
        create_model("detr_tiny", num_class=3)


def test_list_models_and_duplicates():
    names = list_models()
    for name in ("detr_r50", "detr_r101", "smca_detr_r50", "detr_tiny", "smca_detr_tiny"):
        assert name in names
    assert list_models("*tiny") == [n for n in names if n.endswith("tiny")]
    with pytest.raises(ValueError, match="already registered"):
        register_model("detr_tiny")(lambda **kw: None)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by nheads"):
        DetrConfig(hidden_dim=30, nheads=4)
    with pytest.raises(ValueError, match="backbone must be one of"):
        DetrConfig(backbone="resnet34")
    with pytest.raises(ValueError, match="dynamic_scale"):
        SmcaConfig(dynamic_scale="type5")


def test_config_round_trip():
    for cfg in (model_config("detr_r50"), model_config("smca_detr_tiny"), SmcaConfig(query_width=512)):
        data = cfg.to_dict()
        assert data["arch"] in ("detr", "smca") and data["version"] == 1
        assert config_from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown SmcaConfig fields"):
        SmcaConfig.from_dict({"arch": "smca", "bogus": 1})
    with pytest.raises(ValueError, match="arch 'smca'"):
        DetrConfig.from_dict(SmcaConfig().to_dict())


def test_constructors_do_not_download(monkeypatch):
    import torch.hub

    def fail(*args, **kwargs):
        raise AssertionError("a constructor tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    create_model("detr_tiny")
    create_model("smca_detr_tiny")
