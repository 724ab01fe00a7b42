"""qdetr format: save_pretrained -> from_pretrained, config.json, model card, Hub cache, push_to_hub."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from huggingface_hub import metadata_load

import qdetr.zoo as zoo
from qdetr.quant.api import CONFIG_ATTR
from qdetr.zoo.hub import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, load_pretrained_dir, save_pretrained
from qdetr.zoo.packed_state import packed_weight_names

from .helpers import detector_outputs, tiny_quantized_smca


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_save_load_round_trip_bit_exact(tmp_path, bits):
    model = tiny_quantized_smca(bits)
    expected = detector_outputs(model)
    save_pretrained(model, tmp_path / "m")
    loaded = zoo.from_pretrained(tmp_path / "m")
    assert not loaded.training
    got = detector_outputs(loaded)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # every weight the model quantizes was stored packed
    packed = packed_weight_names(tmp_path / "m" / WEIGHTS_NAME)
    assert "backbone.0.body.layer1.0.conv2.weight" in packed
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in packed
    assert "transformer.decoder.layers.0.multihead_attn.in_proj_weight" not in packed  # float in the seed profile


def test_float64_round_trip_bit_exact(tmp_path):
    model = tiny_quantized_smca(4, dtype=torch.float64)
    expected = detector_outputs(model)
    save_pretrained(model, tmp_path / "m64")
    loaded = load_pretrained_dir(tmp_path / "m64")
    assert next(loaded.parameters()).dtype == torch.float64
    got = detector_outputs(loaded)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_config_json_records_architecture_quantization_and_labels(tmp_path):
    model = tiny_quantized_smca(4)
    save_pretrained(model, tmp_path / "m", provenance={"source_format": "test"},
                    metrics={"coco_val2017_box_ap": {"value": 1.5, "source": "made up"}})
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION and config["library_name"] == "qdetr"
    assert config["qdetr_version"]
    assert config["architecture"] == model.config.to_dict()
    assert config["quantization"] == getattr(model, CONFIG_ATTR).to_dict()
    assert config["quantization"]["bits"] == 4 and config["quantization"]["profile"] == "seed"
    assert [s["module"] for s in config["alignment"]] == [
        f"transformer.decoder.layers.{i}.self_attn" for i in range(model.config.dec_layers)]
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(model.config.num_classes)}
    assert config["provenance"] == {"source_format": "test"}
    assert config["weights"]["packed_weights"] == len(packed_weight_names(tmp_path / "m" / WEIGHTS_NAME))
    loaded = zoo.from_pretrained(tmp_path / "m")
    assert loaded.id2label[0] == "LABEL_0"
    # Re-saving a loaded model keeps provenance and metrics.
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert again["provenance"] == config["provenance"] and again["metrics"] == config["metrics"]


def test_model_card(tmp_path):
    model = tiny_quantized_smca(2)
    save_pretrained(model, tmp_path / "m", base_model="org/smca-detr-r50-fp32", repo_id="org/qdetr-tiny-w2",
                    metrics={"coco_val2017_box_ap": {"value": 32.4, "source": "release README"}})
    card_path = tmp_path / "m" / "README.md"
    meta = metadata_load(card_path)
    assert meta["library_name"] == "qdetr" and meta["pipeline_tag"] == "object-detection"
    assert {"object-detection", "vision", "qat", "2-bit"} <= set(meta["tags"])
    assert meta["base_model"] == "org/smca-detr-r50-fp32" and meta["license"] == "apache-2.0"
    text = card_path.read_text()
    for needle in ("## Model description", "## Quantization", "## How to use", "## Evaluation results",
                   'qdetr.from_pretrained("org/qdetr-tiny-w2")', "no speed-up", "integer kernels",
                   "Q-DETR: An Efficient Low-Bit Quantized Detection Transformer",
                   "Spatially Modulated Co-Attention", "| 32.4 |"):
        assert needle in text, needle
    # the table is computed from the model: the float cross-attention and heads show as FP
    assert "| `transformer.decoder.layers.*.multihead_attn` | 2 | FP | FP | 8 |" in text
    assert "| `class_embed` | 1 | FP | FP | - |" in text


def test_packed_file_is_smaller_than_float_state_dict(tmp_path):
    model = tiny_quantized_smca(2)
    save_pretrained(model, tmp_path / "m")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert (tmp_path / "m" / WEIGHTS_NAME).stat().st_size < 0.5 * buffer.tell()


def test_float_model_round_trip(tmp_path):
    from qdetr.models import create_model

    torch.manual_seed(0)
    model = create_model("smca_detr_tiny").eval()
    save_pretrained(model, tmp_path / "fp")
    config = json.loads((tmp_path / "fp" / CONFIG_NAME).read_text())
    assert config["quantization"] is None and config["weights"]["packed_weights"] == 0
    loaded = zoo.from_pretrained(tmp_path / "fp")
    assert torch.equal(detector_outputs(loaded)[0], detector_outputs(model)[0])


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zoo.from_pretrained(tmp_path / "empty")


def test_newer_format_version_refused(tmp_path):
    save_pretrained(tiny_quantized_smca(4), tmp_path / "m")
    path = tmp_path / "m" / CONFIG_NAME
    config = json.loads(path.read_text())
    config["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade qdetr"):
        zoo.from_pretrained(tmp_path / "m")


def _fill_hub_cache(cache_dir, repo_id, commit, source_dir, ref="main"):
    """Lay files out exactly as huggingface_hub's cache does (blobs, snapshots, refs)."""
    import hashlib

    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in source_dir.iterdir():
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 for this test, also in huggingface_hub's import-time constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hub-cache"


