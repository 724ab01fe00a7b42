"""Stages chain through run folders on coco-mini: train (float) -> train --bits 4 --distill
--float-checkpoint RUN -> eval RUN -> predict RUN, all through the ``qdetr`` command line."""

import json

import pytest
import torch

from qdetr.cli import main

from .conftest import COCO_MINI

pytestmark = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini is not present")

_TINY = [
    "--model", "detr_tiny",
    "--set", "model.overrides={hidden_dim: 32, dim_feedforward: 64}",
    "--set", "data.transforms={train_scales: [96], max_size: 160, eval_size: 96, random_crop: false}",
    "--set", "data.max_train_images=4", "--set", "data.max_val_images=3",
    "--set", "max_steps=2", "--set", "progress=false", "--set", "eval_every=0",
    "--batch-size", "2", "--device", "cpu",
]


def _data_flags():
    ann = COCO_MINI / "annotations"
    return ["--train-images", str(COCO_MINI / "train2017"), "--train-ann", str(ann / "instances_train2017.json"),
            "--val-images", str(COCO_MINI / "val2017"), "--val-ann", str(ann / "instances_val2017.json")]


def test_train_float_then_distill_from_the_run_folder_then_eval_and_predict_it(tmp_path, capsys):
    float_run, q4_run = tmp_path / "float", tmp_path / "q4"
    assert main(["train", "--output-dir", str(float_run), *_data_flags(), *_TINY]) == 0
    assert (float_run / "model" / "model.safetensors").is_file()

    # the float run folder is accepted as the model it produced (teacher defaults to it too)
    assert main(["train", "--output-dir", str(q4_run), "--bits", "4", "--distill", "--float-checkpoint",
                 str(float_run), *_data_flags(), *_TINY]) == 0
    capsys.readouterr()

    # the run folder holds the training config.json *and* the model: eval reads the model
    val_ann = COCO_MINI / "annotations" / "instances_val2017.json"
    assert main(["eval", str(q4_run), "--images", str(COCO_MINI / "val2017"), "--ann", str(val_ann),
                 "--max-images", "2", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_images"] == 2 and len(result["stats"]) == 12

    images = [str(p) for p in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:1]]
    assert main(["predict", str(q4_run), *images, "--out", str(tmp_path / "pred"), "--threshold", "0"]) == 0
    [record] = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(record["detections"]) == 10 and record["detections"][0]["label"] != ""

    # the same resolver behind the API: 4-bit, DA on the paper's slot, labels and preprocessing recorded
    from qdetr.zoo import from_pretrained

    model = from_pretrained(q4_run)
    spec = model.qdetr_pretrained_config
    assert spec["quantization"]["bits"] == 4 and spec["preprocessing"]["shortest_edge"] == 96
    assert model.id2label[1] == "person" and len(spec["alignment"]) == 2
    # the student really started from the float run's weights (same architecture, loaded strictly)
    teacher = from_pretrained(float_run)
    assert teacher.qdetr_pretrained_config["quantization"] is None
    # a checkpoint written by this version resolves to the same structure as the final model
    from_checkpoint = from_pretrained(q4_run / "checkpoint.pt")
    assert from_checkpoint.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        pixel_values = torch.rand(1, 3, 96, 96)
        assert torch.equal(model(pixel_values)["pred_boxes"], from_checkpoint(pixel_values)["pred_boxes"])


def test_a_run_folder_without_a_model_yet_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"output_dir": str(run), "epochs": 1}))
    images = [str(p) for p in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:1]]
    assert main(["predict", str(run), *images, "--out", str(tmp_path / "pred")]) == 2
    assert "training run folder without a model yet" in capsys.readouterr().err


def test_convert_takes_a_run_folder(tmp_path, capsys):
    from qdetr.zoo import resolve_model

    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *_data_flags(), *_TINY, "--set", "final_eval=false"]) == 0
    assert main(["convert", str(run), str(tmp_path / "packed")]) == 0
    assert "float" in capsys.readouterr().out
    a, b = resolve_model(run), resolve_model(tmp_path / "packed")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
