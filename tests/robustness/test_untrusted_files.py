"""Untrusted model files: crafted sizes fail fast and small, damaged files give a CheckpointError."""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import pytest
import torch

from qdetr.errors import CheckpointError
from qdetr.models import create_model, model_config
from qdetr.testing import make_release_state_dict
from qdetr.zoo import load_checkpoint_file, load_pretrained_dir, load_release_checkpoint, save_pretrained
from qdetr.zoo.release import BitWidthError

from .harness import Case, check_case, ids

TINY = model_config("qdetr_smca_tiny")


def _release_state() -> dict[str, torch.Tensor]:
    return make_release_state_dict(config=TINY)


def _save_release(path, state=None, **extra) -> None:
    torch.save({"model": state if state is not None else _release_state(), **extra}, path)


def _crafted_release(workdir) -> None:
    state = _release_state()
    state["transformer.encoder.layers.300000.foo"] = torch.zeros(1)
    state["padding"] = torch.zeros(200_000)  # about 1 MB on disk
    _save_release(workdir / "ckpt_4_bit_crafted.pth", state)


def _release_with(workdir, name: str, edit) -> None:
    state = _release_state()
    edit(state)
    _save_release(workdir / name, state)


def _saved_tiny(workdir) -> None:
    save_pretrained(create_model("detr_tiny"), workdir / "model")


def _edit_config(workdir, **architecture) -> None:
    _saved_tiny(workdir)
    path = workdir / "model" / "config.json"
    config = json.loads(path.read_text())
    config["architecture"].update(architecture)
    path.write_text(json.dumps(config))


def _nan_weights(workdir) -> None:
    model = create_model("detr_tiny")
    with torch.no_grad():
        model.class_embed.weight[0, 0] = float("nan")
    save_pretrained(model, workdir / "model")


def _write(name: str, data: bytes):
    def setup(workdir):
        (workdir / name).write_bytes(data)

    return setup


