"""Writing ONNX nodes by hand: named constants and one-output nodes.

Where it sits: the packager's own graph writers build with one ``Graph`` — the vision
encoder and embedding models (``packager.vision``), HQQ's INT4 embedding lookup
(``packager.hqq``) and the INT8 lookup into a tied lm_head (``packager.embedding``). The
builder's decoder is edited by ``splice``, never rebuilt. ``int8_blocks`` is the 8-bit block
layout those writers and ``packager.imatrix``'s INT8 MatMuls share.
"""

from __future__ import annotations

from typing import Any


class Graph:
    """Nodes and initializers under construction; every name starts with ``prefix`` so that
    what is written never collides with the graph it joins."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.prefix = prefix
        self._n = 0

    def const(self, name: str, value: Any) -> str:
        """An initializer holding ``value`` (float64 stored as float32); returns its name."""
        import numpy as np
        from onnx import numpy_helper

        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, self.prefix + name))
        return self.prefix + name

    def ints(self, *values: int) -> str:
        """An int64 vector constant (shapes, axes, indices), named by its position."""
        import numpy as np

        self._n += 1
        return self.const(f"i{self._n}", np.array(values, dtype=np.int64))

    def op(self, op_type: str, *inputs: str, domain: str = "", out: str | None = None, **attrs: Any) -> str:
        """A node with one output, named ``out`` or after the node; returns the output's name."""
        from onnx import helper

        self._n += 1
        name = f"{self.prefix}{op_type}_{self._n}"
        output = out or name
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=name, domain=domain, **attrs)
        )
        return output

    def splice(self, model: Any, replaced: Any) -> None:
        """Put the nodes where the node ``replaced`` stood in ``model`` (which loses it) and
        add the constants: a rewrite of one node that keeps the graph topologically sorted."""
        index = list(model.graph.node).index(replaced)
        model.graph.node.remove(replaced)
        for offset, node in enumerate(self.nodes):
            model.graph.node.insert(index + offset, node)
        model.graph.initializer.extend(self.inits)


def int8_blocks(matrix: Any, block_size: int) -> tuple[Any, Any]:
    """``[rows, cols]`` → 8-bit blocks ``[rows, cols / block, block]`` (zero point 128) and scales.

    The layout ``MatMulNBits`` and ``GatherBlockQuantized`` read with ``bits=8`` and no
    zero-point input; symmetric, so a block's largest magnitude maps to ±127.
    """
    import numpy as np

    rows, cols = matrix.shape
    blocks = np.asarray(matrix, dtype=np.float32).reshape(rows, cols // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scales.astype(np.float32)
