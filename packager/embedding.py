"""The decoder's token-embedding table in quantised CPU builds: never a whole FP32 copy.

Called by the pipeline after the export (``packager.pipeline``), before strip and fuse.
The builder quantises MatMuls; the lookup table is left to this module, in two cases:

* **tied, INT8** (``share_int8_embedding``). The builder shares a tied embedding with the
  lm_head only at INT4 (its ``GatherBlockQuantized`` path); at INT8 it writes the embedding
  a second time, in FP32 — 113 MB of SmolLM2's 267 MB of model files. onnxruntime's
  ``GatherBlockQuantized`` reads 8-bit blocks in the MatMulNBits layout too (unsigned, zero
  point 128 when none is given), so the lookup is pointed at the lm_head's blocks and the
  FP32 table dropped. Only a table that *is* the lm_head's weights is replaced: a few rows
  are dequantised here and compared with the FP32 table first.
  The trade, measured on SmolLM2 (docs/benchmarks.md): model files 255 → 147 MiB, peak RSS
  299 → 317 MiB — onnxruntime memory-maps the FP32 table and touches only the rows looked
  up, while the lm_head's INT8 blocks, now used by the lookup too, stay resident beside the
  copy MatMulNBits prepacks. Smaller downloads and flash for a few percent of memory.
* **untied, INT4 or INT8** (``quantize_untied``). The builder keeps an untied table in FP32
  at every precision: 376 MiB of Phi-3.5-mini's 2.6 GiB INT4 model files. It is rewritten
  as a ``GatherBlockQuantized`` table in the build's own bits and block size, as llama.cpp's
  Q4/Q8 files keep ``token_embd``. The builder can do this itself (``op_types_to_quantize``
  with ``Gather``), but its quantizer then held more memory at once, and the export of a
  3.8B model, which peaks at 22.4 GiB, was killed on a 24 GiB machine; done here it reads
  the table alone. A token looks up one row, so decode reads no more for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgephi.packager import imatrix
from edgephi.packager.graph import Graph, int8_blocks
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
    _lookup_in_blocks(model, gather, table, g, [rows, scales], BITS, block_size)
    save_decoder(model, model_dir, name, workdir)
    return saved


def quantize_untied(model_dir: Path, workdir: Path, bits: int, block_size: int) -> int:
    """Rewrite ``model_dir``'s own FP32 embedding table in ``bits``-bit blocks of
    ``block_size``; return the bytes saved (0: no such table, or rows not whole blocks).

    INT4 blocks are asymmetric, each range the least-squares one of the candidates
    ``packager.imatrix`` searches (every channel alike: a lookup has no activations to
    weigh them by); INT8 blocks are the symmetric ones of the INT8 MatMuls.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    name = decoder_file(model_dir)
    model = onnx.load(str(model_dir / name))
    gather = embedding_gather(model)
    inits = {t.name: t for t in model.graph.initializer}
    if gather is None or gather.input[0] not in inits:
        return 0  # none, or a tied table read through the lm_head's weights
    table = inits[gather.input[0]]
    readers = [n for n in model.graph.node if table.name in n.input]
    if table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or readers != [gather]:
        return 0
    vocab, hidden = (int(d) for d in table.dims)
    if hidden % block_size:
        return 0  # padded blocks would gather rows wider than the hidden size
    values = numpy_helper.to_array(table)  # [vocab, hidden]: a row per token
    if bits == imatrix.BITS:
        packed, scales, zeros = imatrix.quantize_weight(values.T, np.ones(hidden, np.float32), block_size)
        blocks = {"q4": packed.reshape(vocab, hidden // 2), "scales": scales, "zero_points": zeros}
    elif bits == BITS:
        q, scales = int8_blocks(values, block_size)
        blocks = {"q8": q.reshape(vocab, hidden), "scales": scales}
    else:
        raise ValueError(f"a lookup table is quantised to 4 or 8 bits, not {bits}")
    g = Graph(gather.name + "/")
    inputs = [g.const(key, value) for key, value in blocks.items()]
    _lookup_in_blocks(model, gather, table, g, inputs, bits, block_size)
    save_decoder(model, model_dir, name, workdir)
    return values.nbytes - sum(value.nbytes for value in blocks.values())


def _lookup_in_blocks(
    model: Any, gather: Any, table: Any, g: Graph, blocks: list[str], bits: int, block_size: int
) -> None:
    """Put a ``GatherBlockQuantized`` over ``blocks`` (rows, scales[, zero points]) where the
    FP32 ``gather`` stood, with ``g``'s constants, and drop its ``table``."""
    rows, *quantisation = blocks
    g.op(
        "GatherBlockQuantized",
        rows,
        gather.input[1],
        *quantisation,
        domain="com.microsoft",
        out=gather.output[0],
        bits=bits,
        block_size=block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    g.splice(model, gather)
    model.graph.initializer.remove(table)


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
