"""Phi-3.5-vision's image side as two ONNX models, built by our code — no remote code at pack time.

onnxruntime-genai runs a ``phi3v`` model as three sessions: ``vision.onnx`` (pixels of
one or more images → image features), ``embedding.onnx`` (token ids and image features
→ ``inputs_embeds``) and the text decoder, which the model builder exports from the same
checkpoint (``edgephi.packager.pipeline``). Its image processor (onnxruntime-extensions'
``Phi3ImageTransform``, configured by ``processor_config.json``) does the HD crop
transform: resize into a grid of at most 16 crops of 336×336 pixels, pad with white,
normalise with CLIP's mean and std, and put a 336×336 global view first.

What is reproduced here, from Microsoft's published ``image_embedding_phi3_v.py`` for
Phi-3(.5)-vision (as adapted in vLLM's ``phi3v.py``) and the CLIP vision transformer of
Hugging Face transformers:

* the image tower: CLIP ViT-L/14-336 (patch convolution, class token, position
  embeddings, pre-LayerNorm, pre-norm encoder layers with quick-GELU MLPs), run up to
  ``layer_idx`` (−2: the second-to-last layer's output), class token dropped;
* the HD glue: each crop's 24×24 patches merged 2×2 into 12×12 features of 4× width;
  the crops laid out as their ``h×w`` grid; a learnt ``sub_GN`` feature closing every
  row; then ``[sub-image rows, glb_GN, global-image rows]`` (``hd_transform_order``
  ``sub_glb``; ``glb_sub`` swaps the two);
* the projector: Linear → GELU (erf) → Linear into the decoder's hidden size.

The number of features per image is ``(h·w + 1)·144 + 1 + (h + 1)·12`` for an ``h×w``
crop grid, the count og's processor reserves in the prompt
(``edgephi.runtime.images.image_tokens``). The tower's shape (width, depth, MLP size)
is read from the checkpoint's weights; attention heads are 64 wide, as in ViT-L/14.

The embedding model looks text tokens up in the decoder's embedding table and puts the
image features, in order, where og's processor wrote negative ids (``-k`` for image
``k``). Both models are FP32 unless the build asks for INT8 (``--vision-precision``):
then every Linear of the tower and the projector is an 8-bit ``MatMulNBits`` and the
token table a ``GatherBlockQuantized`` over 8-bit blocks — symmetric, one scale per
block along the input dimension, zero point 128 — a little over a quarter of the bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import BuildError, NotAModel
from edgephi.packager.graph import Graph, int8_blocks

ARCHITECTURE = "Phi3VForCausalLM"
PREFIX = "model.vision_embed_tokens."
TOWER = PREFIX + "img_processor.vision_model."
CROP = 336  # og's Phi3ImageTransform cuts 336x336 crops, whatever the config says
HEAD_DIM = 64  # CLIP ViT-L/14: 16 heads of 64
OPSET = 17
CONTRIB = "com.microsoft"  # MatMulNBits, GatherBlockQuantized
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# og's processor (onnxruntime-extensions 0.14+): decode, to RGB, HD transform into 16 crops.
PROCESSOR_CONFIG: dict[str, Any] = {
    "processor": {
        "name": "image_processing",
        "transforms": [
            {
                "operation": {
                    "name": "decode_image",
                    "domain": "com.microsoft.extensions",
                    "type": "DecodeImage",
                    "attrs": {"color_space": "BGR"},
                }
            },
            {
                "operation": {
                    "name": "convert_to_rgb",
                    "domain": "com.microsoft.extensions",
                    "type": "ConvertRGB",
                }
            },
            {
                "operation": {
                    "name": "phi3_image_transform",
                    "domain": "com.microsoft.extensions",
                    "type": "Phi3ImageTransform",
                    "attrs": {"num_crops": 16, "num_img_tokens": 144},
                }
            },
        ],
    }
}


@dataclass(frozen=True)
class Int8:
    """How an INT8 image side stores its matrices: blocks along the input dimension."""

    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits' compute: 4 = int8 activations, 0 = dequantise to FP32


@dataclass(frozen=True)
class VisionSpec:
    """The image side of a Phi-3(.5)-vision checkpoint, as its config and weights describe it."""

    width: int  # CLIP hidden size (1024 for ViT-L)
    mlp: int  # CLIP intermediate size
    layers: int  # encoder layers run (the checkpoint's depth + layer_idx + 1)
    patch: int
    image_size: int
    hidden: int  # the decoder's hidden size: the projector's output
    order: str  # "sub_glb" or "glb_sub"
    eps: float = 1e-5

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


def is_vision(config: dict[str, Any]) -> bool:
    return (config.get("architectures") or [None])[0] == ARCHITECTURE


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config as transformers' native Phi-3 reads it.

    ``model_type: phi3_v`` needs the checkpoint's own modeling code; the text decoder is
    a plain Phi-3 (long RoPE), so the builder gets ``phi3`` with the vision architecture
    name kept, which makes it export a decoder that takes ``inputs_embeds``.
    """
    text = {k: v for k, v in config.items() if k not in ("embd_layer", "img_processor", "auto_map")}
    text["model_type"] = "phi3"
    scaling = text.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type") == "su":
        # Phi-3-vision's name for long RoPE, from before transformers renamed it.
        text["rope_scaling"] = {**scaling, "type": "longrope"}
    text.pop("_attn_implementation", None)
    return text


