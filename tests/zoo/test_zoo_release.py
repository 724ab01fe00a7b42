"""Release checkpoints end to end: loopback download -> safe load -> convert -> packed cache -> predict."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
import torch

import qdetr.zoo as zoo
from qdetr.zoo.commands import add_zoo_commands
from qdetr.zoo.download import cached_file_path
from qdetr.zoo.hub import CONFIG_NAME, WEIGHTS_NAME
from qdetr.zoo.pretrained import converted_cache_dir
from qdetr.zoo.registry import PretrainedEntry, unregister_pretrained

from .helpers import detector_outputs
from .loopback_server import DRIVE_INTERSTITIAL_TEMPLATE, Route, sha256_hex

TINY = "qdetr_smca_tiny"


def _tiny_release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from qdetr.models import model_config
    from qdetr.testing import make_release_state_dict

    return make_release_state_dict(config=model_config(TINY), seed=seed)


def _training_checkpoint_bytes(state, n_bit: int | None) -> bytes:
    """A release file as the training loop writes it (model, optimizer, scheduler, epoch, args)."""
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
            "lr_scheduler": {"last_epoch": 49}, "epoch": 49}
    if n_bit is not None:
        ckpt["args"] = argparse.Namespace(n_bit=n_bit, lr=1e-4, dynamic_scale="type3", quant=True)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


@pytest.fixture
def tiny_entry(qdetr_cache, loopback, monkeypatch):
    """A Drive-hosted tiny release entry served by the loopback server (interstitial + cut transfer)."""
    data = _training_checkpoint_bytes(_tiny_release_state(), n_bit=4)
    monkeypatch.setenv("QDETR_GDRIVE_ENDPOINT", loopback.base_url)
    page = DRIVE_INTERSTITIAL_TEMPLATE.format(name="ckpt_4_bit_tiny.pth", action=loopback.url("/download"),
                                              file_id="TINY4")
    loopback.add("/uc", Route(html=page))
    loopback.add("/download", Route(data=data, confirm_param=("confirm", "t"), truncate_at=len(data) // 3,
                                    truncate_times=1))
    entry = PretrainedEntry(name=f"{TINY}.w4a4attn8_seed_test", bits=4, attn_bits=8,
                            profile="seed", gdrive_id="TINY4", filename="ckpt_4_bit_tiny.pth", box_ap=12.5,
                            box_ap_source="test fixture")
    zoo.register_pretrained(entry)
    yield entry, data
    unregister_pretrained(entry.name)


def test_zoo_name_end_to_end(tiny_entry, loopback, monkeypatch):
    entry, data = tiny_entry
    model = zoo.from_pretrained(entry.name)
    assert not model.training and callable(model.predict) and callable(model.save_pretrained)
    # the download went through the interstitial and resumed the cut transfer
    ranges = [r["range"] for r in loopback.requests_to("/download")]
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 3}-"
    meta = json.loads(cached_file_path(entry.filename, subdir=entry.name).with_name(
        entry.filename + ".meta.json").read_text())
    assert meta["sha256"] == sha256_hex(data) and meta["sha256_source"] == "recorded_on_first_download"
    # converted once into the packed format, with provenance and metrics
    target = converted_cache_dir(entry.name)
    config = json.loads((target / CONFIG_NAME).read_text())
    assert config["name"] == entry.name and config["quantization"]["bits"] == 4
    assert config["provenance"]["source_sha256"] == sha256_hex(data)
    assert config["provenance"]["bits_source"] == "argument" and config["provenance"]["epoch"] == 49
    assert config["provenance"]["args"]["n_bit"] == 4
    assert config["metrics"]["coco_val2017_box_ap"]["value"] == 12.5
    expected = detector_outputs(model)

    # Later loads: offline, no pickle involved, bit-exact.
    def no_pickle(*args, **kwargs):
        raise AssertionError("the converted cache must be used")

    monkeypatch.setattr("qdetr.zoo.release.load_checkpoint_file", no_pickle)
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    requests_before = len(loopback.requests)
    again = zoo.from_pretrained(entry.name)
    assert len(loopback.requests) == requests_before
    got = detector_outputs(again)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_zoo_corrupted_download_caches_nothing(qdetr_cache, loopback, monkeypatch):
    good = _training_checkpoint_bytes(_tiny_release_state(), n_bit=2)
    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF
    url = loopback.add("/files/ckpt_2_bit_tiny.pth", Route(data=bytes(corrupted)))
    entry = PretrainedEntry(name=f"{TINY}.w2a2attn8_corrupt_test", bits=2, url=url,
                            filename="ckpt_2_bit_tiny.pth", sha256=sha256_hex(good))
    zoo.register_pretrained(entry)
    try:
        with pytest.raises(zoo.ChecksumError, match="SHA-256 mismatch"):
            zoo.from_pretrained(entry.name)
    finally:
        unregister_pretrained(entry.name)
    assert not cached_file_path(entry.filename, subdir=entry.name).exists()
    assert not converted_cache_dir(entry.name).exists()


def test_zoo_offline_without_cache_is_a_clear_error(tiny_entry, monkeypatch):
    entry, _ = tiny_entry
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(zoo.OfflineModeError, match="not in the cache"):
        zoo.from_pretrained(entry.name)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_local_release_file_needs_a_bit_width(qdetr_cache, tmp_path):
    path = _write(tmp_path, "release.pth", _training_checkpoint_bytes(_tiny_release_state(), n_bit=None))
    with pytest.raises(zoo.BitWidthError, match="pass bits=2 or bits=4"):
        zoo.load_release_checkpoint(path, model_name=TINY)
    model = zoo.load_release_checkpoint(path, bits=2, model_name=TINY)
    assert model.qdetr_pretrained_config["provenance"]["bits_source"] == "argument"
    with pytest.raises(zoo.BitWidthError, match="contradictory"):
        zoo.load_release_checkpoint(_write(tmp_path, "ckpt_4_bit_x.pth", path.read_bytes()), bits=2,
                                    model_name=TINY)


def test_args_n_bit_is_used_and_conflicts_refused(qdetr_cache, tmp_path):
    path = _write(tmp_path, "trained.pth", _training_checkpoint_bytes(_tiny_release_state(), n_bit=2))
    model = zoo.load_release_checkpoint(path, model_name=TINY)
    assert model.qdetr_pretrained_config["provenance"]["bits_source"] == "args.n_bit"
    from qdetr.quant.api import CONFIG_ATTR

    assert getattr(model, CONFIG_ATTR).bits == 2
    with pytest.raises(zoo.BitWidthError, match="argument=4, args.n_bit=2"):
        zoo.load_release_checkpoint(path, bits=4, model_name=TINY)


def test_conversion_packed_round_trip(qdetr_cache, tmp_path):
    path = _write(tmp_path, "ckpt_4_bit_tiny.pth", _training_checkpoint_bytes(_tiny_release_state(seed=3), n_bit=4))
    model = zoo.load_release_checkpoint(path, model_name=TINY)
    expected = detector_outputs(model)
    out = tmp_path / "packed"
    zoo.save_pretrained(model, out)
    loaded = zoo.from_pretrained(out)
    got = detector_outputs(loaded)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert (out / WEIGHTS_NAME).stat().st_size < path.stat().st_size


def test_bare_state_dict_file(qdetr_cache, tmp_path):
    buffer = io.BytesIO()
    torch.save(_tiny_release_state(), buffer)
    path = _write(tmp_path, "ckpt_2_bit_bare.pth", buffer.getvalue())
    model = zoo.load_release_checkpoint(path, model_name=TINY)
    assert model.qdetr_pretrained_config["provenance"]["bits_source"] == "file name"


class Sneaky:
    """A module-level class: picklable, but not on the loader's allow-list."""


