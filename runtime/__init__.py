"""The device runtime (``edgephi.runtime``): verify, install and run .phi bundles.

Imports nothing heavy: onnxruntime-genai is loaded only when a model is, and torch,
transformers, onnx and the packager are never imported from here.

    from edgephi.runtime import load
    m = load("model.phi")
    for chunk in m.stream([{"role": "user", "content": "Hi"}]):
        print(chunk, end="")
"""

from edgephi.core.errors import EdgeError
from edgephi.runtime.__about__ import VERSION
from edgephi.runtime.loader import LoadedModel, install, load, load_model
from edgephi.runtime.options import GenerationOptions

__version__ = VERSION

__all__ = ["EdgeError", "GenerationOptions", "LoadedModel", "__version__", "install", "load", "load_model"]
