"""Resuming a run with changed settings is refused (naming the fields) before config.json is touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qdetr.engine.trainer import Trainer
from qdetr.errors import ResumeMismatchError

from .harness import Case, check_case, ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.conftest import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 2-step run stopped in its first epoch (a checkpoint to resume from)."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "synthetic"
    Trainer(tiny_config(root / "run", data, epochs=2, max_steps=2, final_eval=False)).fit()
    return root, data


def _resume(run_root, synthetic, **changes):
    def action(_):
        Trainer(tiny_config(run_root / "run", synthetic, epochs=2, max_steps=3, final_eval=False, **changes)).fit()

    return action


def _cases(run_root, data) -> list[Case]:
    return [
        Case("resume with another learning rate", _resume(run_root, data, optim={"lr": 1e-2}),
             ResumeMismatchError, "optim.lr"),
        Case("resume with another batch size", _resume(run_root, data, data={"batch_size": 4}),
             ResumeMismatchError, "batch_size: 2 -> 4"),
        Case("resume with another model", _resume(run_root, data, model={"name": "smca_detr_tiny"}),
             ResumeMismatchError, "model.name"),
        Case("resume with a bit width", _resume(run_root, data, quant={"bits": 4}), ResumeMismatchError, "bits"),
        Case("resume with another seed", _resume(run_root, data, seed=7), ResumeMismatchError, "seed: 0 -> 7"),
    ]


NAMES = ["resume with another learning rate", "resume with another batch size", "resume with another model",
         "resume with a bit width", "resume with another seed"]


@pytest.mark.parametrize("name", NAMES)
def test_changed_resume_is_refused_and_nothing_is_rewritten(name, stopped_run):
    run_root, data = stopped_run
    cases = {case.name: case for case in _cases(run_root, data)}
    assert ids(list(cases.values())) == NAMES
    error = check_case(cases[name], run_root / "run")  # config.json, checkpoint and log unchanged
    assert "--no-resume" in str(error)


def test_changed_training_data_is_refused(stopped_run):
    run_root, data = stopped_run
    with pytest.raises(ResumeMismatchError, match="synthetic_train_images: 8 -> 6"):
        _resume(run_root, data, data={"synthetic_train_images": 6})(None)


def test_longer_run_resumes_and_logs_the_change(stopped_run):
    run_root, data = stopped_run
    before = json.loads((run_root / "run" / "config.json").read_text())
    _resume(run_root, data, log_every=5)(None)
    after = json.loads((run_root / "run" / "config.json").read_text())
    assert (before["max_steps"], after["max_steps"]) == (2, 3) and after["log_every"] == 5
    events = [json.loads(line) for line in (run_root / "run" / "log.jsonl").read_text().splitlines()]
    resume = [r for r in events if r.get("event") == "resume"][-1]
    assert resume["changed"]["max_steps"] == [2, 3]


def test_annotation_file_changed_under_the_same_path_is_refused(tmp_path):
    """Same config, different content: the recorded number of training images catches it."""
    import json as _json

    from qdetr.data import make_synthetic_coco

    train = make_synthetic_coco(tmp_path / "train", num_images=4, image_size=64)
    val = make_synthetic_coco(tmp_path / "val", num_images=2, image_size=64, seed=1)
    coco = {"dataset": "coco", "train_images": str(tmp_path / "train" / "images"), "train_ann": str(train),
            "val_images": str(tmp_path / "val" / "images"), "val_ann": str(val)}
    Trainer(tiny_config(tmp_path / "run", tmp_path / "unused", epochs=2, max_steps=1, final_eval=False,
                        data=coco)).fit()
    data = _json.loads(train.read_text())
    dropped = data["images"].pop()["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
    train.write_text(_json.dumps(data))
    config_before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ResumeMismatchError, match="training images: 4 -> 3"):
        Trainer(tiny_config(tmp_path / "run", tmp_path / "unused", epochs=2, max_steps=2, final_eval=False,
                            data=coco)).fit()
    assert (tmp_path / "run" / "config.json").read_text() == config_before
