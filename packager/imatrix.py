"""Importance-weighted INT4: calibrated rounding for onnxruntime's fast INT4 kernel.

The ``imatrix-b32`` recipe (``packager.config.QUANT_RECIPES``) exports twice: the
builder's symmetric INT4 model, whose graph is the scaffold (``MatMulNBits`` in blocks of
32, the tied embedding a ``GatherBlockQuantized`` over the lm_head's blocks), and an FP32
model of the same source, whose weights are quantised here and written into the scaffold
in place of the builder's round-to-nearest values, with integer zero points (asymmetric
blocks: half a byte per 32 weights; ``MatMulNBits`` keeps its integer path for them —
0.88x the symmetric default's decode on SmolLM2, where HQQ's float zero points lose ~15x).
The pipeline keeps the FP32 export as the quality card's reference.

Calibration runs the FP32 model over a text shipped with edgephi (``packager/calibration/``,
never an evaluation text) and records, for every MatMul, the mean square of each input
channel — llama.cpp's "importance matrix". Each block's range is then chosen, among
candidates that pull its minimum and maximum in, to minimise the block's rounding error
weighted by those importances: weights that meet large activations are rounded more
closely, at the expense of those that meet small ones.

Why not GPTQ's error feedback over the full ``xᵀx``: measured on SmolLM2 with the shipped
text (2.9k tokens), it cut every layer's own output error 4-5x and still raised perplexity
(+57% against FP32 where round-to-nearest loses +34%): so few tokens over-fit the
off-diagonal terms (docs/quantization.md). The diagonal needs no such volume, and K
numbers per MatMul instead of K² keep a 3.8B model's calibration within the FP32 model's
own memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuildError
from edgephi.packager import evaluate
from edgephi.packager.graph import int8_blocks
from edgephi.packager.optimize import decoder_file, save_decoder
from edgephi.runtime.genai import default_threads

CALIBRATION_TEXT = Path(__file__).parent / "calibration" / "mixed-en.txt"
BITS = 4
WINDOW = 512  # tokens per calibration run
# How far each end of a block's range may be pulled in (min and max independently): rounding
# a few outliers hard buys the rest a finer step. 49 candidates per block.
SHRINK = tuple(1.0 - 0.05 * i for i in range(7))  # 1.0 … 0.7
_ROWS = 1024  # most output rows searched at once by one thread
_FLOOR = 0.01  # importance floor, as a fraction of the mean: no weight is ignored entirely
_PRUNE = "/lm_head/prune/"  # the builder computes logits for the last position only


@dataclass(frozen=True)
class Calibration:
    """What a calibrated build learnt from; the quality card records it."""

    text: str  # file name and sha256 prefix, as evaluation texts are named (evaluate.text_id)
    tokens: int
    matmuls: int
    int8: tuple[str, ...] = ()  # the MatMuls written in INT8 by sensitivity (mixed recipes)

    def card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"calibration": self.text, "calibration_tokens": self.tokens}
        if self.int8:
            card["int8_matmuls"] = len(self.int8)
        return card


def quantize(
    model_dir: Path,
    fp32_dir: Path,
    workdir: Path,
    text: Path = CALIBRATION_TEXT,
    progress: Callable[[str], None] = lambda _msg: None,
    int8_budget: float = 0.0,
) -> Calibration:
    """Rewrite ``model_dir``'s INT4 MatMul weights from ``fp32_dir``'s, importance-weighted.

    With ``int8_budget`` (a fraction of the INT4 MatMul bytes), the MatMuls whose INT4
    rounding alone moves the model's next-token distribution most per byte are written in
    INT8 instead, as long as the extra bytes stay within the budget (``sensitivity``).
    """
    import onnx

    name = decoder_file(model_dir)
    model = onnx.load(str(model_dir / name))
    # The FP32 weights are read one at a time from the export's data file, never all at once.
    fp32 = onnx.load(str(fp32_dir / decoder_file(fp32_dir)), load_external_data=False)
    pairs = _pairs(model, fp32)
    if not pairs:
        raise BuildError("found no INT4 MatMul with an FP32 counterpart to calibrate")
    # The same tokenizer in both folders; og loads the weights to give it, so the INT4 ones.
    ids = token_ids(model_dir, text)
    if len(ids) < WINDOW:
        raise BuildError(f"the calibration text {text.name} has {len(ids)} tokens, fewer than {WINDOW}")
    progress(f"      imatrix: {len(pairs)} MatMuls, calibrating on {len(ids)} tokens of {text.name}")
    importance = channel_importance(fp32, fp32_dir, sorted({p.activation for p in pairs}), ids)
    inits = {t.name: t for t in model.graph.initializer}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    probe = _Probe(fp32, fp32_dir, pairs, ids[:WINDOW]) if int8_budget > 0 else None
    kl: dict[str, float] = {}
    try:
        for pair in pairs:
            weight = onnx.numpy_helper.to_array(fp32_inits[pair.fp32_weight], str(fp32_dir))  # [K, N]
            packed, scales, zeros = quantize_weight(weight, importance[pair.activation], pair.block_size)
            _replace(inits[pair.packed], packed)
            _replace(inits[pair.scales], scales.reshape(tuple(inits[pair.scales].dims)))
            zero_name = pair.fp32_weight + "_zero_points"
            model.graph.initializer.append(onnx.numpy_helper.from_array(zeros, zero_name))
            nodes[pair.node].input.append(zero_name)
            for lookup in _lookups(model, pair):
                # The tied embedding reads the same blocks, so it needs the same zero points.
                if len(lookup.input) == 3:
                    lookup.input.append(zero_name)
            if probe is not None:
                kl[pair.node] = probe.kl(pair, dequantize(packed, scales, zeros, pair.k))
    finally:
        if probe is not None:
            probe.close()
    int8: tuple[str, ...] = ()
    if probe is not None:
        budget = int8_budget * sum(p.bytes(BITS) for p in pairs)
        chosen = choose_int8(pairs, kl, budget)
        for pair in chosen:
            weight = onnx.numpy_helper.to_array(fp32_inits[pair.fp32_weight], str(fp32_dir))
            _to_int8(model, pair, weight)
        int8 = tuple(p.node for p in chosen)
        progress(
            f"      imatrix: {len(int8)} of {len(pairs)} MatMuls in INT8, the most sensitive per byte "
            f"within +{int8_budget:.0%} of the INT4 weights' bytes"
        )
    save_decoder(model, model_dir, name, workdir)
    return Calibration(text=evaluate.text_id(text), tokens=len(ids), matmuls=len(pairs), int8=int8)


@dataclass(frozen=True)
class _Pair:
    """One INT4 MatMul, the FP32 weight it comes from and the activation it multiplies."""

    node: str
    packed: str
    scales: str
    fp32_weight: str
    activation: str  # a tensor of the FP32 graph with every position (not the pruned lm_head's)
    block_size: int
    k: int
    n: int

    @property
    def is_lm_head(self) -> bool:
        return "/lm_head/" in self.node

    def bytes(self, bits: int) -> int:
        """Weights, FP32 scales and (INT4 only: edgephi's) zero points, as MatMulNBits stores them."""
        blocks = -(-self.k // self.block_size)
        zeros = -(-blocks // 2) if bits == BITS else 0
        return self.n * (blocks * self.block_size * bits // 8 + blocks * 4 + zeros)


def _attr(node: Any, key: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == key)


def _pairs(model: Any, fp32: Any) -> list[_Pair]:
    """The builder names an INT4 MatMul after its FP32 one, plus ``_Q4``."""
    producers = {out: node for node in fp32.graph.node for out in node.output}
    fp32_matmuls = {node.name: node for node in fp32.graph.node if node.op_type == "MatMul"}
    fp32_inits = {t.name for t in fp32.graph.initializer}
    pairs = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not node.name.endswith(f"_Q{BITS}"):
            continue
        source = fp32_matmuls.get(node.name[: -len(f"_Q{BITS}")])
        if source is None or source.input[1] not in fp32_inits:
            continue
        if _attr(node, "bits") != BITS or len(node.input) > 3:
            continue  # the builder's symmetric INT4 layout is the scaffold written over
        activation = source.input[0]
        while activation.startswith(_PRUNE):  # Unsqueeze(Gather(hidden, -1)): use every position
            activation = producers[activation].input[0]
        pairs.append(
            _Pair(
                node=node.name,
                packed=node.input[1],
                scales=node.input[2],
                fp32_weight=source.input[1],
                activation=activation,
                block_size=_attr(node, "block_size"),
                k=_attr(node, "K"),
                n=_attr(node, "N"),
            )
        )
    return pairs


def _lookups(model: Any, pair: _Pair) -> list[Any]:
    """The ``GatherBlockQuantized`` nodes that read ``pair``'s blocks (a tied embedding)."""
    reshaped = {n.output[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] == pair.packed}
    return [
        n
        for n in model.graph.node
        if n.op_type == "GatherBlockQuantized"
        and (n.input[0] == pair.packed or n.input[0] in reshaped)
        and n.input[2] == pair.scales
    ]


def choose_int8(pairs: list[_Pair], kl: dict[str, float], budget: float) -> list[_Pair]:
    """The MatMuls to write in INT8: most KL saved per extra byte first, within ``budget``
    bytes (greedy; INT8's own rounding counts as none of a MatMul's INT4 loss)."""
    chosen = []
    spent = 0
    for pair in sorted(pairs, key=lambda p: kl[p.node] / (p.bytes(8) - p.bytes(BITS)), reverse=True):
        extra = pair.bytes(8) - pair.bytes(BITS)
        if spent + extra <= budget:
            chosen.append(pair)
            spent += extra
    return chosen


class _Probe:
    """The FP32 model with every calibrated weight overridable (an initializer that is also
    a graph input): how far one MatMul's INT4 weights alone move the next-token
    distribution, as mean KL over one window of the calibration text.

    Logits are the final hidden states (every position; the export's lm_head is pruned to
    the last) times the lm_head weight, FP32 or the probed one: a logit soft-cap or scale
    after the lm_head is left out, which moves every measurement alike.
    """

    def __init__(self, fp32: Any, fp32_dir: Path, pairs: list[_Pair], ids: list[int]) -> None:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from edgephi.runtime.genai import default_threads

        lm_head = next((p for p in pairs if p.is_lm_head), None)
        if lm_head is None:
            raise BuildError("mixed INT8/INT4 needs the lm_head among the INT4 MatMuls; use imatrix-b32")
        graph = onnx.ModelProto()
        graph.CopyFrom(fp32)
        del graph.graph.output[:]
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(lm_head.activation))
        for pair in pairs:
            graph.graph.input.append(
                onnx.helper.make_tensor_value_info(pair.fp32_weight, onnx.TensorProto.FLOAT, [pair.k, pair.n])
            )
        self._staged = fp32_dir / "imatrix-sensitivity.onnx"
        onnx.save(graph, str(self._staged))
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads()
        options.log_severity_level = 3  # overriding initializers is the point, not a warning
        self._session = ort.InferenceSession(str(self._staged), options, providers=["CPUExecutionProvider"])
        window = np.array([ids], dtype=np.int64)
        self._feeds = {"input_ids": window, "attention_mask": np.ones_like(window)}
        self._feeds.update(past_inputs(self._session, fp32_dir))
        if "position_ids" in {i.name for i in self._session.get_inputs()}:
            self._feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        inits = {t.name: t for t in fp32.graph.initializer}
        self._lm_head = lm_head.node
        self._lm_weight = onnx.numpy_helper.to_array(inits[lm_head.fp32_weight], str(fp32_dir))
        self._reference = _log_softmax(self._hidden({}) @ self._lm_weight)

    def _hidden(self, override: dict[str, Any]) -> Any:
        (hidden,) = self._session.run(None, {**self._feeds, **override})
        return hidden.reshape(-1, hidden.shape[-1])

    def kl(self, pair: _Pair, weight: Any) -> float:
        """Mean KL(FP32 ‖ FP32 with ``pair``'s weight replaced by ``weight``) per position."""
        import numpy as np

        hidden = self._hidden({pair.fp32_weight: np.ascontiguousarray(weight, dtype=np.float32)})
        logp = _log_softmax(hidden @ (weight if pair.node == self._lm_head else self._lm_weight))
        return float((np.exp(self._reference) * (self._reference - logp)).sum(axis=1).mean())

    def close(self) -> None:
        del self._session
        self._staged.unlink(missing_ok=True)


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _to_int8(model: Any, pair: _Pair, weight: Any) -> None:
    """Rewrite ``pair``'s INT4 MatMul (and a lookup of its blocks) as symmetric 8-bit blocks."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == pair.node)
    blocks = -(-pair.k // pair.block_size)
    padded = np.zeros((pair.n, blocks * pair.block_size), dtype=np.float32)
    padded[:, : pair.k] = weight.T
    q, scales = int8_blocks(padded, pair.block_size)
    inits[pair.packed].CopyFrom(numpy_helper.from_array(q, pair.packed))
    _replace(inits[pair.scales], scales.reshape(tuple(inits[pair.scales].dims)))
    readers = [node, *_lookups(model, pair)]
    zero_points = {r.input[3] for r in readers if len(r.input) > 3}
    for reader in readers:
        del reader.input[3:]  # symmetric: onnxruntime's implied zero point 128
        next(a for a in reader.attribute if a.name == "bits").i = 8
    for init in [t for t in model.graph.initializer if t.name in zero_points]:
        model.graph.initializer.remove(init)
    for reshape in model.graph.node:
        if reshape.op_type == "Reshape" and reshape.input[0] == pair.packed:
            # The lookup's table is [rows, row bytes]: a byte per weight now, not two.
            shape = pair.packed + "_int8_rows"
            model.graph.initializer.append(
                numpy_helper.from_array(np.array([pair.n, blocks * pair.block_size], dtype=np.int64), shape)
            )
            reshape.input[1] = shape


def token_ids(model_dir: Path, text: Path) -> list[int]:
    from edgephi.runtime.genai import default_threads, open_model
    from edgephi.runtime.genai import og as _og

    og = _og()
    tokenizer = og.Tokenizer(open_model(model_dir, default_threads()))
    return [int(t) for t in tokenizer.encode(text.read_text(encoding="utf-8"))]


def channel_importance(fp32: Any, fp32_dir: Path, activations: list[str], ids: list[int]) -> dict[str, Any]:
    """Mean square of each channel of each named activation over windows of ``ids``."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from edgephi.runtime.genai import default_threads

    graph = onnx.ModelProto()
    graph.CopyFrom(fp32)
    del graph.graph.output[:]
    for name in activations:
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # Beside the export so its external weights resolve; only the graph is written again.
    staged = fp32_dir / "imatrix-calibration.onnx"
    onnx.save(graph, str(staged))
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads()
        session = ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        fixed = past_inputs(session, fp32_dir)
        if "position_ids" in {i.name for i in session.get_inputs()}:
            fixed["position_ids"] = np.arange(WINDOW, dtype=np.int64)[None, :]
        sums: dict[str, Any] = {}
        count = 0
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):
            window = np.array([ids[start : start + WINDOW]], dtype=np.int64)
            feeds = {"input_ids": window, "attention_mask": np.ones_like(window), **fixed}
            for name, value in zip(activations, session.run(activations, feeds), strict=True):
                x = value.reshape(-1, value.shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0) + (x * x).sum(axis=0)
            count += WINDOW
    finally:
        staged.unlink(missing_ok=True)
    return {name: total / count for name, total in sums.items()}


def past_inputs(session: Any, model_dir: Path) -> dict[str, Any]:
    """Empty past key/value inputs: each window is a fresh prompt."""
    import numpy as np

    decoder = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    shape = (1, int(decoder["num_key_value_heads"]), 0, int(decoder["head_size"]))
    return {
        i.name: np.zeros(shape, dtype=np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }


def quantize_weight(weight: Any, importance: Any, block_size: int) -> tuple[Any, Any, Any]:
    """An ONNX MatMul weight [K, N] → MatMulNBits bytes [N, blocks, block/2], scales [N, blocks]
    and packed zero points [N, ⌈blocks/2⌉].

    Asymmetric INT4 as onnxruntime stores it: value ``(q - zero) · scale``, q and zero in
    0..15, two to a byte, low nibble first. The candidate grids stretch each block's
    [min, max] (zero included) towards zero; the (1, 1) candidate is plain rounding.
    """
    import numpy as np

    w = np.ascontiguousarray(weight.T, dtype=np.float32)  # [N, K]: a row per output
    rows, k = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((rows, blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    imp = np.zeros(blocks * block_size, dtype=np.float32)
    imp[:k] = importance
    imp = (imp + _FLOOR * imp[:k].mean()).reshape(1, blocks, block_size)
    q = np.empty((rows, blocks, block_size), dtype=np.uint8)
    scales = np.empty((rows, blocks), dtype=np.float32)
    zeros = np.zeros((rows, blocks + blocks % 2), dtype=np.uint8)  # an even count packs whole

    threads = default_threads()
    step = max(1, min(_ROWS, -(-rows // threads)))  # bounded temporaries, and work for every core

    def search(r: int) -> None:
        groups = padded[r : r + step].reshape(-1, blocks, block_size)
        q[r : r + step], scales[r : r + step], zeros[r : r + step, :blocks] = _search(groups, imp)

    # Row slices are independent and numpy lets go of the GIL inside each operation, so
    # threads share the search across cores: 7 minutes for Phi-3.5-mini's weights on 2 cores,
    # where one core through fresh temporaries took 31 (docs/quantization.md).
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(search, range(0, rows, step)))
    return _pack(q), scales, _pack(zeros)


def dequantize(packed: Any, scales: Any, zeros: Any, k: int) -> Any:
    """``quantize_weight``'s stored bytes back to the ONNX MatMul weight [K, N] they stand for:
    what onnxruntime computes with, so the sensitivity probe measures what ships."""
    import numpy as np

    rows, blocks = scales.shape
    q = _unpack(packed).reshape(rows, blocks, -1).astype(np.float32)
    values = (q - _unpack(zeros)[:, :blocks, None]) * scales[..., None]
    return np.ascontiguousarray(values.reshape(rows, -1)[:, :k].T)


def _pack(values: Any) -> Any:
    """Two 4-bit values to a byte along the last axis, low nibble first."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpack(packed: Any) -> Any:
    """``_pack`` undone, flattened per row."""
    import numpy as np

    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(packed), -1)


def _search(groups: Any, imp: Any) -> tuple[Any, Any, Any]:
    """Per block of ``groups`` [rows, blocks, size]: the (q, scale, zero) of least weighted error."""
    import numpy as np

    low = np.minimum(groups.min(axis=2), 0)
    high = np.maximum(groups.max(axis=2), 0)
    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale = np.ones(low.shape, dtype=np.float32)
    best_zero = np.zeros(low.shape, dtype=np.float32)
    t = np.empty_like(groups)  # one scratch block, reused in place by every candidate
    for a in SHRINK:
        for b in SHRINK:
            span = high * b - low * a
            scale = np.where(span == 0, 1.0, span / 15).astype(np.float32)
            zero = np.clip(np.rint(-low * a / scale), 0, 15)
            # q = clip(rint(w / scale) + zero); err = Σ imp · ((q - zero) · scale - w)²
            np.divide(groups, scale[..., None], out=t)
            np.rint(t, out=t)
            t += zero[..., None]
            np.clip(t, 0, 15, out=t)
            t -= zero[..., None]
            t *= scale[..., None]
            t -= groups
            t *= t
            t *= imp
            err = t.sum(axis=2)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    q = np.clip(np.rint(groups / best_scale[..., None]) + best_zero[..., None], 0, 15)
    return q.astype(np.uint8), best_scale, best_zero.astype(np.uint8)


def _replace(tensor: Any, values: Any) -> None:
    from onnx import helper, numpy_helper

    if tuple(tensor.dims) != values.shape:
        raise BuildError(f"calibration wrote {values.shape} for {tensor.name}, which is {tuple(tensor.dims)}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)  # without decoding the old values
    tensor.CopyFrom(numpy_helper.from_array(values.astype(dtype), tensor.name))