def test_release_file_with_disallowed_global_is_refused(qdetr_cache, tmp_path):
    state = _tiny_release_state()
    path = tmp_path / "ckpt_4_bit_sneaky.pth"
    torch.save({"model": state, "extra": Sneaky()}, path)
    with pytest.raises(zoo.UnsafeCheckpointError, match="Sneaky"):
        zoo.load_release_checkpoint(path, model_name=TINY)


def test_cli_convert(qdetr_cache, tmp_path, capsys):
    path = _write(tmp_path, "ckpt_4_bit_cli.pth", _training_checkpoint_bytes(_tiny_release_state(seed=5), n_bit=4))
    parser = argparse.ArgumentParser(prog="qdetr")
    add_zoo_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(path), str(tmp_path / "out"), "--bits", "4", "--model", TINY])
    assert args.func(args) == 0
    report = capsys.readouterr().out
    assert "4-bit" in report and "model.safetensors" in report
    loaded = zoo.from_pretrained(tmp_path / "out")
    direct = zoo.load_release_checkpoint(path, model_name=TINY)
    assert torch.equal(detector_outputs(loaded)[0], detector_outputs(direct)[0])
    # a non-empty output directory is protected
    args = parser.parse_args(["convert", str(path), str(tmp_path / "out"), "--bits", "4", "--model", TINY])
    assert args.func(args) == 2


@pytest.mark.slow
def test_full_size_release_converts_packs_and_shrinks(qdetr_cache, tmp_path):
    from qdetr.testing import make_release_state_dict, release_manifest_path

    if not release_manifest_path().is_file():
        pytest.skip("shared release manifest not available")
    path = tmp_path / "ckpt_4_bit_smca_detr_coco.pth"
    torch.save({"model": make_release_state_dict(release_manifest_path())}, path)
    model = zoo.load_release_checkpoint(path)
    zoo.save_pretrained(model, tmp_path / "packed")
    ratio = (tmp_path / "packed" / WEIGHTS_NAME).stat().st_size / path.stat().st_size
    assert ratio < 0.26  # measured 0.25x (float-kept layers are 14% of the parameters; docs/zoo.md)
    loaded = zoo.from_pretrained(tmp_path / "packed")
    assert torch.equal(detector_outputs(loaded)[0], detector_outputs(model)[0])


def test_local_release_file_via_from_pretrained_is_cached_packed(qdetr_cache, tmp_path, monkeypatch):
    path = _write(tmp_path, "ckpt_2_bit_local.pth", _training_checkpoint_bytes(_tiny_release_state(seed=7), n_bit=2))
    model = zoo.from_pretrained(path)  # architecture inferred from the shapes, bits from args.n_bit
    assert model.config.hidden_dim == 32 and callable(model.predict)
    expected = detector_outputs(model)
    cached = list((qdetr_cache / "converted").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("local-")

    def no_pickle(*args, **kwargs):
        raise AssertionError("the converted cache must be used")

    import qdetr.zoo.release as release

    original = release.load_checkpoint_file
    monkeypatch.setattr(release, "load_checkpoint_file", no_pickle)
    again = zoo.from_pretrained(path)
    assert torch.equal(detector_outputs(again)[0], expected[0])
    monkeypatch.setattr(release, "load_checkpoint_file", original)
    with pytest.raises(zoo.BitWidthError, match="contradictory"):
        zoo.from_pretrained(path, bits=4)
