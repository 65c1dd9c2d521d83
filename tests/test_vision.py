"""Phi-3.5-vision: pack a tiny model of its real structure, look at pictures through every door.

The checkpoint (``tiny.tiny_vision_model``) has Phi-3.5-vision's weight names and config
with a scaled-down CLIP tower; pictures are made here (PNG by our own writer, JPEG by
Pillow). The image encoder's ONNX output is compared with a PyTorch reference built from
transformers' own ``CLIPVisionModel`` and a line-by-line transcription of the published
HD glue, on the pixels og's processor produced.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import tiny
from conftest import build_bundle, serving
from edgephi.core.errors import BadImage, BuildError, ConfigError, ContextOverflow
from edgephi.runtime import images, load, memory
from edgephi.runtime.chat import Conversation
from edgephi.runtime.engine import Engine
from edgephi.runtime.manifest import Manifest
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.server import ModelServer
from edgephi.runtime.session import VISION_NOTE
from edgephi.runtime.store import Store
from edgephi.targets import Precision
from test_cli import exe
from test_server import raw

pytestmark = pytest.mark.slow
GREEDY = GenerationOptions(max_tokens=8, temperature=0.0)
ASK = [{"role": "user", "content": "What is in this picture?"}]


def picture(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of smooth colour fields (random but compressible)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [(x * rng.uniform(0.1, 2) + y * rng.uniform(0.1, 2) + rng.uniform(0, 255)) % 256 for _ in range(3)],
        -1,
    )
    return images.png(width, height, rgb.astype(np.uint8).tobytes())


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.open(io.BytesIO(picture(width, height, seed))).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def distance(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """How far image features are from a reference: the largest difference as a fraction of
    the largest reference feature, and the least cosine between matching feature rows."""
    error = np.abs(got - want).max() / np.abs(want).max()
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    return float(error), float(cosine.min())


@pytest.fixture(scope="module")
def engine(vision_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load(vision_bundle, store=Store(tmp_path_factory.mktemp("vision-store")))


# --- image tokens, by hand ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        # 1000x500: ratio 2; the largest scale with scale * ceil(scale / 2) <= 16 is 5, so the
        # long side becomes 5 crops (1680 px), the short one 840 px -> 3 crops: a 3x5 grid.
        # (15 + 1) * 144 + 1 + (3 + 1) * 12 = 2304 + 1 + 48
        (1000, 500, 2353),
        # 200x300 (portrait): ratio 1.5 -> scale 4; 1344 x 896 px -> 4 rows x 3 columns.
        # (12 + 1) * 144 + 1 + (4 + 1) * 12 = 1872 + 1 + 60
        (200, 300, 1933),
        # square: 4 x 4 = 16 crops. 17 * 144 + 1 + 5 * 12
        (336, 336, 2509),
        # a 4:3 phone photo: scale 4, 1344 x 1008 px -> 3 x 4. 13 * 144 + 1 + 4 * 12
        (4032, 3024, 1921),
        # 100x5000: 16 crops in one column, the most any image costs. 17 * 144 + 1 + 17 * 12
        (100, 5000, 2653),
    ],
)
def test_image_tokens_by_hand(width: int, height: int, tokens: int) -> None:
    assert images.image_tokens(width, height) == tokens
    assert images.image_tokens(width, height) <= images.max_image_tokens() == 2653


def test_planner_counts_the_encoder_and_the_image_tokens(vision_bundle: Path) -> None:
    with zipfile.ZipFile(vision_bundle) as zf:
        manifest = Manifest.from_bytes(zf.read("manifest.json"))
    shape = memory.ModelShape.from_manifest(manifest)
    # The tiny encoder (64 wide, 1 head, MLP 128) on 17 crops of 577 tokens, 4 bytes each:
    # scores and their softmax 2 * 577^2 = 665,858; MLP 2 * 577 * 128 = 147,712; activations
    # 6 * 577 * 64 = 221,568; pixels 3 * 336^2 = 338,688 -> 1,373,826 floats per crop,
    # x 17 x 4 = 93,420,168 bytes.
    assert manifest.memory.vision_scratch_bytes == 93_420_168 == shape.vision_scratch_bytes
    assert shape.max_image_tokens == 2653 and shape.default_context == 4096
    text_only = memory.ModelShape(**{**shape.__dict__, "vision_scratch_bytes": 0})
    assert shape.need(1000) - text_only.need(1000) == 93_420_168
    roomy = memory.plan(shape, budget=shape.need(4096), budget_source="test")
    assert roomy.max_length == 4096 and "one image of any shape fits, leaving 1443 tokens" in roomy.describe()
    tight = memory.plan(shape, budget=shape.need(2600), budget_source="test")
    assert tight.max_length == 2600 and "a 2509-token square image leaves 91 tokens" not in tight.describe()
    assert "too small for a square image" in tight.describe()


def test_og_processor_reserves_what_we_count(engine: Engine) -> None:
    import onnxruntime_genai as og

    for width, height in ((1000, 500), (200, 300), (640, 640), (50, 700)):
        inputs = engine._processor("<|image_1|>\nHi", images=og.Images.open_bytes(picture(width, height)))
        assert int(inputs["num_image_tokens"].as_numpy().sum()) == images.image_tokens(width, height)


# --- packing ----------------------------------------------------------------------------------


def test_bundle_describes_its_sessions_and_inputs(vision_bundle: Path) -> None:
    import onnx

    with zipfile.ZipFile(vision_bundle) as zf:
        manifest = Manifest.from_bytes(zf.read("manifest.json"))
        names = set(zf.namelist())
        genai = json.loads(zf.read("model/genai_config.json"))
        decoder = onnx.load_model_from_string(zf.read("model/model.onnx"))
        vision_graph = onnx.load_model_from_string(zf.read("model/vision.onnx"))
    assert {"model/vision.onnx", "model/embedding.onnx", "model/processor_config.json"} <= names
    model = manifest.model.to_dict()
    assert model["architecture"] == "Phi3VForCausalLM" and model["modalities"] == ["text", "image"]
    assert model["sessions"]["vision"] == {
        "file": "vision.onnx",
        "inputs": ["pixel_values", "image_sizes"],
        "outputs": ["image_features"],
    }
    assert model["sessions"]["embedding"]["inputs"] == ["input_ids", "image_features"]
    assert "inputs_embeds" in model["sessions"]["decoder"]["inputs"]
    assert model["vision"]["encoder"]["precision"] == "fp32" and model["vision"]["max_image_tokens"] == 2653
    assert manifest.precision == "int4" and manifest.chat_template
    # The decoder is INT4 and takes embeddings; the encoder stays float.
    assert any(n.op_type == "MatMulNBits" for n in decoder.graph.node)
    assert {"inputs_embeds", "attention_mask"} <= {i.name for i in decoder.graph.input}
    assert "input_ids" not in {i.name for i in decoder.graph.input}
    assert not any(n.op_type == "MatMulNBits" for n in vision_graph.graph.node)
    assert (
        genai["model"]["type"] == "phi3v"
        and genai["model"]["vision"]["config_filename"] == "processor_config.json"
    )


def _reference(source: Path, pixel_values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Phi-3.5-vision's image embedding in PyTorch: transformers' CLIP + the published HD glue."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    w = load_file(str(source / "model.safetensors"))
    p = "model.vision_embed_tokens."
    clip = CLIPVisionModel(CLIPVisionConfig(**tiny.VISION_SPEC["clip"])).eval()
    tower = p + "img_processor.vision_model."
    clip.load_state_dict({k[len(tower) :]: v for k, v in w.items() if k.startswith(tower)}, strict=True)
    out = []
    with torch.no_grad():
        for crops, (h, wd) in zip(torch.from_numpy(pixel_values), sizes.tolist(), strict=True):
            rows, cols = h // 336, wd // 336
            feats = clip(crops[: 1 + rows * cols], output_hidden_states=True).hidden_states[-2][:, 1:]
            n, length, c = feats.shape
            g = int(length**0.5)
            merged = (
                feats.reshape(n, g // 2, 2, g // 2, 2, c)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(n, g // 2, g // 2, 4 * c)
            )

            def newline(x: torch.Tensor, c: int = c) -> torch.Tensor:
                sep = w[p + "sub_GN"].reshape(1, 1, 4 * c).expand(x.shape[0], 1, 4 * c)
                return torch.cat([x, sep], 1).reshape(-1, 4 * c)

            glb = newline(merged[0])
            sub = merged[1:].reshape(rows, cols, g // 2, g // 2, 4 * c).permute(0, 2, 1, 3, 4)
            sub = newline(sub.reshape(rows * g // 2, cols * g // 2, 4 * c))
            x = torch.cat([sub, w[p + "glb_GN"].reshape(1, 4 * c), glb])  # sub_glb
            x = torch.nn.functional.gelu(
                x @ w[p + "img_projection.0.weight"].T + w[p + "img_projection.0.bias"]
            )
            out.append(x @ w[p + "img_projection.2.weight"].T + w[p + "img_projection.2.bias"])
    return torch.cat(out).numpy()


def test_vision_encoder_matches_the_pytorch_reference(engine: Engine, vision_dir: Path) -> None:
    import onnxruntime as ort
    import onnxruntime_genai as og

    pics = og.Images.open_bytes(picture(700, 400, seed=1), jpeg(300, 500, seed=2))
    inputs = engine._processor("<|image_1|>\n<|image_2|>\nHi", images=pics)
    pixels, sizes = inputs["pixel_values"].as_numpy(), inputs["image_sizes"].as_numpy()
    session = ort.InferenceSession(str(engine.model_dir / "vision.onnx"))
    got = session.run(None, {"pixel_values": pixels, "image_sizes": sizes})[0]
    want = _reference(vision_dir, pixels, sizes)
    assert got.shape == want.shape == (int(inputs["num_image_tokens"].as_numpy().sum()), 128)
    # FP32 on both sides, summed in other orders: within 1e-5 of the largest feature
    # (measured: about 1e-6).
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_vision_builds_refuse_what_they_cannot_do(vision_dir: Path, phi3_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.phi"
    with pytest.raises(BuildError, match="--eval"):
        build_bundle(vision_dir, out, evaluate=True)
    with pytest.raises(BuildError, match="CPU targets"):
        build_bundle(vision_dir, out, target="cuda")
    with pytest.raises(BuildError, match="--quant imatrix-b32"):
        build_bundle(vision_dir, out, quant="imatrix-b32")
    with pytest.raises(ConfigError, match="--vision-precision int4 is not one of fp32, int8"):
        build_bundle(vision_dir, out, vision_precision=Precision.INT4)
    with pytest.raises(BuildError, match=r"--vision-precision is for vision models; .* is a text model"):
        build_bundle(phi3_dir, out, vision_precision=Precision.INT8)
    assert not out.exists() and not list(tmp_path.glob(".edgepack-*"))


# --- an INT8 image side ------------------------------------------------------------------------


def test_int8_image_side_stays_close_to_fp32(engine: Engine, vision_dir: Path) -> None:
    import onnxruntime as ort
    import onnxruntime_genai as og
    from edgephi.packager import vision

    weights = vision.image_weights(vision_dir)
    spec = vision.spec_from(json.loads((vision_dir / "config.json").read_text()), weights)
    int8 = vision.vision_model(spec, weights, vision.Int8(block_size=32, accuracy_level=4))
    body = next(a.g for a in int8.graph.node[-1].attribute if a.name == "body")
    quantised = [n for n in body.node if n.op_type == "MatMulNBits"]
    # q, k, v, out, fc1, fc2 in each layer run, and the projector's two.
    assert len(quantised) == 6 * spec.layers + 2
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in quantised)

    pics = og.Images.open_bytes(picture(700, 400, seed=1), jpeg(300, 500, seed=2))
    inputs = engine._processor("<|image_1|>\n<|image_2|>\nHi", images=pics)
    feed = {name: inputs[name].as_numpy() for name in ("pixel_values", "image_sizes")}
    want = ort.InferenceSession(str(engine.model_dir / "vision.onnx")).run(None, feed)[0]
    got = ort.InferenceSession(int8.SerializeToString()).run(None, feed)[0]
    assert got.shape == want.shape
    # 8-bit blocks of 32 on the tower's three layers and the projector: every feature points
    # where FP32's does (measured: cosine 0.9998, largest difference 1.4% of the largest feature).
    error, cosine = distance(got, want)
    assert cosine > 0.999 and error <= 0.02

    table = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
    ids = np.array([[3, -1, -1, 7, 49, 0]], dtype=np.int64)
    features = np.arange(2 * 128, dtype=np.float32).reshape(2, 128)
    embed = [
        ort.InferenceSession(vision.embedding_model(table, q).SerializeToString()).run(
            None, {"input_ids": ids, "image_features": features}
        )[0][0]
        for q in (None, vision.Int8())
    ]
    text = [0, 3, 4, 5]
    assert np.array_equal(embed[0][text], table[[3, 7, 49, 0]])
    # Each row off by at most half a step of its block's scale (its largest magnitude / 127).
    half_step = np.abs(table).max() / 127 / 2
    assert np.abs(embed[1][text] - embed[0][text]).max() <= half_step * 1.001
    assert np.array_equal(embed[1][[1, 2]], features)  # the image slots are untouched


def test_an_int8_vision_bundle_is_smaller_and_answers(
    vision_dir: Path, vision_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "vision-int8.phi"
    run = subprocess.run(
        [*exe("edge-pack"), "build", str(vision_dir), "-o", str(out), "--vision-precision", "int8"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr
    assert "image side      int8" in run.stderr and "model (INT8)" in run.stderr

    def image_side(bundle: Path) -> tuple[Manifest, int]:
        with zipfile.ZipFile(bundle) as zf:
            manifest = Manifest.from_bytes(zf.read("manifest.json"))
            sizes = {i.filename: i.file_size for i in zf.infolist()}
        return manifest, sum(v for k, v in sizes.items() if k.startswith(("model/vision", "model/embedding")))

    manifest, size = image_side(out)
    fp32, fp32_size = image_side(vision_bundle)
    assert manifest.model.vision.encoder.precision is Precision.INT8
    assert fp32.model.vision.encoder.precision is Precision.FP32
    # Weights in 8 bits plus one FP32 scale per 32: 36/128 of the bytes; the patch
    # convolution and the position table stay FP32.
    assert size < 0.45 * fp32_size
    assert manifest.memory.weights_bytes < fp32.memory.weights_bytes
    # The int8 blocks' workspace: one more MLP activation, 17 crops x 577 tokens x 128 x 4 bytes.
    assert manifest.memory.vision_scratch_bytes == 93_420_168 + 5_022_208
    shown = subprocess.run(
        [*exe("edge-pack"), "inspect", str(out)], capture_output=True, text=True, timeout=120
    )
    assert "text and images (png/jpeg, up to 2653 tokens each, int8 encoder)" in shown.stdout

    model = load(out, store=Store(tmp_path / "store"))
    answer = model.generate(ASK, GREEDY, images=[picture(640, 480, seed=3)])
    assert answer.stats.generated_tokens == 8 and answer.text.strip()
    assert answer.stats.prompt_tokens > images.image_tokens(640, 480)


# --- answering about pictures ------------------------------------------------------------------


def test_answers_about_a_picture_through_the_python_api(engine: Engine, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(picture(640, 480, seed=3))
    first = engine.generate(ASK, GREEDY, images=[photo])
    assert first.stats.generated_tokens == 8 and first.text.strip()
    # The context the engine checks before decoding is the context og then uses.
    tagged = engine.format_prompt([{"role": "user", "content": "<|image_1|>\n" + ASK[0]["content"]}])
    assert first.stats.prompt_tokens == engine.count_prompt_tokens(tagged, [images.load_image(photo)])
    assert first.stats.prompt_tokens > engine.count_tokens(engine.format_prompt(ASK)) + 1921
    # The picture steers the answer: the same one again gives the same words, another one not.
    assert engine.generate(ASK, GREEDY, images=[photo.read_bytes()]).text == first.text
    other = engine.generate(ASK, GREEDY, images=[jpeg(640, 480, seed=4)]).text
    assert other != first.text
    assert engine.generate(ASK, GREEDY).text not in (first.text, other)  # and without a picture
    two = engine.generate(
        [{"role": "user", "content": "<|image_2|> then <|image_1|>: which is brighter?"}],
        GREEDY,
        images=[photo, jpeg(200, 300)],
    )
    assert two.stats.prompt_tokens > images.image_tokens(640, 480) + images.image_tokens(200, 300)
    with pytest.raises(ConfigError, match="tag each image once"):
        engine.generate([{"role": "user", "content": "<|image_3|>"}], GREEDY, images=[photo])


def test_chat_keeps_pictures_with_their_turn(engine: Engine) -> None:
    chat = Conversation(engine)
    pic = images.load_image(picture(336, 336))  # 2509 tokens: one fits the 4096 context, two do not
    asked = chat.ask("Describe it.", GREEDY, [pic])
    "".join(asked)
    first = asked.stats
    assert first is not None and first.prompt_tokens > 2509
    # og cannot rewind a phi3v generator: each answer runs on its own, and says so.
    assert first.cache_note == VISION_NOTE and first.cached_tokens == 0
    again = chat.ask("And now?", GREEDY)
    "".join(again)
    assert again.stats is not None and again.stats.prompt_tokens > first.prompt_tokens
    "".join(chat.ask("And this one?", GREEDY, [pic]))
    # The first picture's exchange was dropped to make room for the second picture.
    assert chat.dropped >= 1 and sum(len(i) for i in chat.images) == 1
    with pytest.raises(ContextOverflow, match="images take"):
        "".join(chat.ask("Both?", GREEDY, [pic, pic]))
    assert sum(len(i) for i in chat.images) == 1 and chat.messages[-1]["role"] == "assistant"


def test_edge_run_answers_about_an_image(vision_bundle: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(500, 375, seed=5))
    run = subprocess.run(
        [
            *exe("edge-run"),
            str(vision_bundle),
            "--image",
            str(photo),
            "-p",
            "What is in this picture?",
            "-n",
            "6",
            "-t",
            "0",
            "--json",
            "--insecure-skip-verify",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "EDGEPHI_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["text"].strip() and record["stats"]["generated_tokens"] == 6
    assert record["stats"]["prompt_tokens"] > images.image_tokens(500, 375)


def test_chat_on_a_terminal_takes_pictures(vision_bundle: Path, tmp_path: Path) -> None:
    from test_cli import Terminal

    photo, junk = tmp_path / "photo.png", tmp_path / "junk.png"
    photo.write_bytes(picture(300, 200, seed=8))
    junk.write_bytes(b"not a picture")
    term = Terminal(
        [*exe("edge-run"), str(vision_bundle), "-n", "4", "-t", "0", "--stats", "--insecure-skip-verify"]
    )
    term.wait_for(1, b"> ")
    term.type(f"/image {junk}".encode())
    term.wait_for(1, b"is not a PNG or JPEG image")
    term.type(f"/image {photo}".encode())
    term.wait_for(1, b"will go with your next message")
    term.type(b"What is this?")
    term.wait_for(1, b"4 generated")
    term.type(b"And now?")
    term.wait_for(2, b"4 generated")
    term.type(b"/exit")
    assert term.close() == 0
    first, second = term.prompt_tokens()
    assert first > images.image_tokens(300, 200) and second > first + 4  # the picture stays in the history


# --- hostile pictures ----------------------------------------------------------------------------


def _bomb() -> bytes:
    """A real PNG of 12,000 x 12,000 black pixels (144 megapixels, 432 MB raw) in ~0.4 MB."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 12_000 * 3)
    data = b"".join(z.compress(row) for _ in range(12_000)) + z.flush()
    return images.png_from_idat(12_000, 12_000, data)