def test_hub_repo_from_prefilled_cache_offline(tmp_path, hub_offline):
    model = tiny_quantized_smca(4)
    expected = detector_outputs(model)
    save_pretrained(model, tmp_path / "export")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fill_hub_cache(hub_offline, "qdetr-test/smca-tiny-w4", commit, tmp_path / "export")

    loaded = zoo.from_pretrained("qdetr-test/smca-tiny-w4", cache_dir=hub_offline)
    assert torch.equal(detector_outputs(loaded)[0], expected[0])
    pinned = zoo.from_pretrained("hf-hub:qdetr-test/smca-tiny-w4", revision=commit, cache_dir=hub_offline)
    assert torch.equal(detector_outputs(pinned)[1], expected[1])
    with pytest.raises(zoo.OfflineModeError, match="not in the Hugging Face cache"):
        zoo.from_pretrained("qdetr-test/not-cached", cache_dir=hub_offline)


def test_hub_zoo_entry_offline(tmp_path, hub_offline):
    from qdetr.zoo.registry import unregister_pretrained

    save_pretrained(tiny_quantized_smca(3), tmp_path / "export")
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    _fill_hub_cache(hub_offline, "qdetr-test/own-w3", commit, tmp_path / "export")
    entry = zoo.PretrainedEntry(name="qdetr_smca_tiny.w3a3attn8_test", bits=3, attn_bits=8,
                                profile="seed", hf_hub_id="qdetr-test/own-w3")
    zoo.register_pretrained(entry)
    try:
        model = zoo.from_pretrained("qdetr_smca_tiny.w3a3attn8_test", cache_dir=hub_offline)
        assert getattr(model, CONFIG_ATTR).bits == 3
    finally:
        unregister_pretrained(entry.name)


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    model = zoo.attach_pretrained_methods(tiny_quantized_smca(4))
    assert model.push_to_hub("me/qdetr-tiny", private=True) == "commit-info"
    assert calls["create_repo"] == ("me/qdetr-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == ["README.md", "config.json",
                                                                        "model.safetensors"]
    assert 'from_pretrained("me/qdetr-tiny")' in (tmp_path / "uploaded" / "README.md").read_text()
    loaded = zoo.from_pretrained(tmp_path / "uploaded")
    assert torch.equal(detector_outputs(loaded)[0], detector_outputs(model)[0])
