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
        ({"quant": {"bits": 9}}, "quant.quantization: bits"),
        ({"quant": {"quantization": {"bits": 4, "stem_bit": 8}}}, r"quant.quantization: unknown QuantConfig fields \['stem_bit'\]"),
        ({"distill": {"loss": {"mu_l2": 1.0}}}, "distill.loss: unknown DistillationConfig fields"),
        ({"model": {"overrides": {"hiden_dim": 32}}}, r"model.overrides: unknown DetrConfig fields \['hiden_dim'\]"),
        ({"config_version": 3}, "config_version 3 is not supported"),
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
    from qdetr.engine import QDetrMethodConfig, TrainConfig

    cfg = TrainConfig.from_dict(
        {
            "quant": {"quantization": {"bits": 2}, "float_checkpoint": "teacher.pt"},
            "distill": {"enabled": True, "loss": {"layers": [0, -1], "feature": "proj_out", "one_to_one": True,
                                                  "qfd_weight": 0.5, "mu_l1": 3.0}},
        }
    )
    assert cfg.distill.loss.layers == (0, -1) and cfg.distill.loss.feature == "proj_out" and cfg.distill.loss.mu_l1 == 3.0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="distill.loss: feature"):
        QDetrMethodConfig(loss={"feature": "values"})


def test_version_1_files_and_names_still_load(tmp_path):
    """A run folder's config.json of qdetr 0.1 (flat quant/distill keys, no config_version)."""
    import json
    import warnings

    v1 = {"output_dir": "runs/w4", "epochs": 2,
          "quant": {"bits": 4, "attn_bits": 8, "profile": "seed", "float_checkpoint": "runs/fp/model_final.pt",
                    "calibration_batches": 1, "two_stage": False, "stage1_epochs": 0,
                    "stage1_keep_float": ["transformer*"], "kernels": "auto"},
          "distill": {"enabled": True, "alignment": None, "teacher_checkpoint": None, "teacher_model": None,
                      "tau": 0.4, "weight": 2.0, "layers": [-1], "feature": "attn_values", "one_to_one": False,
                      "qfd_weight": 0.0}}
    (tmp_path / "config.json").write_text(json.dumps(v1))
    config = TrainConfig.from_file(tmp_path / "config.json")
    assert config.config_version == 2 and config.quant.quantization.profile == "seed" and config.quant.bits == 4
    assert config.distill.loss.tau == 0.4 and config.distill.loss.weight == 2.0
    float_v1 = TrainConfig.from_dict({"quant": {"bits": None, "attn_bits": 8, "profile": "paper"}})
    assert float_v1.quant.quantization is None
    # the old flat --set keys and the old class names keep working
    assert TrainConfig().with_overrides(["quant.bits=3", "distill.tau=0.7"]).quant.bits == 3
    assert config.with_overrides(["quant.bits=null", "distill.enabled=false"]).quant.quantization is None
    from qdetr.engine import config as config_module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = config_module.QuantTrainConfig(bits=2, attn_bits=4, float_checkpoint="fp")
    assert old.quantization.attn_bits == 4 and any(w.category is DeprecationWarning for w in caught)
