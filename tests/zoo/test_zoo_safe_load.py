"""Safe checkpoint loading: Namespace allowed, anything else refused without running it."""

from __future__ import annotations

import argparse
import collections
import os
import pickle

import pytest
import torch

from qdetr.zoo.safe_load import UnsafeCheckpointError, load_checkpoint_file


class _Payload:
    """A custom class: its global is not on the allow-list."""

    def __init__(self, value):
        self.value = value


class _Exploit:
    """Unpickling this would call ``os.system`` if the loader trusted the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_checkpoint_with_namespace_loads(tmp_path):
    args = argparse.Namespace(n_bit=4, lr=1e-4, dynamic_scale="type3", num_queries=300)
    ckpt = {
        "model": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3), init_state=torch.ones(1)),
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2, 3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "lr_scheduler": {"step_size": 40, "last_epoch": 49},
        "epoch": 49,
        "args": args,
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].n_bit == 4
    assert torch.equal(loaded["model"]["w"], ckpt["model"]["w"])
    assert loaded["model"]["w"].device.type == "cpu"
    assert loaded["epoch"] == 49


def test_custom_class_is_refused_with_its_name(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"model": {}, "extra": _Payload(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"_Payload.*outside the allow-list"):
        load_checkpoint_file(path)


def test_os_system_reduce_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Exploit(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_legacy_pickle_file_with_global_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as f:
        pickle.dump({"args": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.pth")
