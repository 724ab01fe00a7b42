"""OnnxDetector: an exported file run by onnxruntime gives the PyTorch model's output dicts."""

from __future__ import annotations

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qdetr.export.onnx_runtime import OnnxDetector, load_onnx_for_inference  # noqa: E402
from qdetr.models import create_model, post_process_object_detection  # noqa: E402
from qdetr.testing import example_inputs  # noqa: E402


#: every image of these tests is preprocessed to this size (the export's example size)
SIZE_HW = (64, 80)


@pytest.fixture(scope="module")
def smca_export(tmp_path_factory):
    """A float smca_detr_tiny and its dynamic-shape export (one export for the module: ~30 s)."""
    pytest.importorskip("onnxscript")
    from qdetr import export_onnx

    torch.manual_seed(0)
    model = create_model("smca_detr_tiny", num_classes=3).eval()
    model.id2label = {1: "a", 2: "b", 3: "c"}
    path = tmp_path_factory.mktemp("onnx") / "smca_tiny.onnx"
    export_onnx(model, path, example_size=SIZE_HW,
                metadata={"qdetr.preprocessing": json.dumps({"eval_size": 64, "max_size": 96})})
    return model, path


def _assert_same_outputs(outputs, reference):
    assert outputs.classification == reference.classification
    assert set(outputs) == {"pred_logits", "pred_boxes"}
    torch.testing.assert_close(outputs["pred_logits"], reference["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], reference["pred_boxes"], rtol=1e-4, atol=1e-5)
    size = reference["pred_boxes"].shape[0]
    ours = post_process_object_detection(outputs, threshold=0.0, target_sizes=[(70, 90)] * size)
    theirs = post_process_object_detection(reference, threshold=0.0, target_sizes=[(70, 90)] * size)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)


def test_output_dict_equals_pytorch(smca_export):
    model, path = smca_export
    detector = OnnxDetector(path, intra_op_threads=1)
    pixel_values, pixel_mask = example_inputs(1, sizes_hw=[SIZE_HW], seed=3)  # other data than at export
    outputs = detector(pixel_values, pixel_mask)
    with torch.no_grad():
        reference = model(pixel_values, pixel_mask)
    assert outputs.classification == "sigmoid"
    _assert_same_outputs(outputs, reference)


def test_output_dict_equals_pytorch_on_another_batch_size_and_padding(smca_export):
    model, path = smca_export
    pixel_values, pixel_mask = example_inputs(3, sizes_hw=[(70, 90), (64, 64), (50, 80)])
    with torch.no_grad():
        reference = model(pixel_values, pixel_mask)
    _assert_same_outputs(OnnxDetector(path, intra_op_threads=1)(pixel_values, pixel_mask), reference)


def test_predict_method_matches_pytorch_predict(smca_export):
    from qdetr.models import PreprocessingConfig
    from qdetr.zoo import predict

    model, path = smca_export
    detector = OnnxDetector(path, intra_op_threads=1)
    images = [torch.randint(0, 256, (3, *SIZE_HW), dtype=torch.uint8) for _ in range(2)]
    config = PreprocessingConfig(shortest_edge=64, longest_edge=96)
    ours = detector.predict(images, threshold=0.0, preprocessing=config)
    theirs = predict(model, images, threshold=0.0, preprocessing=config)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert len(a["labels"]) > 0 and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)


def test_metadata_gives_head_labels_and_sizes(smca_export):
    _, path = smca_export
    loaded = load_onnx_for_inference(path, intra_op_threads=1)
    assert loaded.categories == {1: "a", 2: "b", 3: "c"}
    assert (loaded.preprocessing.shortest_edge, loaded.preprocessing.longest_edge) == (64, 96)
    assert loaded.model.classification == "sigmoid"


def test_cli_predict_with_onnxruntime_backend_matches_pytorch(smca_export, tmp_path):
    from PIL import Image

    from qdetr.cli import main
    from qdetr.engine.predict import LoadedModel, predict_images
    from qdetr.models import PreprocessingConfig

    model, path = smca_export
    image = tmp_path / "img.png"
    Image.fromarray(torch.randint(0, 256, (*SIZE_HW, 3), dtype=torch.uint8).numpy()).save(image)
    assert main(["predict", str(path), str(image), "--out", str(tmp_path / "ort"), "--threshold", "0.0",
                 "--backend", "onnxruntime"]) == 0
    got = json.loads((tmp_path / "ort" / "predictions.json").read_text())[0]["detections"]
    loaded = LoadedModel(model=model, categories={1: "a", 2: "b", 3: "c"},
                         preprocessing=PreprocessingConfig(shortest_edge=64, longest_edge=96))
    expected = predict_images(loaded, [image], tmp_path / "pt", threshold=0.0)[0]["detections"]
    assert [d["label"] for d in got] == [d["label"] for d in expected] and len(got) > 0
    for a, b in zip(got, expected):
        assert a["box_xyxy"] == pytest.approx(b["box_xyxy"], abs=1e-2)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_clear_errors(smca_export, tmp_path):
    _, path = smca_export
    with pytest.raises(FileNotFoundError, match="export one first"):
        OnnxDetector(tmp_path / "missing.onnx")
    no_metadata = onnx.load(str(path))
    del no_metadata.metadata_props[:]
    onnx.save(no_metadata, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="classification='softmax'"):
        OnnxDetector(tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="optimization_level"):
        OnnxDetector(path, optimization_level="max")
    from qdetr.engine.predict import load_model_for_inference

    with pytest.raises(ValueError, match="--backend onnxruntime"):
        load_model_for_inference(path)
    with pytest.raises(ValueError, match="backend must be"):
        load_model_for_inference(path, backend="tensorrt")


def test_static_shape_export_rejects_other_sizes_clearly(smca_export, tmp_path):
    from qdetr import export_onnx

    model, _ = smca_export
    path = export_onnx(model, tmp_path / "static.onnx", example_size=SIZE_HW, dynamic=False)
    detector = OnnxDetector(path, intra_op_threads=1)
    pixel_values, pixel_mask = example_inputs(1, sizes_hw=[SIZE_HW], seed=5)
    with torch.no_grad():
        _assert_same_outputs(detector(pixel_values, pixel_mask), model(pixel_values, pixel_mask))
    with pytest.raises(ValueError, match="export with dynamic shapes"):
        detector(*example_inputs(1, sizes_hw=[(48, 64)]))
    with pytest.raises(ValueError, match="export with dynamic shapes"):
        detector(*example_inputs(2, sizes_hw=[SIZE_HW, SIZE_HW]))
