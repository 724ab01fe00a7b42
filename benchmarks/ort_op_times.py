"""Where an ONNX model's time goes in onnxruntime: milliseconds per operator type, per image.

Runs each file with ``ORT_ENABLE_ALL`` (the graph onnxruntime really executes), ``--warmup``
untimed runs, then ``--runs`` profiled runs of one square ``--size`` image, and prints the
median run time and each operator type's kernel time per run (onnxruntime's profiler; the
warm-up runs are left out). ``--op`` also lists that operator's slowest nodes with their input
shapes (e.g. the stem ``QLinearConv``).

Usage::

    python benchmarks/ort_op_times.py outputs/bench_int/detr_r50_float.onnx \\
        outputs/bench_int/detr_r50_deploy_w4a4.onnx --threads 2 --size 800
    python benchmarks/ort_op_times.py outputs/bench_int/detr_r50_deploy_w4a4.onnx --threads 1 --op QLinearConv
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "op_times"]


def op_times(path: Path, threads: int, size: int, warmup: int, runs: int) -> tuple[float, dict, dict]:
    """(median run seconds, {op type: ms per run}, {node: (ms per run, op type, input shapes)})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32),
            "pixel_mask": np.ones((1, size, size), np.int64)}
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    for _ in range(warmup):
        session.run(None, feed)
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)  # the profiled session's own first run, left out below
        seconds = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            seconds.append(time.perf_counter() - t0)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = starts[1] if len(starts) > 1 else 0
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first_timed:
            continue
        op, ms = e["args"]["op_name"], e["dur"] / 1000 / runs
        by_op[op] += ms
        node = by_node.setdefault(e["name"][: -len("_kernel_time")], [0.0, op, e["args"].get("input_type_shape")])
        node[0] += ms
    return statistics.median(seconds), dict(by_op), by_node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=16, help="operator types shown per file")
    parser.add_argument("--op", default=None, help="also list this operator type's slowest nodes")
    args = parser.parse_args(argv)
    for path in args.files:
        median, by_op, by_node = op_times(path, args.threads, args.size, args.warmup, args.runs)
        print(f"== {path} ({args.threads} threads, {args.size} px): median run {1000 * median:.1f} ms")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {ms:8.1f} ms  {op}")
        if args.op:
            nodes = sorted((v for v in by_node.values() if v[1] == args.op), key=lambda v: -v[0])
            for ms, _, shapes in nodes[:5]:
                print(f"    {ms:7.2f} ms  {args.op} {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
