"""An ONNX rewrite that lets onnxruntime run residual adds as integer ``QLinearAdd`` kernels.

onnxruntime fuses ``DequantizeLinear x2 -> Add [-> Relu] -> QuantizeLinear`` into one integer
``QLinearAdd`` (it drops the ReLU when the zero point is the container's minimum), but only
when the add's result has a single consumer. In a deploy-profile ResNet the output of a
bottleneck, ``relu(conv3 branch + identity)``, is read by two quantizers: the next block's
``conv1`` input quantizer and its identity quantizer (or its ``downsample`` input quantizer).
Left as it is, that add runs in float, between two dequantizations and two quantizations.

:func:`split_shared_integer_adds` gives every ``QuantizeLinear`` consumer its own copy of the
add (and folds the ReLU into that quantizer's clip: ``Q(relu(v)) = max(Q(v), z)``, exact
because ``Q`` is monotone and ``Q(0) = z``), so each copy fuses. The graph computes the same
values; it only repeats an add of two integer tensors, which costs less than one float pass.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_shared_integer_adds"]


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def split_shared_integer_adds(model) -> int:
    """Give each ``QuantizeLinear`` reading ``Add(DQ, DQ) [-> Relu]`` its own add, in place.

    Only adds whose two inputs are ``DequantizeLinear`` outputs are touched, and only their
    ``QuantizeLinear`` consumers with a scalar scale and zero point are split off; any other
    consumer keeps the original add. A ReLU between the add and a quantizer is folded into a
    ``Clip`` of the quantized codes (merged into a clip that already follows the quantizer).

    Args:
        model: an ``onnx.ModelProto`` (modified in place).

    Returns:
        The number of adds written (0 when nothing matched).

    Examples:
        >>> import numpy as np, onnx
        >>> from onnx import helper, numpy_helper, TensorProto
        >>> init = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        ...         numpy_helper.from_array(np.array(3, np.uint8), "z")]
        >>> nodes = [helper.make_node("DequantizeLinear", [x, "s", "z"], [x + "f"]) for x in "ab"]
        >>> nodes += [helper.make_node("Add", ["af", "bf"], ["sum"]), helper.make_node("Relu", ["sum"], ["r"]),
        ...           helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q1"]),
        ...           helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q2"])]
        >>> io = lambda n, t: helper.make_tensor_value_info(n, t, [4])
        >>> graph = helper.make_graph(nodes, "g", [io("a", TensorProto.UINT8), io("b", TensorProto.UINT8)],
        ...                           [io("q1", TensorProto.UINT8), io("q2", TensorProto.UINT8)], init)
        >>> model = helper.make_model(graph)
        >>> split_shared_integer_adds(model)
        2
        >>> [n.op_type for n in model.graph.node].count("Add"), [n.op_type for n in model.graph.node].count("Relu")
        (2, 0)
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    constants = _constants(graph)
    written = 0
    new_nodes: dict[int, list] = {}  # id(node) -> nodes to insert after it
    removed: set[int] = set()
    taken = {n.name for n in graph.node} | {i.name for i in graph.initializer}

    def fresh(base: str) -> str:
        i = 0
        while f"{base}_{i}" in taken:
            i += 1
        taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    for add in list(graph.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        if not all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in add.input):
            continue
        relu = None
        value = add.output[0]
        users = consumers.get(value, [])
        if len(users) == 1 and users[0].op_type == "Relu" and value not in graph_outputs:
            relu, value = users[0], users[0].output[0]
            users = consumers.get(value, [])
        quantizers = [u for u in users if u.op_type == "QuantizeLinear" and _scalar_q(u, constants)]
        if len(users) < 2 or not quantizers:
            continue
        others = [u for u in users if u not in quantizers]
        for q in quantizers:
            zero = constants[q.input[2]]
            sum_name = fresh(f"{add.output[0]}_for_{q.output[0]}")
            copy_add = helper.make_node("Add", list(add.input), [sum_name], name=fresh(f"{add.name or 'add'}_split"))
            inserted = [copy_add]
            q.input[0] = sum_name
            if relu is not None:
                inserted += _fold_relu(graph, q, zero, consumers, constants, fresh, helper, numpy_helper)
            new_nodes.setdefault(id(q), []).extend(inserted)
            written += 1
        if not others and value not in graph_outputs:
            removed.add(id(add))
            if relu is not None:
                removed.add(id(relu))
    if not written:
        return 0
    # Keep the node list topologically sorted: each new add right before its quantizer (its
    # inputs precede the original add, which precedes the quantizer), each new clip right after.
    ordered = []
    for node in graph.node:
        if id(node) in removed:
            continue
        extra = new_nodes.get(id(node), [])
        ordered.extend(n for n in extra if n.op_type == "Add")
        ordered.append(node)
        ordered.extend(n for n in extra if n.op_type != "Add")
    del graph.node[:]
    graph.node.extend(ordered)
    return written


def _scalar_q(node, constants) -> bool:
    if len(node.input) < 3:
        return False
    scale, zero = constants.get(node.input[1]), constants.get(node.input[2])
    return scale is not None and zero is not None and scale.size == 1 and zero.size == 1 and zero.dtype in (np.uint8, np.int8)


def _fold_relu(graph, q, zero, consumers, constants, fresh, helper, numpy_helper) -> list:
    """Make ``q``'s codes at least its zero point: ``Q(relu(v)) = max(Q(v), z)``. Returns new nodes."""
    z = int(zero.reshape(()))
    if z == int(np.iinfo(zero.dtype).min):
        return []  # the container's minimum: every code is >= z already
    users = consumers.get(q.output[0], [])
    if len(users) == 1 and users[0].op_type == "Clip" and len(users[0].input) >= 2:
        clip = users[0]
        low = constants.get(clip.input[1])
        if low is not None and low.size == 1:
            new_low = fresh(f"{clip.name or 'clip'}_relu_min")
            graph.initializer.append(numpy_helper.from_array(np.array(max(int(low.reshape(())), z), dtype=zero.dtype), new_low))
            clip.input[1] = new_low
            return []
    codes = fresh(f"{q.output[0]}_relu")
    low_name = fresh(f"{q.output[0]}_relu_min")
    graph.initializer.append(numpy_helper.from_array(np.array(z, dtype=zero.dtype), low_name))
    for user in users:
        for i, name in enumerate(user.input):
            if name == q.output[0]:
                user.input[i] = codes
    return [helper.make_node("Clip", [q.output[0], low_name, ""], [codes], name=fresh(f"{q.name or 'q'}_relu_clip"))]

