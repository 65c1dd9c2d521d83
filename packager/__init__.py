"""The build-host side (``edgephi.packager``): turn a model into a .phi bundle.

Needs the ``pack`` extra (torch, transformers, onnx, …); imported only by ``edge-pack``
and by users who build, never by the device runtime.
"""