def stage_text_folder(source: Path, config: dict[str, Any], out: Path) -> Path:
    """A folder the builder can read: links to the checkpoint's files, a native config."""
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(".py"):
            (out / path.name).symlink_to(path.resolve())
    (out / "config.json").write_text(json.dumps(text_config(config), indent=2), encoding="utf-8")
    return out


# --- reading the checkpoint -----------------------------------------------------------------


def _read_weights(folder: Path, *wanted: str) -> dict[str, Any]:
    """Tensors whose names start with one of ``wanted``, as FP32 numpy arrays."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise NotAModel(f"{folder} has no *.safetensors files; Phi-3.5-vision is packed from safetensors")
    out: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.startswith(wanted):
                    out[name] = fh.get_tensor(name).float().numpy()
    return out


def image_weights(source: Path) -> dict[str, Any]:
    """The tower's, the separators' and the projector's weights: what ``vision_model`` reads."""
    # Not the whole prefix: the original code also stores the token table there (``wte``).
    return _read_weights(source, TOWER, PREFIX + "sub_GN", PREFIX + "glb_GN", PREFIX + "img_projection.")


def spec_from(config: dict[str, Any], weights: dict[str, Any]) -> VisionSpec:
    embd = config.get("embd_layer") or {}
    proc = config.get("img_processor") or {}
    if not (embd.get("use_hd_transform") and embd.get("with_learnable_separator")):
        raise BuildError(
            "this vision checkpoint does not use the HD transform with learnt separators, "
            "the only image embedding og's phi3v processor feeds"
        )
    if proc.get("type_feature", "patch") != "patch":
        raise BuildError(
            f"img_processor.type_feature {proc.get('type_feature')!r} is not supported (only 'patch')"
        )
    order = str(embd.get("hd_transform_order", "glb_sub"))
    if order not in ("sub_glb", "glb_sub"):
        raise BuildError(f"embd_layer.hd_transform_order {order!r} is neither sub_glb nor glb_sub")
    try:
        patch = weights[TOWER + "embeddings.patch_embedding.weight"]
        positions = weights[TOWER + "embeddings.position_embedding.weight"]
        fc1 = weights[TOWER + "encoder.layers.0.mlp.fc1.weight"]
        proj = weights[PREFIX + "img_projection.0.weight"]
    except KeyError as exc:
        raise NotAModel(f"the checkpoint lacks the vision weight {exc.args[0]}") from None
    depth = 1 + max(
        int(m[1]) for k in weights if (m := re.match(re.escape(TOWER) + r"encoder\.layers\.(\d+)\.", k))
    )
    layer_idx = int(proc.get("layer_idx", -2))
    used = depth + layer_idx + 1 if layer_idx < 0 else layer_idx + 1
    if not 1 <= used <= depth:
        raise BuildError(f"img_processor.layer_idx {layer_idx} is outside the tower's {depth} layers")
    width, size = int(patch.shape[0]), int(patch.shape[-1])
    grid = round(math.sqrt(positions.shape[0] - 1))
    if grid * size != CROP or grid % 2:
        raise BuildError(
            f"the image tower sees {grid * size}-pixel crops in a {grid}x{grid} grid; "
            f"og's Phi-3 image processor cuts {CROP}-pixel crops for an even grid"
        )
    if embd.get("projection_cls", "mlp") != "mlp" or PREFIX + "img_projection.2.weight" not in weights:
        raise BuildError("only the 2-layer MLP image projector (projection_cls 'mlp') is supported")
    if proj.shape[1] != 4 * width:
        raise BuildError(f"the projector takes {proj.shape[1]} features, not 4 x the tower's {width}")
    return VisionSpec(
        width=width,
        mlp=int(fc1.shape[0]),
        layers=used,
        patch=size,
        image_size=grid * size,
        hidden=int(weights[PREFIX + "img_projection.2.weight"].shape[0]),
        order=order,
    )


