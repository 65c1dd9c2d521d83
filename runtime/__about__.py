"""The runtime's version, in a module that imports nothing (the manifest's ``requires.runtime``)."""

VERSION = "0.1.0"
