"""Q-DETR release (seed) state dicts -> qdetr_smca models (checkpoints.md 2.4-2.7)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from qdetr.models import create_model
from qdetr.models.registry import model_config
from qdetr.zoo.release_format import (
    ReleaseFormatError,
    convert_release_state_dict,
    load_release_state_dict,
    release_config_from_state_dict,
    release_layout_entries,
)
from qdetr.testing import example_inputs, make_release_state_dict

TINY = model_config("qdetr_smca_tiny")


@pytest.fixture
def tiny_release():
    return make_release_state_dict(config=TINY, seed=1)


def test_tiny_release_loads_strict_and_maps_values(tiny_release):
    sd = tiny_release
    converted, report = convert_release_state_dict(sd, bits=4)
    model = create_model("qdetr_smca_tiny", bits=4)
    model.load_state_dict(converted, strict=True)
    p = "transformer.decoder.layers.1"
    assert torch.equal(model.state_dict()[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj.weight"])
    assert torch.equal(model.transformer.decoder.layers[1].self_attn.in_proj_weight_quantizer.scale, sd[f"{p}.self_attn.in_proj.alpha"])
    assert torch.equal(model.transformer.decoder.layers[1].self_attn.prob_quantizer.scale, sd[f"{p}.self_attn.attn_act.alpha"])
    assert model.transformer.decoder.layers[1].self_attn.prob_quantizer.signed.item() == 0
    assert torch.equal(model.transformer.decoder.layers[1].self_attn.q_align.weight, sd[f"{p}.self_attn.norm_q.scale"].reshape(-1))
    assert torch.equal(model.transformer.decoder.layers[1].self_attn.q_align.bias, sd[f"{p}.self_attn.norm_q.bias"])
    lin2 = model.transformer.encoder.layers[0].linear2
    assert torch.equal(lin2.input_quantizer.zero_point, sd["transformer.encoder.layers.0.linear2.act.zero_point"])
    assert lin2.input_quantizer.signed.item() == 0 and lin2.input_quantizer.is_initialized
    stem = model.backbone[0].body.conv1
    assert torch.equal(stem.weight_quantizer.scale, sd["backbone.0.body.conv1.alpha"])
    assert stem.input_quantizer.signed.item() == 1
    block = model.backbone[0].body.layer2[0]
    assert torch.equal(block.bias11.bias, sd["backbone.0.body.layer2.0.bias11.bias"])
    assert torch.equal(block.conv2.bias, sd["backbone.0.body.layer2.0.conv2.bias"])
    # Report: 2 aliases per attention (1 enc + 2x2 dec = 5), 16 dead modules for this size.
    assert len(report.dropped_aliases) == 10
    assert report.num_dead_modules == 5 * 2 + 3 * 2
    assert sorted(report.dropped_other) == [f"transformer.decoder.layers.{i}.self_attn.norm_q.init_state" for i in range(2)]
    assert report.warnings == []
    # Everything not loaded is accounted for.
    assert len(converted) + len(report.ignored) == len(sd)
    model.eval()
    with torch.no_grad():
        out = model(*example_inputs(3))
    assert torch.isfinite(out["pred_logits"]).all()


def test_loaded_model_runs_without_calibration_in_float64(tiny_release):
    model, report = load_release_state_dict(tiny_release, bits=2)
    assert report.config == TINY
    model.double()
    with torch.no_grad():
        a = model(*example_inputs(2, dtype=torch.float64))
        b = model(*example_inputs(2, dtype=torch.float64))
    assert torch.equal(a["pred_logits"], b["pred_logits"])  # deterministic, no re-calibration


def test_inferred_config(tiny_release):
    cfg = release_config_from_state_dict({"model": tiny_release})
    assert cfg == TINY


def test_dead_quantizer_table_matches_manifest(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    expected = set()
    for entry in manifest["dead_quantizers"]:
        module = re.escape(entry["module"]).replace(r"\{i\}", r"\d+")
        for key in (e["key"] for e in manifest["entries"]):
            mod, _, leaf = key.rpartition(".")
            if re.fullmatch(module, mod) and leaf in entry["unused_keys"]:
                expected.add(key)
    assert sum(e["count"] for e in manifest["dead_quantizers"]) == 54
    from qdetr.zoo.release_format import _dead_reason

    ours = {e["key"] for e in manifest["entries"] if _dead_reason(e["key"]) is not None}
    assert ours == expected
    # The layout generator reproduces the manifest (keys, order, shapes, flag values).
    mine = [(e["key"], e["shape"], e.get("value")) for e in release_layout_entries()]
    assert mine == [(e["key"], e["shape"], e.get("value")) for e in manifest["entries"]]


def _flag(sd, key, value):
    sd = dict(sd)
    sd[key] = torch.full((1,), float(value))
    return sd


def test_refuses_uncalibrated_quantizer(tiny_release):
    sd = _flag(tiny_release, "transformer.encoder.layers.0.linear1.act.init_state", 0)
    with pytest.raises(ReleaseFormatError, match="never calibrated"):
        convert_release_state_dict(sd, bits=4)


def test_refuses_quantized_cross_attention(tiny_release):
    sd = _flag(tiny_release, "transformer.decoder.layers.0.multihead_attn.in_proj.init_state", 1)
    with pytest.raises(ReleaseFormatError, match="cross-attention projections"):
        convert_release_state_dict(sd, bits=4)


def test_value_checks(tiny_release):
    sd = _flag(tiny_release, "transformer.decoder.layers.0.self_attn.q_act.signed", 2)
    with pytest.raises(ReleaseFormatError, match="signed must be 0 or 1"):
        convert_release_state_dict(sd, bits=4)
    sd = dict(tiny_release)
    sd["transformer.encoder.layers.0.linear1.alpha"] = -sd["transformer.encoder.layers.0.linear1.alpha"]
    with pytest.raises(ReleaseFormatError, match="finite and > 0"):
        convert_release_state_dict(sd, bits=4)
    sd = dict(tiny_release)
    sd["backbone.0.body.bn1.running_var"] = torch.zeros_like(sd["backbone.0.body.bn1.running_var"])
    with pytest.raises(ReleaseFormatError, match="running_var"):
        convert_release_state_dict(sd, bits=4)
    # Dead entries may hold anything: NaN steps there are ignored.
    sd = dict(tiny_release)
    sd["transformer.encoder.layers.0.self_attn.in_proj.act.alpha"] = torch.full_like(
        sd["transformer.encoder.layers.0.self_attn.in_proj.act.alpha"], float("nan")
    )
    convert_release_state_dict(sd, bits=4)


def test_alias_mismatch_and_key_errors(tiny_release):
    sd = dict(tiny_release)
    sd["transformer.encoder.layers.0.self_attn.in_proj_weight"] = sd["transformer.encoder.layers.0.self_attn.in_proj.weight"] + 1
    with pytest.raises(ReleaseFormatError, match="same tensor"):
        convert_release_state_dict(sd, bits=4)
    sd = dict(tiny_release)
    del sd["transformer.decoder.layers.1.linear2.act.signed"]
    sd["transformer.decoder.layers.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ReleaseFormatError, match=r"missing: \[transformer\.decoder\.layers\.\{i\}\.linear2\.act\.signed\].*extra"):
        convert_release_state_dict(sd, bits=4)
    with pytest.raises(ReleaseFormatError, match="bits must be 2, 3 or 4"):
        convert_release_state_dict(tiny_release, bits=8)
    with pytest.raises(ReleaseFormatError, match="not a Q-DETR release"):
        convert_release_state_dict(create_model("smca_detr_tiny").state_dict(), bits=4)


def test_signed_pattern_and_identical_query_halves_warn(tiny_release):
    sd = _flag(tiny_release, "transformer.encoder.layers.0.linear2.act.signed", 1)
    q = sd["query_embed.weight"].clone()
    q[:, 32:] = q[:, :32]
    sd["query_embed.weight"] = q
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, report = convert_release_state_dict(sd, bits=4)
    assert len(report.warnings) == 2 and len(caught) == 2
    assert converted["transformer.encoder.layers.0.linear2.input_quantizer.signed"].item() == 1  # stored flag used


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_full_release_manifest_loads_into_qdetr_smca_r50(manifest_path, bits):
    sd = make_release_state_dict(manifest_path, seed=bits)
    assert len(sd) == 1755
    model = create_model("qdetr_smca_r50", bits=bits, profile="seed")
    model, report = load_release_state_dict(sd, bits=bits, model=model)
    assert report.num_dead_modules == 54
    assert len(report.dropped_aliases) == 36
    assert report.config == model_config("qdetr_smca_r50")
    lin = model.transformer.encoder.layers[3].linear1
    assert lin.weight_quantizer.bits == bits and lin.input_quantizer.bits == bits
    assert torch.equal(lin.weight_quantizer.scale, sd["transformer.encoder.layers.3.linear1.alpha"])