# --- ONNX ------------------------------------------------------------------------------------


class _Graph(Graph):
    """``Graph`` with the encoder's layers. With ``int8`` set, ``linear`` writes 8-bit
    ``MatMulNBits`` for every weight whose input dimension fills whole blocks (the rest
    stay FP32)."""

    def __init__(self, prefix: str = "", int8: Int8 | None = None) -> None:
        super().__init__(prefix)
        self.int8 = int8

    def linear(self, x: str, weights: dict[str, Any], name: str) -> str:
        weight = weights[name + ".weight"]  # [out, in], as torch stores it
        if self.int8 is not None and weight.shape[1] % self.int8.block_size == 0:
            blocks, scales = int8_blocks(weight, self.int8.block_size)
            y = self.op(
                "MatMulNBits",
                x,
                self.const(name + ".weight_q8", blocks),
                self.const(name + ".weight_scales", scales.reshape(-1)),
                domain=CONTRIB,
                K=int(weight.shape[1]),
                N=int(weight.shape[0]),
                bits=8,
                block_size=self.int8.block_size,
                accuracy_level=self.int8.accuracy_level,
            )
        else:
            y = self.op("MatMul", x, self.const(name + ".weight", weight.T.copy()))
        if name + ".bias" in weights:
            y = self.op("Add", y, self.const(name + ".bias", weights[name + ".bias"]))
        return y

    def layer_norm(self, x: str, weights: dict[str, Any], name: str, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.const(name + ".weight", weights[name + ".weight"]),
            self.const(name + ".bias", weights[name + ".bias"]),
            axis=-1,
            epsilon=eps,
        )


