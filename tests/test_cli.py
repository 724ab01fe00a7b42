"""The ``qdetr`` command line: train, eval, predict (and the error path)."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from qdetr.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine.conftest import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = tiny_config(root / "run", root / "data", max_steps=1, final_eval=False)
    config.save(root / "run.yaml")
    code = main(["train", str(root / "run.yaml"), "--set", "optim.lr=3e-4"])
    assert code == 0
    return root


def test_train_writes_model_checkpoint_and_config(trained):
    run = trained / "run"
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoint.pt").is_file()
    assert json.loads((run / "model" / "config.json").read_text())["library_name"] == "qdetr"
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == 3e-4 and saved["max_steps"] == 1


def test_predict_draws_boxes_and_writes_json(trained, tmp_path, capsys):
    images = sorted((trained / "data" / "val" / "images").iterdir())[:2]
    code = main(["predict", str(trained / "run" / "model"), *map(str, images), "--out", str(tmp_path), "--threshold", "0"])
    assert code == 0
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record, image in zip(records, images):
        drawn = Image.open(record["output"])
        assert drawn.size == Image.open(image).size and drawn.mode == "RGB"
        assert len(record["detections"]) == 10  # threshold 0: every query of detr_tiny
        det = record["detections"][0]
        assert set(det) == {"category_id", "label", "score", "box_xyxy"}
        assert det["label"] in {"rectangle", "ellipse", "triangle", "cross", "no-object"} or det["label"].isdigit()
        # boxes were drawn: the output differs from the input
        assert drawn.tobytes() != Image.open(image).convert("RGB").tobytes()
    assert "predictions.json" in capsys.readouterr().out


def test_eval_reports_ap_and_writes_json(trained, tmp_path, capsys):
    out = tmp_path / "result.json"
    val = trained / "data" / "val"
    code = main(["eval", str(trained / "run"), "--images", str(val / "images"), "--ann", str(val / "instances.json"),
                 "--per-class", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["stats"]) == 12 and result["eval_batch_size"] == 1 and result["num_images"] == 4
    assert out.with_suffix(".detections.json").is_file()
    assert "AP" in capsys.readouterr().out


def test_missing_image_gives_a_clear_error(trained, tmp_path, capsys):
    code = main(["predict", str(trained / "run"), str(tmp_path / "nope.jpg"), "--out", str(tmp_path)])
    assert code == 2
    assert "image not found" in capsys.readouterr().err


def test_parser_lists_all_commands():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "eval", "predict", "demo", "convert", "zoo"} <= set(commands)


def test_demo_quick_writes_table_picture_and_packed_models(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| float teacher |" in out and "2-bit Q-DETR" in out
    assert "demo-float: epoch 1/1" in out and "demo-w2a2_qdetr: epoch 1/1" in out  # a line per epoch
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["float teacher", "4-bit LSQ", "4-bit Q-DETR", "2-bit LSQ", "2-bit Q-DETR"]
    assert all(0.0 <= r["ap"] <= 1.0 and r["eval_batch_size"] == 1 for r in rows.values())
    # bit-packed weights: fewer bits, smaller files
    assert rows["2-bit LSQ"]["size_bytes"] < rows["4-bit LSQ"]["size_bytes"] < rows["float teacher"]["size_bytes"]
    for row in rows.values():
        assert (Path(row["packed_dir"]) / "config.json").is_file()
    assert Image.open(tmp_path / "predictions.png").size[0] > 2 * 128
    assert (tmp_path / "table.md").read_text().count("|") > 30


def test_predict_from_a_save_pretrained_folder_matches_the_run_folder(trained, tmp_path):
    from qdetr.zoo import resolve_model, save_pretrained

    save_pretrained(resolve_model(trained / "run"), tmp_path / "packed")  # labels and preprocessing carried over
    images = [str(p) for p in sorted((trained / "data" / "val" / "images").iterdir())[:2]]
    assert main(["predict", str(tmp_path / "packed"), *images, "--out", str(tmp_path / "a"), "--threshold", "0"]) == 0
    assert main(["predict", str(trained / "run"), *images, "--out", str(tmp_path / "b"), "--threshold", "0"]) == 0
    a = json.loads((tmp_path / "a" / "predictions.json").read_text())
    b = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert [r["detections"] for r in a] == [r["detections"] for r in b]
