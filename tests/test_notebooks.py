"""Execute the example notebooks of ``examples/`` (offline, CPU) and check what they produce.

Each notebook runs in a fresh kernel started from *this* interpreter (a kernelspec written to a
temporary folder, so it works from any virtual environment), in a temporary working directory,
with the model zoo and the Hub forced offline. A failing cell fails the test with the cell's
traceback.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")
manager = pytest.importorskip("jupyter_client.manager")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = [
    "01_inference.ipynb",
    "02_quantize_and_distill.ipynb",
    "03_huggingface_detr.ipynb",
    "04_export_and_size.ipynb",
    "05_rt_detr_family.ipynb",
]
CELL_TIMEOUT_S = 240


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_manager(tmp_path: Path):
    """A KernelManager whose ``python3`` kernel runs ``sys.executable`` (this venv)."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (qdetr tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = kernelspec.KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return manager.KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _stdout(nb) -> str:
    """All text the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "".join(parts)


def _run(name: str, tmp_path: Path, monkeypatch) -> tuple[object, Path, float]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    # Inherited by the kernel: no network, caches inside the test folder, one thread.
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QDETR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QDETR_DEMO_MODEL", str(tmp_path / "no-demo-model"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), f"{name}: not every code cell ran"
    return nb, workdir, seconds


def test_notebooks_are_stored_without_outputs_and_up_to_date():
    generator = _load_generator()
    assert sorted(generator.NOTEBOOKS) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        stored = (EXAMPLES / name).read_text(encoding="utf-8")
        assert stored == generator.render(name), f"{name} is stale: run python examples/make_notebooks.py"
        nb = nbformat.reads(stored, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} is stored with outputs"


def test_01_inference_falls_back_offline_and_draws(tmp_path, monkeypatch):
    nb, workdir, seconds = _run("01_inference.ipynb", tmp_path, monkeypatch)
    text = _stdout(nb)
    out = workdir / "outputs" / "01_inference"
    assert "The model zoo is not reachable: OfflineModeError" in text
    assert "RANDOM weights" in text and "random weights" in text  # it says which model it used
    assert (out / "ckpt_4_bit_tiny_random.pth").is_file()
    assert any((tmp_path / "work" / "outputs" / "01_inference" / "cache" / "converted").iterdir())
    from PIL import Image

    with Image.open(out / "detections.png") as picture, Image.open(out / "input.png") as original:
        assert picture.size == original.size == (256, 256)
        assert picture.convert("RGB").tobytes() != original.convert("RGB").tobytes(), "no box was drawn"
    assert text.count("xyxy = ") == 5
    assert seconds < 90


def _check_ap_table(results: dict, expected_keys: list[str]) -> None:
    assert list(results) == expected_keys
    for name, ap in results.items():
        assert set(ap) == {"AP", "AP50"}, name
        for value in ap.values():
            assert 0.0 <= value <= 1.0, (name, value)


def test_02_quantize_and_distill(tmp_path, monkeypatch):
    nb, workdir, seconds = _run("02_quantize_and_distill.ipynb", tmp_path, monkeypatch)
    text = _stdout(nb)
    results = json.loads((workdir / "outputs" / "02_quantize_and_distill" / "results.json").read_text())
    _check_ap_table(
        results,
        ["float", "4-bit, calibrated only", "4-bit LSQ (no distillation)", "4-bit Q-DETR (DA + distillation)"],
    )
    assert "coverage (quantized, total)" in text and "loss_drd" in text

    assert f"{'model':<40} {'AP':>6} {'AP50':>6}" in text
    assert seconds < 90


def test_03_huggingface_detr(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    nb, workdir, seconds = _run("03_huggingface_detr.ipynb", tmp_path, monkeypatch)
    text = _stdout(nb)
    results = json.loads((workdir / "outputs" / "03_huggingface_detr" / "results.json").read_text())
    _check_ap_table(results, ["float", "4-bit, calibrated only", "4-bit Q-DETR (DA + distillation)"])
    assert "model.decoder.layers.1.encoder_attn" in text  # the HF cross-attention was quantized
    assert "'attention': (5, 5)" in text
    assert "loss_drd" in text
    assert seconds < 90


def test_05_rt_detr_family(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    nb, workdir, seconds = _run("05_rt_detr_family.ipynb", tmp_path, monkeypatch)
    text = _stdout(nb)
    results = json.loads((workdir / "outputs" / "05_rt_detr_family" / "results.json").read_text())
    _check_ap_table(results, ["float", "4-bit, calibrated only", "4-bit Q-DETR (DA + distillation)"])
    assert "distribution alignment in: ['model.decoder.layers.0.self_attn'" in text
    assert "deformable cross-attention: ['model.decoder.layers.0.encoder_attn'" in text
    assert "captured (L, B, Q_all, d): (3, 8, 13, 32)" in text  # 8 denoising + 5 matching queries
    assert "distilled (L, B, Q, d):    (3, 8, 5, 32)" in text
    assert "teacher (L, B, Q, d):      (3, 8, 5, 32)" in text
    assert "loss_drd" in text
    assert seconds < 120


@pytest.mark.slow
def test_04_export_and_size(tmp_path, monkeypatch):
    nb, workdir, seconds = _run("04_export_and_size.ipynb", tmp_path, monkeypatch)
    out = workdir / "outputs" / "04_export_and_size"
    table = (out / "size_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| float32") or line.startswith("| W")]
    assert len(rows) == 3 and all(row.rstrip().endswith("| True |") for row in rows[1:]), table
    sizes = {name: (out / name / "model.safetensors").stat().st_size for name in ("float", "w4", "w2")}
    assert sizes["w2"] < sizes["w4"] < 0.25 * sizes["float"], sizes
    for name in ("float", "w4", "w2"):
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (out / name).iterdir()}
    assert seconds < 90
