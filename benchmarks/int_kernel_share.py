"""Share of a model's conv + matmul multiply-adds that onnxruntime runs in integer kernels.

For each ONNX file (or each ``--models`` x ``--bits`` deploy-profile export, built and cached
as in ``bench_int_inference.py``), onnxruntime optimizes the graph, saves it, and one profiled
run at ``--size`` gives every kernel's shapes (:func:`qdetr.export.integer_kernel_report`).
Prints the share, the per-op-type table and the largest float kernels (fallbacks marked).
Target for the deploy profile: >= 90 %.

Usage::

    python benchmarks/int_kernel_share.py --models detr_r50 smca_detr_r50 --bits 8 4 2 --size 800
    python benchmarks/int_kernel_share.py path/to/model.onnx --size 640 --level all
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_int_inference import prepare  # noqa: E402

from qdetr.export import integer_kernel_report  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="ONNX files (besides --models)")
    parser.add_argument("--models", nargs="*", default=[], help="export these registry models (deploy profile)")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2], choices=(8, 4, 2))
    parser.add_argument("--size", type=int, default=800, help="square image size of the profiled run")
    parser.add_argument("--level", default="extended", choices=("basic", "extended", "all"))
    parser.add_argument("--cache", type=Path, default=Path("outputs/bench_int"))
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    parser.add_argument("--top", type=int, default=8, help="largest float kernels listed")
    args = parser.parse_args(argv)
    files = list(args.files)
    for model in args.models:
        targets = prepare(model, [f"ort-w{b}a{b}" for b in args.bits], args.cache, args.size)
        files += [targets[f"ort-w{b}a{b}"] for b in args.bits]
    if not files:
        parser.error("give ONNX files or --models")
    print("command: python benchmarks/int_kernel_share.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    reports = {}
    rows = ["| file | integer share | integer GMAC | total GMAC | float kernels (fed by DQ) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for path in files:
        report = integer_kernel_report(path, image_size=(args.size, args.size), optimization_level=args.level,
                                       threads=1)
        reports[str(path)] = report.to_dict()
        print(f"\n== {path}\n{report.summary(top=args.top)}", flush=True)
        rows.append(f"| {Path(path).name} | {100 * report.integer_share:.1f} % | "
                    f"{report.integer_multiply_adds / 1e9:.2f} | {report.total_multiply_adds / 1e9:.2f} | "
                    f"{len(report.float_kernels)} ({len(report.fallbacks)}) |")
    print("\n" + "\n".join(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
