"""``edge-pack eval`` and the quality card: how much a packed model lost against its reference.

Both models read the same text in fixed windows, token by token through onnxruntime-genai
(the LM head is pruned to the last position, so logits come one position at a time), in
lockstep. Per predicted token: the packed model's negative log-likelihood (→ perplexity),
the KL divergence from the reference's next-token distribution, and whether both put the
same token first. The default text is a licence that ships offline — Debian's GPL-3, else
CPython's own LICENSE.txt — and is identified by name and sha256 in the results.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgephi.core.errors import ConfigError, SourceNotFound
from edgephi.core.fsutil import sha256_file

DEFAULT_TEXTS = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt",
)


def default_text() -> Path:
    for path in DEFAULT_TEXTS:
        if path.is_file():
            return path
    raise SourceNotFound("no default evaluation text on this machine", hint="give one with --text FILE")


def text_id(path: Path) -> str:
    return f"{path.name}:{sha256_file(path)[:12]}"


@dataclass(frozen=True)
class EvalResult:
    text: str
    tokens: int
    windows: int
    window: int
    ppl: float
    ppl_reference: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None

    @property
    def ppl_increase(self) -> float | None:
        return None if self.ppl_reference is None else self.ppl / self.ppl_reference - 1.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        if self.ppl_increase is not None:
            out["ppl_increase"] = round(self.ppl_increase, 6)
        return out

    def table(self) -> str:
        rows = [("text", f"{self.text}, {self.tokens} tokens in {self.windows} windows of {self.window}")]
        if self.ppl_reference is not None:
            rows.append(
                ("PPL", f"{self.ppl:.3f} (reference {self.ppl_reference:.3f}, {self.ppl_increase:+.1%})")
            )
            rows.append(("mean KL", f"{self.kl:.5f} nats per token"))
            rows.append(("top-1", f"{self.top1_agreement:.1%} agreement with the reference"))
        else:
            rows.append(("PPL", f"{self.ppl:.3f}"))
        return "\n".join(f"{k:<9}{v}" for k, v in rows)


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    return x - m - math.log(float(np.exp(x - m).sum()))


def evaluate(
    model_dir: Path,
    reference_dir: Path | None = None,
    text: Path | None = None,
    *,
    window: int = 256,
    max_windows: int = 4,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Perplexity of ``model_dir`` on ``text`` (and KL / top-1 against ``reference_dir``).

    ``progress`` hears one line per window: the measurement takes minutes on a small CPU.
    """
    import numpy as np
    from edgephi.runtime.genai import default_threads, open_model
    from edgephi.runtime.genai import og as _og

    if window < 8 or max_windows < 1:
        raise ConfigError("eval needs windows of at least 8 tokens and at least one window")
    text = text or default_text()
    og = _og()
    threads = default_threads()
    model = open_model(model_dir, threads)
    reference = open_model(reference_dir, threads) if reference_dir is not None else None
    ids = [int(t) for t in og.Tokenizer(model).encode(text.read_text(encoding="utf-8", errors="replace"))]
    count = min(max_windows, len(ids) // window)
    if count == 0:
        raise ConfigError(f"{text} has {len(ids)} tokens, fewer than one window of {window}")
    nll = nll_ref = kl = 0.0
    agree = predicted = 0
    for w in range(count):
        if progress is not None:
            progress(f"      reading {text.name}: window {w + 1} of {count} ({window} tokens each)")
        chunk = ids[w * window : (w + 1) * window]
        gens = [_generator(og, m, window) for m in (model, reference) if m is not None]
        for pos in range(window - 1):
            for g in gens:
                g.append_tokens([chunk[pos]])
            lp = _log_softmax(gens[0].get_logits())
            nll -= float(lp[chunk[pos + 1]])
            if len(gens) > 1:
                lr = _log_softmax(gens[1].get_logits())
                nll_ref -= float(lr[chunk[pos + 1]])
                kl += float(np.sum(np.exp(lr) * (lr - lp)))
                agree += int(lp.argmax() == lr.argmax())
            predicted += 1
    return EvalResult(
        text=text_id(text),
        tokens=predicted,
        windows=count,
        window=window,
        ppl=math.exp(nll / predicted),
        ppl_reference=math.exp(nll_ref / predicted) if reference is not None else None,
        kl=kl / predicted if reference is not None else None,
        top1_agreement=agree / predicted if reference is not None else None,
    )


def evaluate_paths(
    model: Path,
    reference: Path | None = None,
    text: Path | None = None,
    *,
    window: int = 256,
    max_windows: int = 4,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """``evaluate`` of bundles or folders (``edge-pack eval``): a bundle is unpacked into a
    temporary folder first, removed when the measurement is done."""
    with _folders([model] if reference is None else [model, reference]) as folders:
        return evaluate(
            folders[0],
            folders[1] if reference is not None else None,
            text,
            window=window,
            max_windows=max_windows,
            progress=progress,
        )


@contextlib.contextmanager
def _folders(paths: list[Path]) -> Iterator[list[Path]]:
    from edgephi.runtime import bundle

    with tempfile.TemporaryDirectory(prefix="edgepack-eval-") as tmp:
        folders = []
        for i, path in enumerate(paths):
            if path.is_dir():
                folders.append(path)
                continue
            folder = Path(tmp) / str(i)
            folder.mkdir()
            bundle.extract(path, folder)
            folders.append(folder)
        yield folders


def _generator(og: Any, model: Any, window: int) -> Any:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=window + 1)
    return og.Generator(model, params)
