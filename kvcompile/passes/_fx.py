"""Small FX helpers shared by the passes: one name per op spelling, example-value access, graph order.

Dynamo's torch-level graph spells one operation several ways: ``torch.matmul(a, b)``, ``a @ b``
(``operator.matmul``), ``a.matmul(b)``; ``x * s`` (``operator.mul``), ``torch.mul``, ``x.mul(s)``; a
buffer write as ``operator.setitem``, ``x.index_copy_`` or ``torch.index_put``. ``op_name`` folds them
into one canonical string so that the matchers in ``detect`` compare strings, not spellings.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

__all__ = ["op_name", "tensor_meta", "ndim", "shape", "arg", "is_input", "source_name", "graph_order", "render",
           "same_sizes", "static_int"]

# call_function targets -> canonical op name. Methods (call_method) use their own name, which already is
# the canonical one for everything listed here (x.view, x.transpose, x.index_copy_, x.masked_fill, ...).
_FUNCTIONS: dict[Any, str] = {
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    operator.mul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.add: "add",
    torch.add: "add",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
    F.dropout: "dropout",
    torch.dropout: "dropout",
    torch.where: "where",
    torch.masked_fill: "masked_fill",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze",
    torch.flatten: "flatten",
    torch.repeat_interleave: "repeat_interleave",
    torch.clone: "clone",
    torch.detach: "detach",
    torch.narrow: "narrow",
    torch.index_copy: "index_copy",
    torch.index_put: "index_put",
    torch.index_put_: "index_put_",
    torch.slice_scatter: "slice_scatter",
    operator.setitem: "setitem",
    operator.getitem: "getitem",
}
_METHOD_ALIASES = {"swapaxes": "transpose", "swapdims": "transpose", "concat": "cat", "multiply": "mul",
                   "true_divide": "div", "bmm": "matmul", "__matmul__": "matmul", "__mul__": "mul",
                   "__truediv__": "div", "__add__": "add", "__getitem__": "getitem", "__setitem__": "setitem"}


def op_name(node: Any) -> str | None:
    """Canonical name of what ``node`` computes, or None for placeholders, outputs and unknown calls."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            # aten-level graphs (make_fx, AOTAutograd): "aten::index_copy_" -> "index_copy_". Only the write
            # and layout ops share their torch-level argument order; the matchers target Dynamo's graph.
            qualified = target._schema.name if hasattr(target, "_schema") else target._qualified_op_name
            return qualified.split("::")[-1]
        try:
            return _FUNCTIONS.get(target)
        except TypeError:  # unhashable target
            return None
    return None


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The (fake) example tensor FX recorded for ``node``: ``val`` (aten / make_fx) or ``example_value`` (Dynamo)."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return v
    return None


def shape(node: Any) -> tuple | None:
    t = tensor_meta(node)
    return tuple(t.shape) if t is not None else None


def ndim(node: Any) -> int | None:
    t = tensor_meta(node)
    return t.dim() if t is not None else None


def static_int(x: Any) -> int | None:
    """A size as a Python int when it is static; None for a symbolic size (never adds a guard)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt) and is_concrete_int(x):
        return int(x)
    return None


def same_sizes(a: Any, b: Any) -> bool:
    """Sizes equal for every value of their symbols (dynamic-shape graphs); decided without adding guards:
    a backend runs after Dynamo has fixed the guards of the frame."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, whether it was passed by position ``index`` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def is_input(node: Any) -> bool:
    """A graph input (Dynamo lifts parameters, buffers and cache tensors to placeholders) or an attribute."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def source_name(node: fx.Node) -> str | None:
    """Where Dynamo got a placeholder from, e.g. ``L['kwargs']['cache'].layers[0].keys``; the target of a get_attr."""
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    src = getattr(grapharg, "source", None)
    if src is None:
        return None
    name = getattr(src, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


def graph_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def render(value: Any) -> Any:
    """A node as its name, containers element-wise, anything else unchanged (for reports that outlive the graph)."""
    if isinstance(value, fx.Node):
        return value.name
    if isinstance(value, (list, tuple)):
        return type(value)(render(v) for v in value)
    if isinstance(value, slice):
        return slice(render(value.start), render(value.stop), render(value.step))
    return value