def _truncated_pth(workdir) -> None:
    _save_release(workdir / "whole.pth")
    data = (workdir / "whole.pth").read_bytes()
    (workdir / "whole.pth").unlink()
    (workdir / "ckpt_4_bit_cut.pth").write_bytes(data[: len(data) // 2])


def _release_args(n_bit):
    def setup(workdir):
        _save_release(workdir / "release.pth", args=argparse.Namespace(n_bit=n_bit))

    return setup


CASES = [
    Case("release .pth with layer index 300000", lambda d: load_release_checkpoint(d / "ckpt_4_bit_crafted.pth"),
         CheckpointError, "layer index 300000", _crafted_release),
    Case("release .pth with layer indices that skip", lambda d: load_release_checkpoint(d / "ckpt_4_bit_gap.pth"),
         CheckpointError, "not contiguous",
         lambda d: _release_with(d, "ckpt_4_bit_gap.pth", lambda s: s.update(
             {"transformer.encoder.layers.7.linear1.weight": torch.zeros(1)}))),
    Case("release .pth whose entries are not tensors", lambda d: load_release_checkpoint(d / "ckpt_4_bit_ints.pth"),
         CheckpointError, "tensors",
         lambda d: torch.save({"model": {"transformer.decoder.norm.weight": 3}}, d / "ckpt_4_bit_ints.pth")),
    Case("release .pth with a 0-dim hidden size", lambda d: load_release_checkpoint(d / "ckpt_4_bit_0d.pth"),
         CheckpointError, "inconsistent shapes",
         lambda d: _release_with(d, "ckpt_4_bit_0d.pth", lambda s: s.update(
             {"transformer.decoder.norm.weight": torch.tensor(1.0)}))),
    Case("release .pth with NaN steps", lambda d: load_release_checkpoint(d / "ckpt_4_bit_nan.pth"),
         CheckpointError, "finite",
         lambda d: _release_with(d, "ckpt_4_bit_nan.pth", lambda s: s[
             "transformer.encoder.layers.0.linear1.alpha"].fill_(float("nan")))),
    Case("release .pth with args.n_bit = 4.9", lambda d: load_release_checkpoint(d / "release.pth"),
         BitWidthError, "4.9", _release_args(4.9)),
    Case("release .pth with args.n_bit = 'four'", lambda d: load_release_checkpoint(d / "release.pth"),
         BitWidthError, "not a bit width", _release_args("four")),
    Case("empty .pth", lambda d: load_checkpoint_file(d / "empty.pth"), CheckpointError, "empty",
         _write("empty.pth", b"")),
    Case("truncated .pth", lambda d: load_release_checkpoint(d / "ckpt_4_bit_cut.pth"), CheckpointError,
         "truncated", _truncated_pth),
    Case("text file named .pth", lambda d: load_checkpoint_file(d / "notes.pth"), CheckpointError,
         "not a readable PyTorch checkpoint", _write("notes.pth", b"hello, this is not a checkpoint\n" * 10)),
    Case("HTML page saved as .pth", lambda d: load_checkpoint_file(d / "page.pth"), CheckpointError,
         "delete it", _write("page.pth", b"<!DOCTYPE html><html><body>Sign in</body></html>")),
    Case("config.json with enc_layers 300000", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
         "enc_layers = 300000", lambda d: _edit_config(d, enc_layers=300000)),
    Case("config.json with num_queries 10**9", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
         "num_queries", lambda d: _edit_config(d, num_queries=10**9)),
    Case("config.json with hidden_dim as a string", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
         "hidden_dim must be a positive integer", lambda d: _edit_config(d, hidden_dim="256")),
    Case("config.json larger than its weights can hold", lambda d: load_pretrained_dir(d / "model"),
         CheckpointError, "do not belong together",
         lambda d: _edit_config(d, hidden_dim=512, nheads=8, dim_feedforward=2048, enc_layers=6, dec_layers=6)),
    Case("config.json that is not JSON", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
         "not valid JSON", lambda d: (_saved_tiny(d), (d / "model" / "config.json").write_bytes(b"\x00\xffgarbage"))),
    Case("config.json of another library", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
         "not a qdetr config", lambda d: (_saved_tiny(d), (d / "model" / "config.json").write_text('{"a": 1}'))),
    Case("weights with NaN", lambda d: load_pretrained_dir(d / "model"), CheckpointError, "NaN", _nan_weights),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_untrusted_file_is_refused_clearly(case, tmp_path):
    check_case(case, tmp_path)


def test_crafted_1mb_file_fails_fast_and_small(tmp_path):
    """Before the bounds: > 4 GB and still running after 50 s. Now: well under 1 s and 100 MB."""
    _crafted_release(tmp_path)
    path = tmp_path / "ckpt_4_bit_crafted.pth"
    assert 0.8e6 < path.stat().st_size < 2e6
    load_checkpoint_file(path)  # warm up torch.load's lazy imports: time the checks, not the first import
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="300000"):
        load_release_checkpoint(path)
    seconds = time.perf_counter() - start  # about 0.1 s on one core
    tracemalloc.start()  # memory in a second run: tracing slows the call several times
    try:
        with pytest.raises(CheckpointError, match="300000"):
            load_release_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 0.5, seconds
    assert peak < 100e6, peak


def test_bounds_do_not_refuse_real_layouts():
    from qdetr.zoo.size_limits import check_architecture_bounds, check_layer_indices

    for name in ("detr_r50", "smca_detr_r50", "qdetr_smca_r50"):
        check_architecture_bounds(model_config(name).to_dict(), source=name)
    check_layer_indices(_release_state().keys(), source="tiny release")


def _crafted_training_checkpoint(workdir) -> None:
    from qdetr.zoo.hub import model_config_dict

    model = create_model("detr_tiny")
    spec = model_config_dict(model)
    spec["architecture"]["enc_layers"] = 300000
    torch.save({"model": model.state_dict(), "model_spec": spec}, workdir / "checkpoint.pt")


def test_crafted_training_checkpoint_is_refused_before_building(tmp_path):
    from qdetr.zoo.run_files import load_training_checkpoint

    check_case(Case("checkpoint.pt whose model_spec declares 300000 encoder layers",
                    lambda d: load_training_checkpoint(d / "checkpoint.pt"), CheckpointError, "enc_layers = 300000",
                    _crafted_training_checkpoint), tmp_path)


def _cut_weights(workdir) -> None:
    _saved_tiny(workdir)
    weights = workdir / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    check_case(Case("model.safetensors cut short", lambda d: load_pretrained_dir(d / "model"), CheckpointError,
                    "truncated or damaged", _cut_weights), tmp_path)