def _tower(g: _Graph, crops: str, spec: VisionSpec, w: dict[str, Any]) -> str:
    """CLIP's vision transformer up to the chosen layer: [n, 3, 336, 336] → [n, 576, width]."""
    import numpy as np

    x = g.op(
        "Conv",
        crops,
        g.const("patch", w[TOWER + "embeddings.patch_embedding.weight"]),
        kernel_shape=[spec.patch, spec.patch],
        strides=[spec.patch, spec.patch],
    )
    x = g.op("Transpose", g.op("Reshape", x, g.ints(0, spec.width, -1)), perm=[0, 2, 1])
    n = g.op("Slice", g.op("Shape", x), g.ints(0), g.ints(1))
    cls = g.const("cls", w[TOWER + "embeddings.class_embedding"].reshape(1, 1, spec.width))
    cls = g.op("Expand", cls, g.op("Concat", n, g.ints(1, spec.width), axis=0))
    x = g.op("Concat", cls, x, axis=1)
    x = g.op("Add", x, g.const("positions", w[TOWER + "embeddings.position_embedding.weight"]))
    x = g.layer_norm(x, w, TOWER + "pre_layrnorm", spec.eps)
    scale = g.const("scale", np.array(spec.width // spec.heads, dtype=np.float32) ** -0.5)
    split = g.ints(0, 0, spec.heads, spec.width // spec.heads)
    for i in range(spec.layers):
        p = f"{TOWER}encoder.layers.{i}."
        h = g.layer_norm(x, w, p + "layer_norm1", spec.eps)
        q = g.op(
            "Transpose",
            g.op("Reshape", g.op("Mul", g.linear(h, w, p + "self_attn.q_proj"), scale), split),
            perm=[0, 2, 1, 3],
        )
        k = g.op(
            "Transpose", g.op("Reshape", g.linear(h, w, p + "self_attn.k_proj"), split), perm=[0, 2, 3, 1]
        )
        v = g.op(
            "Transpose", g.op("Reshape", g.linear(h, w, p + "self_attn.v_proj"), split), perm=[0, 2, 1, 3]
        )
        a = g.op("MatMul", g.op("Softmax", g.op("MatMul", q, k), axis=-1), v)
        a = g.op("Reshape", g.op("Transpose", a, perm=[0, 2, 1, 3]), g.ints(0, 0, spec.width))
        x = g.op("Add", x, g.linear(a, w, p + "self_attn.out_proj"))
        h = g.linear(g.layer_norm(x, w, p + "layer_norm2", spec.eps), w, p + "mlp.fc1")
        # quick_gelu, as CLIP was trained with: x * sigmoid(1.702 x)
        h = g.op("Mul", h, g.op("Sigmoid", g.op("Mul", h, g.const(f"qg{i}", np.float32(1.702)))))
        x = g.op("Add", x, g.linear(h, w, p + "mlp.fc2"))
    return g.op("Slice", x, g.ints(1), g.ints(2**62), g.ints(1))  # drop the class token


def _image_body(spec: VisionSpec, w: dict[str, Any], int8: Int8 | None) -> Any:
    """The Loop body: image ``i``'s valid crops → its features, appended to the running set."""
    import numpy as np
    from onnx import TensorProto, helper

    g = _Graph("img/", int8)
    half, wide = spec.grid // 2, 4 * spec.width
    size = g.op("Gather", "image_sizes", "i", axis=0)
    gh = g.op("Div", g.op("Gather", size, g.ints(0), axis=0), g.ints(CROP))  # [1]
    gw = g.op("Div", g.op("Gather", size, g.ints(1), axis=0), g.ints(CROP))
    crops = g.op("Gather", "pixel_values", "i", axis=0)  # [max_crops + 1, 3, 336, 336]
    crops = g.op("Slice", crops, g.ints(0), g.op("Add", g.op("Mul", gh, gw), g.ints(1)), g.ints(0))
    feats = _tower(g, crops, spec, w)
    # 2x2 merge: [n, 24, 24, C] → [n, 12, 12, 4C]
    merged = g.op("Reshape", feats, g.ints(-1, half, 2, half, 2, spec.width))
    merged = g.op("Reshape", g.op("Transpose", merged, perm=[0, 1, 3, 2, 4, 5]), g.ints(-1, half, half, wide))
    sub_gn = g.const("sub_GN", w[PREFIX + "sub_GN"].reshape(1, 1, wide))
    glb_gn = g.const("glb_GN", w[PREFIX + "glb_GN"].reshape(1, wide))

    def rows_with_newline(grid: str, rows: str) -> str:
        newline = g.op("Expand", sub_gn, g.op("Concat", rows, g.ints(1, wide), axis=0))
        return g.op("Reshape", g.op("Concat", grid, newline, axis=1), g.ints(-1, wide))

    glb = g.op("Reshape", g.op("Slice", merged, g.ints(0), g.ints(1), g.ints(0)), g.ints(half, half, wide))
    glb = rows_with_newline(glb, g.ints(half))
    sub = g.op("Slice", merged, g.ints(1), g.ints(2**62), g.ints(0))
    sub = g.op("Reshape", sub, g.op("Concat", gh, gw, g.ints(half, half, wide), axis=0))
    sub = g.op("Transpose", sub, perm=[0, 2, 1, 3, 4])  # [h, 12, w, 12, 4C]
    rows, cols = g.op("Mul", gh, g.ints(half)), g.op("Mul", gw, g.ints(half))
    sub = rows_with_newline(g.op("Reshape", sub, g.op("Concat", rows, cols, g.ints(wide), axis=0)), rows)
    parts = (sub, glb_gn, glb) if spec.order == "sub_glb" else (glb, glb_gn, sub)
    x = g.op("Concat", *parts, axis=0)
    x = g.linear(x, w, PREFIX + "img_projection.0")
    # nn.GELU(): the exact, erf form
    x = g.op(
        "Mul",
        g.op("Mul", x, g.const("half", np.float32(0.5))),
        g.op(
            "Add",
            g.op("Erf", g.op("Div", x, g.const("sqrt2", np.float32(math.sqrt(2))))),
            g.const("one", np.float32(1.0)),
        ),
    )
    x = g.linear(x, w, PREFIX + "img_projection.2")
    out = g.op("Concat", "acc", x, axis=0)
    cond = g.op("Identity", "cond")
    return helper.make_graph(
        g.nodes,
        "image",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["t", spec.hidden]),
        ],
        [
            helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
            helper.make_tensor_value_info(out, TensorProto.FLOAT, ["t2", spec.hidden]),
        ],
        initializer=g.inits,
    )


def _model(graph: Any) -> Any:
    from onnx import helper

    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgephi")


def vision_model(spec: VisionSpec, weights: dict[str, Any], int8: Int8 | None = None) -> Any:
    """``pixel_values [images, crops, 3, 336, 336]``, ``image_sizes [images, 2]`` → ``image_features``."""
    import numpy as np
    from onnx import TensorProto, helper

    g = _Graph()
    count = g.op("Gather", g.op("Shape", "pixel_values"), g.const("first", np.array(0, np.int64)), axis=0)
    empty = g.const("no_features", np.zeros((0, spec.hidden), dtype=np.float32))
    loop = helper.make_node(
        "Loop", [count, "", empty], ["image_features"], name="images", body=_image_body(spec, weights, int8)
    )
    graph = helper.make_graph(
        [*g.nodes, loop],
        "phi3v-vision",
        [
            helper.make_tensor_value_info(
                "pixel_values", TensorProto.FLOAT, ["num_images", "max_num_crops", 3, CROP, CROP]
            ),
            helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["num_images", 2]),
        ],
        [
            helper.make_tensor_value_info(
                "image_features", TensorProto.FLOAT, ["num_image_tokens", spec.hidden]
            )
        ],
        initializer=g.inits,
    )
    return _model(graph)


