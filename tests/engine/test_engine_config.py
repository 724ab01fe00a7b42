"""TrainConfig: YAML/JSON round trip, overrides and validation messages."""

import pytest

from qdetr.engine.config import TrainConfig


def test_yaml_and_json_round_trip(tmp_path):
    config = TrainConfig().with_overrides(["optim.lr=2e-4", "quant.bits=2", "data.transforms.eval_size=96",
                                           "quant.float_checkpoint=fp.pt", "distill.enabled=true"])
    assert config.optim.lr == 2e-4 and config.quant.bits == 2 and config.data.transforms.eval_size == 96
    assert config.distill.use_alignment  # DA follows distillation unless set
    for name in ("run.yaml", "run.json"):
        config.save(tmp_path / name)
        assert TrainConfig.from_file(tmp_path / name) == config


@pytest.mark.parametrize(
    "data, match",
    [
        ({"optim": {"lrr": 1}}, r"unknown key\(s\) \['lrr'\] in section 'optim'"),
        ({"quant": {"bits": 5, "two_stage": True}}, "stage1_epochs"),
        ({"quant": {"bits": 9}}, "quant.bits"),
        ({"distill": {"enabled": True}}, "quantized student"),
        ({"quant": {"bits": 4}, "distill": {"enabled": True}}, "teacher"),
        ({"data": {"dataset": "coco"}}, "data.train_images"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_configs_say_how_to_fix(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def test_override_syntax_error():
    with pytest.raises(ValueError, match="section.key=value"):
        TrainConfig().with_overrides(["optim.lr"])


def test_distill_options_reach_the_loss_config():
    from qdetr.engine import DistillConfig, TrainConfig

    cfg = TrainConfig.from_dict(
        {
            "quant": {"bits": 2, "float_checkpoint": "teacher.pt"},
            "distill": {"enabled": True, "layers": [0, -1], "feature": "proj_out", "one_to_one": True, "qfd_weight": 0.5},
        }
    )
    assert cfg.distill.layers == (0, -1) and cfg.distill.feature == "proj_out"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="distill.feature"):
        DistillConfig(feature="values")
