"""Which share of a model's conv + matmul multiply-adds runs in onnxruntime's integer kernels.

onnxruntime rewrites ``DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear`` groups of a QDQ
graph into integer kernels (``QLinearConv``, ``QLinearMatMul``, ``QGemm``,
``MatMulIntegerToFloat``, ...) during its graph optimizations; a group that misses one of the
fusion conditions stays a float op fed by a dequantized weight or activation. This module
reads the graph onnxruntime actually runs:

1. a session at the requested optimization level saves its optimized graph
   (``SessionOptions.optimized_model_filepath``);
2. the saved graph, with every node given a unique name, runs once in a second session with
   optimizations off and profiling on, so that every kernel's output shape is known
   (the profiling trace's ``output_type_shape``) and maps to exactly one node of the saved graph;
3. each conv / matmul / gemm kernel (float or integer variant) gets its multiply-add count from
   those shapes and the weight initializers: ``numel(Y) * K``, with ``K`` the reduction length
   (``C_in / groups * kh * kw`` for convolutions, the last dimension of ``A`` for matmuls).

The integer share is ``integer multiply-adds / all counted multiply-adds``. Float kernels fed by a
``DequantizeLinear`` are listed as *fallbacks* (a QDQ group that did not fuse); float kernels
without one are layers the export keeps in float on purpose (heads, ``input_proj``).

At ``"all"`` level onnxruntime converts float convolutions to its blocked NCHWc layout, which pads
channels to the block size, so float conv counts can be slightly above the model's own; the
default ``"extended"`` level applies every QDQ fusion without that layout change.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdetr.atomic_write import atomic_path

__all__ = ["KernelMultiplyAdds", "IntegerKernelReport", "integer_kernel_report", "kernel_multiply_adds"]

#: op type -> index of the weight input, for convolution kernels (float and integer variants).
CONV_WEIGHT_INPUT: dict[str, int] = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
#: matmul kernels: ``Y[..., M, N] = A[..., M, K] @ B[..., K, N]`` (``K`` read from input 0).
MATMUL_OPS: frozenset[str] = frozenset(
    {"MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
     "MatMulNBits"}
)
#: gemm kernels: ``Y[M, N] = A @ B`` with ``A`` of ``M * K`` values (either orientation).
GEMM_OPS: frozenset[str] = frozenset({"Gemm", "FusedGemm", "QGemm"})
#: kernels that multiply and accumulate integers (``MatMulNBits`` only at ``accuracy_level`` 4).
INTEGER_OPS: frozenset[str] = frozenset(
    {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
     "DynamicQuantizeMatMul", "MatMulNBits"}
)
#: compute-heavy ops whose multiply-adds this report does not count (listed as ``uncounted``).
UNCOUNTED_OPS: frozenset[str] = frozenset(
    {"Einsum", "ConvTranspose", "Attention", "MultiHeadAttention", "QAttention", "GroupQueryAttention"}
)

_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class KernelMultiplyAdds:
    """One conv / matmul / gemm kernel of the optimized graph and its multiply-adds.

    Attributes:
        name: node name in the saved optimized graph.
        op_type: e.g. ``"QLinearConv"``, ``"MatMul"``.
        domain: op domain (``""`` for ONNX, ``"com.microsoft"``, ``"com.microsoft.nchwc"``).
        multiply_adds: multiply-accumulate count for the profiled input.
        integer: True when the kernel multiplies integers.
        dequantized_input: a float kernel with an input produced by ``DequantizeLinear``
            (a QDQ group onnxruntime did not fuse).

    Examples:
        >>> from qdetr.export.kernel_report import KernelMultiplyAdds
        >>> kernel = KernelMultiplyAdds("fc", "QGemm", "com.microsoft", 4096, integer=True)
        >>> kernel.integer, kernel.dequantized_input
        (True, False)
    """

    name: str
    op_type: str
    domain: str
    multiply_adds: int
    integer: bool
    dequantized_input: bool = False


@dataclass(frozen=True)
class IntegerKernelReport:
    """Integer share of the conv + matmul multiply-adds of one onnxruntime session.

    Attributes:
        kernels: every counted kernel, in graph order.
        op_counts: op type -> number of nodes in the saved optimized graph (all ops).
        uncounted: names of compute ops whose multiply-adds are not counted (e.g. ``Einsum``).
        optimization_level: the onnxruntime level the graph was optimized at.
        input_shapes: input name -> shape of the profiled run.

    Examples:
        >>> from qdetr.export.kernel_report import IntegerKernelReport, KernelMultiplyAdds
        >>> report = IntegerKernelReport(kernels=(
        ...     KernelMultiplyAdds("conv", "QLinearConv", "", 900, integer=True),
        ...     KernelMultiplyAdds("head", "MatMul", "", 100, integer=False),
        ... ))
        >>> report.integer_share, [k.name for k in report.float_kernels]
        (0.9, ['head'])
    """

    kernels: tuple[KernelMultiplyAdds, ...]
    op_counts: dict[str, int] = field(default_factory=dict)
    uncounted: tuple[str, ...] = ()
    optimization_level: str = "extended"
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def total_multiply_adds(self) -> int:
        """All counted conv + matmul multiply-adds."""
        return sum(k.multiply_adds for k in self.kernels)

    @property
    def integer_multiply_adds(self) -> int:
        """Multiply-adds run by integer kernels."""
        return sum(k.multiply_adds for k in self.kernels if k.integer)

    @property
    def integer_share(self) -> float:
        """``integer_multiply_adds / total_multiply_adds`` (0 for a graph without such kernels)."""
        total = self.total_multiply_adds
        return self.integer_multiply_adds / total if total else 0.0

    @property
    def float_kernels(self) -> list[KernelMultiplyAdds]:
        """Float kernels, largest first."""
        return sorted((k for k in self.kernels if not k.integer), key=lambda k: -k.multiply_adds)

    @property
    def fallbacks(self) -> list[KernelMultiplyAdds]:
        """Float kernels fed by ``DequantizeLinear`` (QDQ groups that did not fuse), largest first."""
        return [k for k in self.float_kernels if k.dequantized_input]

    def by_op_type(self) -> dict[str, tuple[int, int]]:
        """op type -> (kernel count, multiply-adds), largest multiply-adds first."""
        counts: Counter[str] = Counter()
        macs: Counter[str] = Counter()
        for k in self.kernels:
            counts[k.op_type] += 1
            macs[k.op_type] += k.multiply_adds
        return {op: (counts[op], macs[op]) for op, _ in macs.most_common()}

    def summary(self, top: int = 10) -> str:
        """Human-readable report: share, per-op-type table, largest float kernels and fallbacks."""
        giga = 1e9
        lines = [
            f"integer share of conv+matmul multiply-adds: {100 * self.integer_share:.1f} % "
            f"({self.integer_multiply_adds / giga:.3f} of {self.total_multiply_adds / giga:.3f} GMAC; "
            f"onnxruntime level {self.optimization_level!r}, input {self.input_shapes})",
            f"{'op type':<24} {'kernels':>7} {'GMAC':>9} {'share':>7}",
        ]
        total = self.total_multiply_adds or 1
        for op, (count, macs) in self.by_op_type().items():
            kind = "int" if op in INTEGER_OPS and any(k.integer for k in self.kernels if k.op_type == op) else "float"
            lines.append(f"{op + ' (' + kind + ')':<24} {count:>7} {macs / giga:>9.4f} {100 * macs / total:>6.1f}%")
        floats = self.float_kernels
        if floats:
            lines.append(f"largest float kernels ({len(floats)} in all, {len(self.fallbacks)} fed by DequantizeLinear):")
            for k in floats[:top]:
                mark = "  <- dequantized input (unfused QDQ)" if k.dequantized_input else ""
                lines.append(f"  {k.op_type:<12} {k.multiply_adds / 1e6:>10.2f} MMAC  {k.name}{mark}")
        if self.uncounted:
            lines.append(f"not counted (no multiply-add formula): {', '.join(self.uncounted)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the derived totals)."""
        out = asdict(self)
        out.update(integer_share=self.integer_share, integer_multiply_adds=self.integer_multiply_adds,
                   total_multiply_adds=self.total_multiply_adds)
        return out


