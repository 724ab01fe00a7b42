"""Zoo registry, entries, bit-width resolution and the zoo CLI commands."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import qdetr.zoo as zoo
from qdetr.zoo.commands import add_zoo_commands
from qdetr.zoo.registry import PretrainedEntry, unregister_pretrained
from qdetr.zoo.release import BitWidthError, resolve_release_bits

RELEASE_4 = "qdetr_smca_r50.w4a4attn8_seed_coco_e50"
RELEASE_2 = "qdetr_smca_r50.w2a2attn8_seed_coco_e50"


def test_release_entries_are_listed_with_metadata():
    assert {RELEASE_4, RELEASE_2} <= set(zoo.list_pretrained())
    details = {e["name"]: e for e in zoo.list_pretrained("qdetr_smca_r50.*", details=True)}
    four, two = details[RELEASE_4], details[RELEASE_2]
    assert (four["bits"], four["attn_bits"], four["profile"], four["box_ap"]) == (4, 8, "seed", 38.5)
    assert (two["bits"], two["attn_bits"], two["profile"], two["box_ap"]) == (2, 8, "seed", 32.4)
    assert four["source"] == "gdrive:1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT"
    assert two["source"] == "gdrive:1sJ12U0s-df8YYLbAiPMI24p8qSOXBTk_"
    assert four["filename"] == "ckpt_4_bit_smca_detr_coco.pth" and two["filename"] == "ckpt_2_bit_smca_detr_coco.pth"
    assert four["sha256"] is None and four["license"] and four["arch"] == "qdetr_smca_r50"
    json.dumps(details)  # listings are plain JSON


def test_entry_arch_is_a_registered_model():
    from qdetr.models import list_models

    for name in zoo.list_pretrained():
        assert zoo.get_pretrained_entry(name).arch in list_models(), name


def test_duplicate_and_invalid_entries_raise():
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_pretrained(zoo.get_pretrained_entry(RELEASE_4))
    with pytest.raises(ValueError, match="exactly one of"):
        PretrainedEntry(name="a.b", filename="x.pth")
    with pytest.raises(ValueError, match="exactly one of"):
        PretrainedEntry(name="a.b", url="http://x/y", hf_hub_id="o/r", filename="y")
    with pytest.raises(ValueError, match="<arch>.<tag>"):
        PretrainedEntry(name="NoDot", hf_hub_id="o/r")
    with pytest.raises(ValueError, match="need filename"):
        PretrainedEntry(name="a.b", url="http://x/y")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        PretrainedEntry(name="a.b", url="http://x/y", filename="y", sha256="abc")


def test_unknown_names_suggest_close_matches():
    with pytest.raises(KeyError, match="Did you mean"):
        zoo.get_pretrained_entry("qdetr_smca_r50.w4a4attn8_seed_coco_e5")
    with pytest.raises(ValueError, match="not a zoo name.*Did you mean"):
        zoo.from_pretrained("qdetr_smca_r50.w4a4attn8_seed_coco_e5")
    with pytest.raises(ValueError, match="not a zoo name"):
        zoo.from_pretrained("definitely not a model")


def test_zoo_bits_argument_must_match_entry():
    with pytest.raises(ValueError, match="is a 4-bit model"):
        zoo.from_pretrained(RELEASE_4, bits=2)


class TestResolveReleaseBits:
    def test_sources(self):
        ns = argparse.Namespace(n_bit=4)
        assert resolve_release_bits({"model": {}}, bits=2) == (2, "argument")
        assert resolve_release_bits({"model": {}, "args": ns}) == (4, "args.n_bit")
        assert resolve_release_bits({"model": {}}, filename="ckpt_2_bit_smca_detr_coco.pth") == (2, "file name")
        assert resolve_release_bits({"model": {}, "args": ns}, bits=4, filename="ckpt_4_bit_x.pth") == (4, "argument")

    def test_missing_is_an_error_naming_the_fix(self):
        with pytest.raises(BitWidthError, match="pass bits=2 or bits=4"):
            resolve_release_bits({"w": torch.zeros(1)}, filename="checkpoint.pth")

    @pytest.mark.parametrize("kwargs", [
        {"bits": 2, "checkpoint": {"args": argparse.Namespace(n_bit=4)}},
        {"bits": 4, "filename": "ckpt_2_bit_smca_detr_coco.pth"},
        {"checkpoint": {"args": argparse.Namespace(n_bit=4)}, "filename": "ckpt_2_bit_smca_detr_coco.pth"},
    ])
    def test_conflicts_are_errors(self, kwargs):
        checkpoint = kwargs.pop("checkpoint", {})
        with pytest.raises(BitWidthError, match="contradictory"):
            resolve_release_bits(checkpoint, **kwargs)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="qdetr")
    add_zoo_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_zoo_list(capsys):
    assert _cli(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert RELEASE_4 in out and "38.5" in out and "gdrive:1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT" in out
    assert _cli(["zoo", "list", "*w2a2*", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == [RELEASE_2]


def test_cli_convert_parses_its_arguments():
    parser = argparse.ArgumentParser(prog="qdetr")
    add_zoo_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", "ckpt.pth", "out", "--bits", "4"])
    assert (args.release, args.out_dir, args.bits) == ("ckpt.pth", "out", 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "ckpt.pth", "out", "--bits", "four"])


def test_custom_url_entry_round_trip():
    entry = PretrainedEntry(name="mine.test_entry", url="http://127.0.0.1:1/x.pth",
                            filename="x.pth", bits=4)
    zoo.register_pretrained(entry)
    try:
        assert "mine.test_entry" in zoo.list_pretrained()
        assert zoo.get_pretrained_entry("mine.test_entry").source == "http://127.0.0.1:1/x.pth"
    finally:
        unregister_pretrained("mine.test_entry")
    assert "mine.test_entry" not in zoo.list_pretrained()
