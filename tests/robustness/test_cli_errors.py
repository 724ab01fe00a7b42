"""Every subcommand answers a user error with one stderr line and exit code 2; -v adds the traceback."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from PIL import Image, UnidentifiedImageError

from qdetr import cli
from qdetr.errors import CheckpointError, OfflineModeError

from .harness import snapshot


def _tiny_model_dir(d):
    from qdetr.models import create_model
    from qdetr.zoo import save_pretrained

    save_pretrained(create_model("detr_tiny"), d / "model")


def _photo(d):
    _tiny_model_dir(d)
    Image.new("RGB", (48, 32), "red").save(d / "photo.png")


def _crafted(d):
    from qdetr.models import model_config
    from qdetr.testing import make_release_state_dict

    state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
    state["transformer.encoder.layers.300000.foo"] = torch.zeros(1)
    torch.save({"model": state}, d / "ckpt_4_bit_crafted.pth")


# (name, argv in the folder d, setup, fragment of the one-line message)
CLI_CASES = [
    ("train: missing config file", lambda d: ["train", str(d / "nothere.yaml")], None, "not found"),
    ("train: YAML that does not parse", lambda d: ["train", str(d / "bad.yaml")],
     lambda d: (d / "bad.yaml").write_text("epochs: [\n"), "line 2"),
    ("train: unknown --set key", lambda d: ["train", "--set", "nosuch.key=1", "--output-dir", str(d / "run")],
     None, "unknown key"),
    ("train: bit width 4.9 from a config file",
     lambda d: ["train", str(d / "c.yaml"), "--output-dir", str(d / "run")],
     lambda d: (d / "c.yaml").write_text("quant: {bits: 4.9}\n"), "4.9"),
    ("eval: missing model", lambda d: ["eval", str(d / "nothere"), "--images", str(d), "--ann", str(d / "a.json")],
     None, "nothere"),
    ("eval: malformed annotation file",
     lambda d: ["eval", str(d / "model"), "--images", str(d), "--ann", str(d / "a.json")],
     lambda d: (_tiny_model_dir(d), (d / "a.json").write_text('{"images": [], "annotations": []}')),
     "missing 'categories'"),
    ("predict: output folder = input folder with an earlier result",
     lambda d: ["predict", str(d / "model"), str(d / "photo.png"), "--out", str(d)],
     lambda d: (_photo(d), (d / "photo.pred.png").write_bytes(b"earlier result")), "--overwrite"),
    ("predict: same photo twice", lambda d: ["predict", str(d / "model"), str(d / "photo.png"),
                                             str(d / "photo.png"), "--out", str(d / "out")],
     _photo, "more than once"),
    ("predict: a text file as image", lambda d: ["predict", str(d / "model"), str(d / "notes.jpg"),
                                                 "--out", str(d / "out")],
     lambda d: (_tiny_model_dir(d), (d / "notes.jpg").write_text("hi")), "not a readable image"),
    ("convert: crafted release file", lambda d: ["convert", str(d / "ckpt_4_bit_crafted.pth"), str(d / "out")],
     _crafted, "300000"),
    ("convert: empty file", lambda d: ["convert", str(d / "empty.pth"), str(d / "out"), "--bits", "4"],
     lambda d: (d / "empty.pth").write_bytes(b""), "empty"),
    ("zoo fetch: unknown name", lambda d: ["zoo", "fetch", "nosuch"], None, "nosuch"),
    ("demo: --out is a file", lambda d: ["demo", "--quick", "--out", str(d / "file.txt")],
     lambda d: (d / "file.txt").write_text("x"), "file.txt"),
]


@pytest.mark.parametrize("name, argv, setup, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_user_error_is_one_line_and_exit_2(name, argv, setup, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QDETR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    if setup is not None:
        setup(work)
    before = snapshot(work)
    command = argv(work)[0] if argv(work)[0] != "zoo" else "zoo fetch"
    assert cli.main(argv(work)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"qdetr {command}: error:"), err
    assert fragment.lower() in err.lower() and "Traceback" not in err
    assert snapshot(work) == before  # nothing written, replaced or removed


ERRORS = [
    CheckpointError("damaged file"),
    FileNotFoundError("no such file: x.pth"),
    ValueError("bad value"),
    UnidentifiedImageError("cannot identify image file 'x.jpg'"),
    pickle.UnpicklingError("invalid load key"),
    OfflineModeError("offline mode is on"),
    EOFError("Ran out of input"),
]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo", "convert", "zoo", "export"])
@pytest.mark.parametrize("error", ERRORS, ids=[type(e).__name__ for e in ERRORS])
def test_every_subcommand_maps_every_kind_of_user_error(command, error, monkeypatch, capsys):
    """Also a subcommand registered later (``export`` from another module) gets the mapping."""
    original = cli.build_parser

    def build_parser():
        parser = original()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "export" not in subparsers.choices:
            subparsers.add_parser("export").set_defaults(func=None)
        for name, sub in subparsers.choices.items():
            sub.set_defaults(func=_raise)
            for action in sub._actions:
                action.required = False
                if isinstance(action, argparse._SubParsersAction):
                    action.required = False
        return parser

    def _raise(args):
        raise error

    monkeypatch.setattr(cli, "build_parser", build_parser)
    monkeypatch.setattr(cli, "_COMMANDS", {})
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qdetr {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["-v", command]) == 2
    assert "Traceback" in capsys.readouterr().err  # -v shows it
    assert cli.main([command, "-v"]) == 2  # -v after the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch):
    monkeypatch.setattr(cli, "_COMMANDS", {"demo": lambda args: [][1]})
    with pytest.raises(IndexError):
        cli.main(["demo"])