def embedding_model(table: Any, int8: Int8 | None = None) -> Any:
    """``input_ids [batch, seq]`` (negative: image slots), ``image_features`` → ``inputs_embeds``."""
    import numpy as np
    from onnx import TensorProto, helper

    hidden = int(table.shape[1])
    g = _Graph()
    image = g.op("Less", "input_ids", g.ints(0))
    ids = g.op("Where", image, g.ints(0), "input_ids")
    if int8 is not None and hidden % int8.block_size == 0:
        blocks, scales = int8_blocks(table, int8.block_size)
        text = g.op(
            "GatherBlockQuantized",
            g.const("embed_tokens_q8", blocks.reshape(table.shape)),
            ids,
            g.const("embed_tokens_scales", scales),
            domain=CONTRIB,
            gather_axis=0,
            quantize_axis=1,
            block_size=int8.block_size,
            bits=8,
        )
    else:
        text = g.op("Gather", g.const("embed_tokens", table), ids, axis=0)
    # The k-th image slot of the prompt takes the k-th image feature; text positions point
    # at an appended zero row, so a prompt without images never indexes an empty tensor.
    flat = g.op("Reshape", image, g.ints(-1))
    slot = g.op("Sub", g.op("CumSum", g.op("Cast", flat, to=TensorProto.INT64), g.ints(0)), g.ints(1))
    features = g.op(
        "Concat", "image_features", g.const("zero_row", np.zeros((1, hidden), np.float32)), axis=0
    )
    n = g.op("Gather", g.op("Shape", "image_features"), g.ints(0), axis=0)
    slot = g.op("Reshape", g.op("Where", flat, slot, n), g.op("Shape", "input_ids"))
    merged = g.op("Where", g.op("Unsqueeze", image, g.ints(-1)), g.op("Gather", features, slot, axis=0), text)
    out = helper.make_node("Identity", [merged], ["inputs_embeds"], name="output")
    graph = helper.make_graph(
        [*g.nodes, out],
        "phi3v-embedding",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", hidden]),
        ],
        [
            helper.make_tensor_value_info(
                "inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden]
            )
        ],
        initializer=g.inits,
    )
    return _model(graph)


def _save(model: Any, path: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    onnx.checker.check_model(str(path))


def export(source: Path, config: dict[str, Any], model_dir: Path, int8: Int8 | None = None) -> VisionSpec:
    """Write vision.onnx, embedding.onnx and processor_config.json beside the built decoder."""
    weights = image_weights(source)
    spec = spec_from(config, weights)
    table = _read_weights(source, "model.embed_tokens.weight").get("model.embed_tokens.weight")
    if table is None:
        raise NotAModel(f"{source} has no model.embed_tokens.weight for the embedding model")
    _save(vision_model(spec, weights, int8), model_dir / "vision.onnx")
    _save(embedding_model(table, int8), model_dir / "embedding.onnx")
    (model_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
    path = model_dir / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    genai["model"]["type"] = "phi3v"
    genai["model"]["embedding"] = {
        "filename": "embedding.onnx",
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    genai["model"]["vision"] = {
        "filename": "vision.onnx",
        "config_filename": "processor_config.json",
        "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return spec
