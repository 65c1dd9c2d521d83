"""One copy of a tied embedding in INT8 builds: the lookup reads the lm_head's INT8 blocks.

The builder shares a tied embedding with the lm_head only at INT4 (its
``GatherBlockQuantized`` path); at INT8 it writes the embedding a second time, in FP32 —
113 MB of SmolLM2's 267 MB of model files, and as much memory on the device. onnxruntime's
``GatherBlockQuantized`` reads 8-bit blocks in the MatMulNBits layout too (unsigned, zero
point 128 when none is given), so the lookup is pointed at the lm_head's blocks and the FP32
table dropped. Called by the pipeline after the export (``packager.pipeline``), before strip
and fuse, which then optimises the shared graph.

Only a table that *is* the lm_head's weights is replaced: a few rows are dequantised here
and compared with the FP32 table first, so an untied embedding is left as it is.

The trade, measured on SmolLM2 (docs/benchmarks.md): model files 255 → 147 MiB, peak RSS
299 → 317 MiB — onnxruntime memory-maps the FP32 table and touches only the rows looked up,
while the lm_head's INT8 blocks, now used by the lookup too, stay resident beside the copy
MatMulNBits prepacks. Smaller downloads and flash for a few percent of memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgephi.packager.graph import Graph
from edgephi.packager.optimize import decoder_file, save_decoder

BITS = 8
ZERO_POINT = 1 << (BITS - 1)
CHECK_ROWS = 64


def share_int8_embedding(model_dir: Path, workdir: Path) -> int:
    """Share the embedding with an INT8 lm_head in ``model_dir``; return the bytes saved (0: left)."""
    import numpy as np
    import onnx

    name = decoder_file(model_dir)
    model = onnx.load(str(model_dir / name))
    found = _tied_pair(model)
    if found is None:
        return 0
    gather, table, lm_head = found
    vocab, hidden = (int(d) for d in table.dims)
    saved = vocab * hidden * 4
    weight, scales = lm_head.input[1], lm_head.input[2]
    block_size = _attr(lm_head, "block_size")
    # [N, blocks, block_size] -> [vocab, hidden]: _tied_pair checked the blocks fill the rows.
    g = Graph(gather.name + "/")
    rows = g.op("Reshape", weight, g.const("int8_shape", np.array([vocab, hidden], dtype=np.int64)))
    g.op(
        "GatherBlockQuantized",
        rows,
        gather.input[1],
        scales,
        domain="com.microsoft",
        out=gather.output[0],
        bits=BITS,
        block_size=block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    g.splice(model, gather)
    model.graph.initializer.remove(table)
    save_decoder(model, model_dir, name, workdir)
    return saved


def embedding_gather(model: Any) -> Any:
    """The ``Gather`` that looks up a graph input (``input_ids``) in a table, if there is one.

    The table is an initializer, or for a tied FP32 graph the lm_head weight's ``Transpose``.
    """
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs:
            return node
    return None


def _attr(node: Any, key: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == key)


def _tied_pair(model: Any) -> tuple[Any, Any, Any] | None:
    """(embedding Gather, its FP32 table, the INT8 lm_head) when the table is the lm_head's weights."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    gather = embedding_gather(model)
    lm_head = next(
        (node for node in model.graph.node if node.op_type == "MatMulNBits" and "lm_head" in node.name),
        None,
    )
    if gather is None or gather.input[0] not in inits or lm_head is None or _attr(lm_head, "bits") != BITS:
        return None
    if len(lm_head.input) > 3 and lm_head.input[3]:
        return None  # explicit zero points: not the symmetric layout this reads
    table = inits[gather.input[0]]
    if table.data_type != TensorProto.FLOAT or len(table.dims) != 2:
        return None
    vocab, hidden = (int(d) for d in table.dims)
    if (_attr(lm_head, "N"), _attr(lm_head, "K")) != (vocab, hidden):
        return None
    if lm_head.input[1] not in inits or lm_head.input[2] not in inits:
        return None
    block_size = _attr(lm_head, "block_size")
    if hidden % block_size:
        return None  # padded blocks would gather rows wider than the hidden size
    picks = np.linspace(0, vocab - 1, CHECK_ROWS).astype(int)
    fp32 = numpy_helper.to_array(table)[picks]
    q = numpy_helper.to_array(inits[lm_head.input[1]])[picks].reshape(len(picks), -1, block_size)
    s = numpy_helper.to_array(inits[lm_head.input[2]]).reshape(vocab, -1)[picks]
    rows = ((q.astype(np.float32) - ZERO_POINT) * s[:, :, None]).reshape(len(picks), hidden)
    # INT8 rounding moves a weight by under one step of its block's scale (the quantizer's
    # scales may be negative, and it rounds to ±128 asymmetrically; measured up to 0.74 step).
    step = np.abs(np.repeat(s, block_size, axis=1))
    if not np.all(np.abs(rows - fp32) <= step + 1e-6):
        return None
    return gather, table, lm_head
