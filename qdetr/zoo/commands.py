"""Command-line commands of the zoo, registered on the ``qdetr`` CLI's argparse subparsers.

* ``qdetr convert RELEASE.pth OUT_DIR [--bits 4]``: a Q-DETR release checkpoint -> a packed
  qdetr directory (``config.json``, ``model.safetensors``, ``README.md``);
* ``qdetr zoo list [--json]``: the registered pretrained weights;
* ``qdetr zoo fetch NAME``: download, verify, convert and cache one entry.

Each subcommand sets ``func`` (``args.func(args) -> int`` exit code). The handlers write
their report to stdout, as command-line tools do; the library functions they call log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_zoo_commands", "run_convert", "run_zoo_list", "run_zoo_fetch"]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``qdetr convert``."""
    from qdetr.zoo.hub import save_pretrained
    from qdetr.zoo.release import load_release_checkpoint
    from qdetr.zoo.resolve import resolve_model
    from qdetr.zoo.run_files import LEGACY_MODEL_FILE, RUN_CHECKPOINT_NAME

    source = Path(args.release)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.stderr.write(f"error: {out} is not empty; pass --overwrite to replace its model files\n")
        return 2
    start = time.perf_counter()
    if source.is_file() and source.name not in (LEGACY_MODEL_FILE, RUN_CHECKPOINT_NAME):
        model = load_release_checkpoint(source, bits=args.bits, model_name=args.model)  # a release .pth
    else:
        model = resolve_model(args.release, bits=args.bits)  # the one resolver: run folder, .pth, zoo name, ...
    save_pretrained(model, out, base_model=args.base_model)
    seconds = time.perf_counter() - start
    info = model.qdetr_pretrained_config.get("provenance") or {}
    out_size = _size(out / "model.safetensors")
    sizes = f"model.safetensors {_mb(out_size)}"
    if source.is_file():
        sizes = f"source {_mb(_size(source))}, {sizes} ({out_size / _size(source):.3f}x)"
    bits = (model.qdetr_pretrained_config.get("quantization") or {}).get("bits")
    origin = f", from {info['bits_source']}" if "bits_source" in info else ""
    sys.stdout.write(
        f"converted {source.name or args.release} ({f'{bits}-bit' if bits else 'float'}{origin}) -> {out}\n"
        f"  {sizes} in {seconds:.1f} s\n"
        f"  load it with qdetr.from_pretrained({str(out)!r})\n"
    )
    return 0


def run_zoo_list(args: argparse.Namespace) -> int:
    """Handler of ``qdetr zoo list``."""
    from qdetr.zoo.registry import list_pretrained

    entries = list_pretrained(args.pattern, details=True)
    for e in entries:
        e["sha256_status"] = _sha256_status(e)
    if args.json:
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
        return 0
    header = f"{'name':<45} {'bits':>4} {'attn':>4} {'profile':<8} {'box AP':>6}  {'sha256':<24} source"
    lines = [header, "-" * len(header)]
    for e in entries:
        bits = "fp" if e["bits"] is None else str(e["bits"])
        attn = "fp" if e["attn_bits"] is None else str(e["attn_bits"])
        ap = "-" if e["box_ap"] is None else f"{e['box_ap']:.1f}"
        lines.append(f"{e['name']:<45} {bits:>4} {attn:>4} {e['profile'] or '-':<8} {ap:>6}  "
                     f"{e['sha256_status']:<24} {e['source']}")
    if any(e["sha256_status"].startswith(("unknown", "recorded")) for e in entries):
        lines.append("")
        lines.append("sha256 'unknown (TOFU)': no checksum was published; the first download is trusted and its "
                     "SHA-256 pinned in the cache ('recorded <digest>'), and every later use is checked against it.")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _sha256_status(entry: dict) -> str:
    """``pinned <12 hex>`` (published), ``recorded <12 hex>`` (first download, cached) or ``unknown (TOFU)``."""
    from qdetr.zoo.cache import read_json
    from qdetr.zoo.download import cached_file_path

    if entry.get("sha256"):
        return f"pinned {entry['sha256'][:12]}"
    if entry.get("filename"):
        try:
            cached = cached_file_path(entry["filename"], subdir=entry["name"])
        except ValueError:
            cached = None
        meta = read_json(cached.with_name(cached.name + ".meta.json")) if cached is not None else None
        if meta and meta.get("sha256"):
            return f"recorded {meta['sha256'][:12]}"
    return "unknown (TOFU)" if not entry.get("hf_hub_id") else "hub-managed"


def run_zoo_fetch(args: argparse.Namespace) -> int:
    """Handler of ``qdetr zoo fetch``."""
    from qdetr.zoo.pretrained import from_pretrained

    start = time.perf_counter()
    model = from_pretrained(args.name, cache_dir=args.cache_dir)
    info = getattr(model, "qdetr_pretrained_config", {})
    sys.stdout.write(f"{args.name}: ready in {time.perf_counter() - start:.1f} s "
                     f"(source SHA-256 {info.get('provenance', {}).get('source_sha256', 'n/a')})\n")
    return 0


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert`` and ``zoo {list,fetch}`` on an argparse subparsers object.

    Examples:
        >>> parser = argparse.ArgumentParser(prog="qdetr")
        >>> add_zoo_commands(parser.add_subparsers(dest="command", required=True))
        >>> args = parser.parse_args(["zoo", "list"])
        >>> args.func(args)  # doctest: +SKIP
    """
    convert = subparsers.add_parser(
        "convert",
        help="convert a model (release .pth, run folder, checkpoint, zoo name, ...) into a packed qdetr directory",
        description="Convert any model source (a Q-DETR release .pth such as ckpt_4_bit_smca_detr_coco.pth, a "
        "training run folder, a model_final.pt / checkpoint.pt, a zoo name or a Hub id) into config.json + "
        "packed model.safetensors + README.md. Files are loaded with torch.load(weights_only=True).",
    )
    convert.add_argument("release", metavar="SOURCE", help="release .pth, run folder, model file, zoo name or Hub id")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    convert.add_argument("--bits", type=int, default=None,
                         help="bit width (2 or 4); required when the file has no args.n_bit and no ckpt_<b>_bit name")
    convert.add_argument("--model", default="qdetr_smca_r50",
                         help="registry model the checkpoint loads into (default: qdetr_smca_r50)")
    convert.add_argument("--base-model", default=None, help="Hub id of the float base model, for the model card")
    convert.add_argument("--overwrite", action="store_true", help="replace model files in a non-empty OUT_DIR")
    convert.set_defaults(func=run_convert)

    zoo = subparsers.add_parser("zoo", help="list or fetch pretrained weights")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = zoo_sub.add_parser("list", help="list the registered pretrained weights")
    listing.add_argument("pattern", nargs="?", default=None, help="glob on names, e.g. 'qdetr_smca_r50.*'")
    listing.add_argument("--json", action="store_true", help="print full metadata as JSON")
    listing.set_defaults(func=run_zoo_list)
    fetch = zoo_sub.add_parser("fetch", help="download, verify, convert and cache one entry")
    fetch.add_argument("name", help="zoo name from 'qdetr zoo list'")
    fetch.add_argument("--cache-dir", default=None, help="cache root (default $QDETR_CACHE or ~/.cache/qdetr)")
    fetch.set_defaults(func=run_zoo_fetch)
