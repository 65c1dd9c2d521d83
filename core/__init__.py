"""The bottom layer every edgephi package stands on: its errors and its file-system helpers.

Import order, one way only (``tests/test_imports.py`` checks it)::

    edgephi.core  ←  edgephi.targets  ←  edgephi.runtime  ←  edgephi.packager

``edgephi.core`` imports nothing from edgephi and nothing beyond the standard library, so
the device runtime, the device profiles and the build host all raise the same exceptions
(``errors``) and write files the same way (``fsutil``: atomic writes, hashing).
"""
