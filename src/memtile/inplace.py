"""In-place sharing: an elementwise op may write its output over an input that dies there.

Output element `i` of an elementwise op depends only on input element `i`, so once the op has
read an input that nobody reads afterwards, the output can take that input's bytes: the pair
becomes one buffer and LOAD drops by the input's size at that step (MemoMalloc, PAPERS.md §2).

The mapping `inplace_pairs` returns is `shared` for `lifetimes.buffers/load`:
`{op.outputs[0]: op.inputs[k]}`. For the executor, `inplace_input(op, pairs)` gives `k`, the
index into `op.inputs` of the tensor the op overwrites. For every target in ELEMENTWISE the
tensor arguments come first, so `k` is also the position in `op.node.args`.
"""

import torch

from memtile.capture import ACTIVATION, MemGraph, OpNode, positions

ELEMENTWISE = frozenset(
    f"aten.{name}"
    for name in (
        "relu.default", "hardtanh.default", "sigmoid.default", "silu.default",
        "hardswish.default", "hardsigmoid.default", "gelu.default", "tanh.default",
        "leaky_relu.default", "elu.default", "neg.default", "abs.default", "exp.default",
        "sqrt.default", "rsqrt.default", "reciprocal.default",
        "clamp.default", "clamp_min.default", "clamp_max.default", "pow.Tensor_Scalar",
        "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "maximum.default",
        "minimum.default", "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar",
        # batch norm in eval: first output (the normalised tensor) is elementwise in the input
        "_native_batch_norm_legit_no_training.default",
    )
)


def overwritable(graph: MemGraph, op: OpNode) -> list[str]:
    """Inputs `op` may overwrite if they die at it, in `op.inputs` order: an elementwise op,
    an activation input (not a graph input or output, not a view) with the output's dtype,
    byte count, shape and strides (so element i sits at the same byte in both), whose storage
    no other input of the op reads through a view."""
    if op.target not in ELEMENTWISE or not op.outputs:
        return []
    out = graph.tensors[op.outputs[0]]
    if out.is_view or out.nbytes == 0:
        return []
    found = []
    for name in dict.fromkeys(op.inputs):
        tensor = graph.tensors[name]
        aliased = any(graph.tensors[o].base == name for o in op.inputs if o != name)
        if (tensor.category == ACTIVATION and not tensor.is_view and not aliased
                and (tensor.dtype, tensor.nbytes, tensor.shape) == (out.dtype, out.nbytes, out.shape)
                and _strides(graph, name) == _strides(graph, out.name)):
            found.append(name)
    return found


def _strides(graph: MemGraph, name: str) -> tuple[int, ...] | None:
    """The strides export recorded for a tensor made by an op (None when none was recorded)."""
    producer = graph.tensors[name].producer
    node = graph.ops[producer].node if producer is not None else None
    value = node.meta.get("val") if node is not None else None
    if isinstance(value, (tuple, list)):  # output i of a multi-output op is named "<node>.<i>"
        value = value[int(name.rsplit(".", 1)[1])]
    return tuple(value.stride()) if isinstance(value, torch.Tensor) else None


def inplace_pairs(graph: MemGraph, order: list[int] | None = None) -> dict[str, str]:
    """`{output: input}` for every op (run in `order`) that overwrites an input whose storage,
    through any view, has no reader after it; the first such input in `op.inputs` is taken."""
    position = positions(order, graph.num_steps)
    last_read: dict[str, int] = {}
    for base, users in graph.storage_users().items():
        readers = [position[c] for name in users for c in graph.tensors[name].consumers]
        last_read[base] = max(readers, default=-1)
    pairs = {}
    for op in graph.ops:
        for name in overwritable(graph, op):
            if last_read[name] == position[op.index]:
                pairs[op.outputs[0]] = name
                break
    return pairs


def inplace_input(op: OpNode, pairs: dict[str, str]) -> int | None:
    """Index into `op.inputs` (and `op.node.args`) of the tensor `op` overwrites, or None."""
    if not op.outputs or op.outputs[0] not in pairs:
        return None
    return op.inputs.index(pairs[op.outputs[0]])
