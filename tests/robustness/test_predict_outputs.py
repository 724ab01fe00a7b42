"""predict never overwrites an input or an earlier output, and a failed run leaves the output folder as it was."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from qdetr.engine.predict import LoadedModel, predict_images
from qdetr.errors import ConfigError, InputImageError, OutputExistsError
from qdetr.models import PreprocessingConfig, create_model

from .harness import Case, check_case, ids


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(model=create_model("detr_tiny"), categories={1: "rectangle"},
                       preprocessing=PreprocessingConfig(shortest_edge=32, longest_edge=64))


def _photos(d, *names):
    for i, name in enumerate(names):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(d / name)


def _cases(loaded) -> list[Case]:
    def run(inputs, out, **kwargs):
        return lambda d: predict_images(loaded, [d / p for p in inputs], d / out, threshold=0.0, **kwargs)

    return [
        Case("earlier output in --out", run(["photo.png"], "."), OutputExistsError, "--overwrite",
             lambda d: (_photos(d, "photo.png"), (d / "photo.pred.png").write_bytes(b"earlier"))),
        Case("earlier predictions.json in --out", run(["photo.png"], "out"), OutputExistsError, "predictions.json",
             lambda d: (_photos(d, "photo.png"), (d / "out").mkdir(), (d / "out" / "predictions.json").write_text("[]"))),
        Case("an input named like another input's output", run(["photo.jpg", "photo.pred.png"], "."),
             OutputExistsError, "input images", lambda d: _photos(d, "photo.jpg", "photo.pred.png")),
        Case("an input named like another input's output, even with overwrite",
             run(["photo.jpg", "photo.pred.png"], ".", overwrite=True),
             OutputExistsError, "input images", lambda d: _photos(d, "photo.jpg", "photo.pred.png")),
        Case("the same input twice", run(["photo.png", "./photo.png"], "out"), ConfigError, "more than once",
             lambda d: _photos(d, "photo.png")),
        Case("second image unreadable: nothing written", run(["a.png", "b.png"], "out"), InputImageError, "b.png",
             lambda d: (_photos(d, "a.png"), (d / "b.png").write_bytes(b"\x89PNG broken"))),
        Case("second image unreadable, --out exists with files", run(["a.png", "b.png"], "."), InputImageError,
             "b.png", lambda d: (_photos(d, "a.png"), (d / "b.png").write_bytes(b"\x89PNG broken"))),
    ]


NAMES = ["earlier output in --out", "earlier predictions.json in --out", "an input named like another input's output",
         "an input named like another input's output, even with overwrite", "the same input twice",
         "second image unreadable: nothing written", "second image unreadable, --out exists with files"]


@pytest.mark.parametrize("name", NAMES)
def test_predict_refuses_and_changes_nothing(name, loaded, tmp_path):
    cases = {case.name: case for case in _cases(loaded)}
    assert ids(list(cases.values())) == NAMES
    check_case(cases[name], tmp_path)


def test_out_equal_to_the_photo_folder_keeps_every_photo(loaded, tmp_path):
    _photos(tmp_path, "photo.png", "photo.jpg", "other.png")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    records = predict_images(loaded, sorted(tmp_path.iterdir()), tmp_path, threshold=0.0)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # inputs untouched
    outputs = [r["output"] for r in records]
    assert len(set(outputs)) == 3 and all(o.endswith(".pred.png") for o in outputs)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in before)[-1] == "predictions.json"


def test_same_stem_in_two_folders_gives_two_outputs(loaded, tmp_path):
    _photos(tmp_path, "a/photo.jpg", "b/photo.jpg")
    records = predict_images(loaded, [tmp_path / "a/photo.jpg", tmp_path / "b/photo.jpg"], tmp_path / "out",
                             threshold=0.0)
    first, second = (r["output"] for r in records)
    assert first != second
    assert Image.open(first).tobytes() != Image.open(second).tobytes()  # each is its own photo's drawing
    again = predict_images(loaded, [tmp_path / "b/photo.jpg", tmp_path / "a/photo.jpg"], tmp_path / "out2",
                           threshold=0.0)
    assert [r["output"].replace("out2", "out") for r in again] == [second, first]  # names do not depend on order


def test_overwrite_replaces_earlier_outputs_only(loaded, tmp_path):
    _photos(tmp_path, "photo.png")
    predict_images(loaded, [tmp_path / "photo.png"], tmp_path / "out", threshold=0.0)
    (tmp_path / "out" / "photo.pred.png").write_bytes(b"stale")
    predict_images(loaded, [tmp_path / "photo.png"], tmp_path / "out", threshold=0.0, overwrite=True)
    assert Image.open(tmp_path / "out" / "photo.pred.png").size == (40, 30)


def test_leftovers_of_a_killed_run_are_ignored(loaded, tmp_path):
    _photos(tmp_path, "photo.png")
    out = tmp_path / "out"
    (out / ".qdetr-predict-killed").mkdir(parents=True)
    (out / ".qdetr-predict-killed" / "photo.pred.png").write_bytes(b"half")
    (out / ".predictions.json.abc123.tmp").write_text("[")
    records = predict_images(loaded, [tmp_path / "photo.png"], out, threshold=0.0)
    assert json.loads((out / "predictions.json").read_text()) == records
    assert not any(p.name.startswith(".qdetr-predict-") and p.name != ".qdetr-predict-killed" for p in out.iterdir())
