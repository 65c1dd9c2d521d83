"""Every exception edgephi raises, in one place.

Each feature has a base class, and each concrete error also derives from the builtin a
caller would naturally catch (``BundleNotFound`` is a ``FileNotFoundError``). Tampering —
a hash or size that does not match what the manifest promised — has its own branch,
``TamperError``, so callers never confuse it with an ordinary malformed input.

Messages say what is wrong; ``hint`` says what to do. The CLIs join the two into one line
(see ``edgephi.runtime.cli``). This module imports nothing from edgephi, so every layer —
targets, runtime and packager — may raise from it.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of all edgephi errors."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- options and targets -------------------------------------------------------------


class ConfigError(EdgeError, ValueError):
    """A setting or a combination of settings is invalid."""

    hint = "fix the option named above"


class UnknownTarget(ConfigError, LookupError):
    """No device profile has the requested name."""

    hint = "run `edge-pack targets` to list the known targets"


class DependencyMissing(EdgeError, ImportError):
    """An optional package needed for this command is not installed."""

    hint = "install the packaging extra: pip install 'edgephi[pack]' torch==2.13.0"


# --- model sources and building ---------------------------------------------------------


class SourceError(EdgeError, ValueError):
    """The model source given to ``edge-pack build`` cannot be used."""


class SourceNotFound(SourceError, FileNotFoundError):
    hint = "check the path; a Hugging Face model id looks like org/name"


class NotAModel(SourceError):
    hint = "give a Hugging Face model folder (with config.json and weights), a .gguf file, or a model id"


class UnsupportedArchitecture(SourceError):
    hint = 'pick a model of a family listed above (README: "Model families" says what each was checked on)'


class BuildError(EdgeError, RuntimeError):
    """The model builder or the validation of its output failed."""

    hint = "nothing was written"


class BuilderFailed(BuildError):
    """A build tool run as a child process (the model builder) exited with an error.

    ``log`` is its full output; ``edge-pack build`` keeps it beside the output and names it.
    """

    def __init__(self, message: str, log: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.log = log


# --- bundles ------------------------------------------------------------------------------


class BundleError(EdgeError):
    """A .phi bundle cannot be read, verified or written."""


class BundleNotFound(BundleError, FileNotFoundError):
    hint = "check the path to the .phi file"


class BundleFormatError(BundleError, ValueError):
    """Not a bundle, or one that breaks a rule of the format."""

    hint = "rebuild the bundle with `edge-pack build`, or get a fresh copy from its publisher"


class UnsupportedFormatVersion(BundleFormatError):
    hint = "upgrade edgephi on this device: pip install -U edgephi"


class TamperError(BundleError):
    """The bundle's content differs from what its manifest promises."""

    hint = "do not use this file; get a fresh copy from its publisher"


class IntegrityError(TamperError, ValueError):
    """A member's hash or size does not match the manifest."""


class SignatureError(TamperError, ValueError):
    """The manifest's signature is missing, invalid, or from a key this device does not trust."""

    hint = "get the bundle from its publisher, or add the publisher's key with `edge-run trust add KEY.pub`"


class UnsafeBundle(BundleFormatError):
    """The bundle asks the runtime to load code, write files or read outside the bundle."""

    hint = "do not use this file; rebuild it with `edge-pack build`"


class IncompatibleBundle(BundleError, ValueError):
    """A valid bundle built for another device (architecture, provider, runtime version)."""

    hint = "build one for this device with `edge-pack build --target …` (see `edge-pack targets`)"


class KeyFileError(EdgeError, ValueError):
    """A signing or public key file cannot be read."""

    hint = "create a key pair with `edge-pack keygen`"


# --- updates -----------------------------------------------------------------------------------


class UpdateError(EdgeError):
    """An over-the-air update cannot proceed; the device keeps running what it had."""

    hint = "nothing was changed on this device; fix the cause and run the update again"


class ChannelError(UpdateError, ValueError):
    """The channel index is missing, malformed, expired or not signed by a trusted key."""

    hint = "check the channel URL and the publisher's key (`edge-run trust list`); nothing was changed"


class DownloadError(UpdateError, OSError):
    hint = "check the network and run the update again; it resumes where it stopped"


class DowngradeRefused(UpdateError, ValueError):
    hint = "publish a higher version; a device never goes below a version it accepted"


class HealthCheckFailed(UpdateError, RuntimeError):
    hint = "the new version was removed and the previous one kept; report this release to its publisher"


class UpdateLocked(UpdateError, BlockingIOError):
    hint = "wait for the other update to finish"


# --- the device store --------------------------------------------------------------------


class StoreError(EdgeError, OSError):
    """The per-user model store cannot be written or read."""

    hint = "check free space and permissions of the store (EDGEPHI_HOME)"


# --- generation -----------------------------------------------------------------------------


class GenerationError(EdgeError, RuntimeError):
    """Loading the model or generating from it failed."""

    hint = "rebuild the bundle, or report the message above"


class TemplateError(GenerationError):
    """The bundle's chat template crashed, ran past its deadline or its memory allowance."""

    hint = "the bundle's chat template is broken or hostile: rebuild the bundle with a working one"


class InsufficientMemory(GenerationError, MemoryError):
    """The model does not fit the memory budget with a useful context."""

    hint = "free memory, raise --memory-budget, or use a smaller model or --precision int4 bundle"


class ContextOverflow(GenerationError, ValueError):
    hint = "shorten the prompt or lower --max-tokens"


class BadImage(EdgeError, ValueError):
    """An image given with a prompt is not one the model can safely look at."""

    hint = "give a complete PNG or JPEG photo of at most 64 megapixels"