def hostile() -> dict[str, bytes]:
    good_png, good_jpeg = picture(64, 48), jpeg(64, 48)
    huge = bytearray(good_png)
    huge[16:24] = struct.pack(">II", 100_000, 100_000)  # claims 10 gigapixels...
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))  # ...with a valid CRC
    bad_crc = bytearray(good_png)
    bad_crc[40] ^= 0xFF
    return {
        "not an image": b"Hello, I am a text file.\n" * 10,
        "empty": b"",
        "truncated PNG": good_png[: len(good_png) // 2],
        "truncated JPEG": good_jpeg[: len(good_jpeg) // 2],
        "corrupt PNG": bytes(bad_crc),
        "huge dimensions": bytes(huge),
        "decompression bomb": _bomb(),
        "thin as a line": picture(10_000, 1),
        "GIF": b"GIF89a" + b"\x00" * 64,
    }


@pytest.mark.parametrize("kind", list(hostile()))
def test_hostile_images_are_refused_in_one_line(kind: str, engine: Engine) -> None:
    data = hostile()[kind]
    with pytest.raises(BadImage) as info:
        engine.generate(ASK, GREEDY, images=[data])
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    # Nothing was decoded and nothing broke: the model still answers.
    assert engine.generate(ASK, GREEDY, images=[picture(64, 48)]).stats.generated_tokens == 8


def test_a_jpeg_that_kills_the_decoder_is_refused_and_the_process_lives(engine: Engine) -> None:
    # Markers in the middle of the scan data: libjpeg's fatal error handler calls exit(1),
    # which would end a server; the engine decodes in a forked child and survives it.
    data = bytearray(jpeg(128, 96, seed=6))
    for i in range(data.find(b"\xff\xda") + 40, len(data) - 4, 7):
        data[i] = 0xFF if data[i] != 0xFF else 0x00
    images.load_image(bytes(data))  # its structure is fine: only the decoder can tell
    with pytest.raises(BadImage, match=r"could not be decoded .*fatal error in native code"):
        engine.generate(ASK, GREEDY, images=[bytes(data)])
    assert engine.generate(ASK, GREEDY, images=[picture(64, 48)]).stats.generated_tokens == 8


def test_edge_run_refuses_a_bad_image_before_loading(vision_bundle: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(hostile()["huge dimensions"])
    run = subprocess.run(
        [*exe("edge-run"), str(vision_bundle), "--image", str(bomb), "-p", "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "EDGEPHI_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "decompression bomb" in run.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was installed


def test_a_text_model_refuses_pictures(phi3_bundle: Path, store: Store) -> None:
    text = load(phi3_bundle, store=store)
    with pytest.raises(ConfigError, match="text model"):
        text.generate(ASK, GREEDY, images=[picture(64, 48)])


# --- the HTTP API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ModelServer]:
    from edgephi.runtime.server import VISION_MAX_BODY

    with serving(engine, max_body=VISION_MAX_BODY) as srv:
        yield srv


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_server_answers_about_image_url_parts(server: ModelServer, engine: Engine) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    photo = jpeg(400, 300, seed=7)
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_url(photo, "image/jpeg")}},
    ]
    out = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
    )
    assert out.usage is not None and out.usage.prompt_tokens > images.image_tokens(400, 300)
    # The same question through the Python API, the picture where the part was.
    direct = engine.generate(
        [{"role": "user", "content": "What is in this picture?<|image_1|>\n"}],
        GenerationOptions(max_tokens=6, temperature=0.0),
        images=[photo],
    )
    assert out.choices[0].message.content == direct.text
    stream = client.chat.completions.create(
        model=engine.model_name,
        messages=[{"role": "user", "content": content}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == direct.text


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/cat.jpg", "invalid_value"),
        ("data:image/png;base64,!!!not base64!!!", "invalid_image"),
        (data_url(b"just text"), "invalid_image"),
        (data_url(hostile()["huge dimensions"]), "invalid_image"),
        (data_url(hostile()["truncated JPEG"], "image/jpeg"), "invalid_image"),
    ],
)
def test_server_refuses_bad_image_parts(server: ModelServer, url: str, code: str) -> None:
    status, reply = post_chat(server, [{"type": "image_url", "image_url": {"url": url}}])
    assert status == 400 and reply["error"]["code"] == code, reply
    assert raw(server, "GET", "/health")[0] == 200


def test_server_refuses_smuggled_tags(server: ModelServer) -> None:
    status, reply = post_chat(server, "look at <|image_1|>")
    assert status == 400 and "image_url" in reply["error"]["message"]


def post_chat(server: ModelServer, content: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    status, reply, _ = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return status, reply