def kernel_multiply_adds(
    op_type: str, input_shapes: list[tuple[int, ...] | None], output_shape: tuple[int, ...],
    attributes: Mapping[str, Any] | None = None,
) -> int | None:
    """Multiply-adds of one conv / matmul / gemm kernel from its shapes.

    Args:
        op_type: the node's op type (float or integer variant).
        input_shapes: shapes of the node's inputs in order (None where unknown/absent).
        output_shape: shape of the first output.
        attributes: node attributes (``transA`` of ``FusedMatMul`` is honoured).

    Returns:
        ``numel(Y) * K``, or None for an op this function does not count (or missing shapes).

    Examples:
        >>> from qdetr.export.kernel_report import kernel_multiply_adds
        >>> kernel_multiply_adds("QLinearConv", [(1, 8, 10, 10), (), (), (16, 8, 3, 3)], (1, 16, 10, 10))
        115200
        >>> kernel_multiply_adds("MatMul", [(2, 5, 32), (32, 64)], (2, 5, 64))  # 2*5*64 outputs x 32
        20480
        >>> kernel_multiply_adds("Gemm", [(32, 5), (64, 32)], (5, 64))  # A stored transposed
        10240
    """
    numel = math.prod(output_shape)
    if op_type in CONV_WEIGHT_INPUT:
        index = CONV_WEIGHT_INPUT[op_type]
        weight = input_shapes[index] if index < len(input_shapes) else None
        return None if weight is None else numel * math.prod(weight[1:])
    a = input_shapes[0] if input_shapes else None
    if a is None or len(a) == 0:
        return None
    if op_type in MATMUL_OPS:
        trans_a = bool((attributes or {}).get("transA", 0)) and op_type == "FusedMatMul"
        k = a[-2] if trans_a and len(a) >= 2 else a[-1]
        return numel * k
    if op_type in GEMM_OPS:
        m = output_shape[0]
        return numel * (math.prod(a) // m) if m else 0
    return None


def _level(name: str):
    import onnxruntime as ort

    if name not in _LEVELS:
        raise ValueError(f"optimization_level must be one of {_LEVELS}; got {name!r}")
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def _default_inputs(session, image_size: tuple[int, int], batch_size: int, seed: int) -> dict[str, np.ndarray]:
    height, width = image_size
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        if arg.name == "pixel_values":
            feed[arg.name] = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
        elif arg.name == "pixel_mask":
            dtype = {"tensor(bool)": np.bool_, "tensor(int32)": np.int32}.get(arg.type, np.int64)
            feed[arg.name] = np.ones((batch_size, height, width), dtype=dtype)
        else:
            raise ValueError(
                f"the model has an input {arg.name!r} besides pixel_values/pixel_mask: pass inputs={{name: array}}"
            )
    return feed


def _attributes(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def integer_kernel_report(
    model_path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    image_size: tuple[int, int] = (800, 800),
    batch_size: int = 1,
    optimization_level: str = "extended",
    threads: int = 1,
    optimized_model_path: str | os.PathLike | None = None,
    session_config: Mapping[str, str] | None = None,
) -> IntegerKernelReport:
    """Optimizes ``model_path`` with onnxruntime (CPU), profiles one run and counts integer multiply-adds.

    Args:
        model_path: an ``.onnx`` file (QDQ or float).
        inputs: input name -> array for the profiled run; default: a random ``pixel_values``
            (``batch_size``, 3, *image_size*) and an all-ones ``pixel_mask``.
        image_size: (height, width) of the default inputs.
        batch_size: batch of the default inputs.
        optimization_level: ``"basic"``, ``"extended"`` (default) or ``"all"`` (adds NCHWc layouts).
        threads: onnxruntime intra-op threads of the profiled run.
        optimized_model_path: keep the optimized graph onnxruntime saves here (default: a temporary file).
        session_config: extra ``SessionOptions.add_session_config_entry`` keys
            (e.g. ``{"session.disable_quant_qdq": "1"}`` for a float reference).

    Returns:
        The report (see :class:`IntegerKernelReport`).

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: an unknown optimization level, or extra model inputs without ``inputs``.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> import onnx
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> from qdetr.export.kernel_report import integer_kernel_report
        >>> weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
        >>> graph = helper.make_graph(
        ...     [helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], "g",
        ...     [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        ...     [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])], [weight])
        >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     onnx.save(model, Path(tmp) / "fc.onnx")
        ...     report = integer_kernel_report(Path(tmp) / "fc.onnx", {"X": np.ones((2, 8), np.float32)})
        >>> report.total_multiply_adds, report.integer_share  # 2x4 outputs x 8: all float
        (64, 0.0)
    """
    import onnx
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {model_path}; export one first (qdetr export ...)")
    level = _level(optimization_level)
    with tempfile.TemporaryDirectory(prefix="qdetr-kernels-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(optimized)
        options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        feed = dict(inputs) if inputs is not None else _default_inputs(session, image_size, batch_size, seed=0)
        del session

        graph_model = onnx.load(str(optimized))
        if optimized_model_path is not None:
            with atomic_path(optimized_model_path) as target:
                onnx.save(graph_model, str(target))
        graph = graph_model.graph
        used: set[str] = set()
        for index, node in enumerate(graph.node):  # unique names: profile events map to nodes by name
            if not node.name or node.name in used:
                name = f"{node.op_type}_{index}"
                while name in used:
                    name += "_"
                node.name = name
            used.add(node.name)
        named = Path(tmp) / "named.onnx"
        onnx.save(graph_model, str(named))

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(named), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
        del session

    shapes: dict[str, tuple[int, ...]] = {name: tuple(np.shape(value)) for name, value in feed.items()}
    shapes.update({init.name: tuple(init.dims) for init in graph.initializer})
    by_node = {n.name: n for n in graph.node}
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = by_node.get(event["name"][: -len("_kernel_time")])
        if node is None:
            continue
        for output, entry in zip(node.output, event.get("args", {}).get("output_type_shape", [])):
            shapes.setdefault(output, tuple(next(iter(entry.values()))))

    producers = {out: n for n in graph.node for out in n.output}
    kernels, uncounted = [], []
    for node in graph.node:
        op = node.op_type
        if op in UNCOUNTED_OPS:
            uncounted.append(node.name)
            continue
        if op not in CONV_WEIGHT_INPUT and op not in MATMUL_OPS and op not in GEMM_OPS:
            continue
        attributes = _attributes(node)
        macs = kernel_multiply_adds(op, [shapes.get(name) if name else None for name in node.input],
                                    shapes.get(node.output[0], ()), attributes)
        if macs is None or node.output[0] not in shapes:
            uncounted.append(node.name)
            continue
        integer = op in INTEGER_OPS and (op != "MatMulNBits" or int(attributes.get("accuracy_level", 0)) == 4)
        dequantized = not integer and any(
            name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input
        )
        kernels.append(KernelMultiplyAdds(node.name, op, node.domain, int(macs), integer, dequantized))
    return IntegerKernelReport(
        kernels=tuple(kernels),
        op_counts=dict(Counter(n.op_type for n in graph.node).most_common()),
        uncounted=tuple(uncounted),
        optimization_level=optimization_level,
        input_shapes={name: tuple(np.shape(value)) for name, value in feed.items()},
    )
