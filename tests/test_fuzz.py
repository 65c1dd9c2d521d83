"""Property test of the reader: random damage to a valid signed bundle never crashes with
anything but edgephi's own errors, and never writes outside the store's staging area."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bundlekit import good_bundle
from edgephi.core.errors import BundleError
from edgephi.runtime import bundle
from edgephi.runtime.signing import SigningKey
from edgephi.runtime.store import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = SigningKey.generate()
with tempfile.TemporaryDirectory() as _d:
    GOOD = good_bundle(Path(_d) / "good.phi", KEY).read_bytes()
    GOOD_DIGEST = bundle.open_bundle(Path(_d) / "good.phi").digest

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(GOOD) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(GOOD) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(GOOD)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(GOOD) - 1), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in ops:
        pos = min(pos, max(0, len(buf) - 1))
        if op == "flip" and buf:
            buf[pos] ^= value
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf.insert(pos, value)
        elif op == "delete" and buf:
            del buf[pos]
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_damaged_bundles_fail_cleanly(ops: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "fuzz.phi"
        data = mutate(GOOD, ops)
        path.write_bytes(data)
        store = Store(root / "store")
        policy = bundle.TrustPolicy({KEY.key_id: KEY.public})
        try:
            installed = store.install(path, policy)
        except BundleError as exc:
            assert str(exc) and "\n" not in str(exc)
            installed = None
        written = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        allowed = {"fuzz.phi"}
        if installed is not None:
            # Only a bundle whose signed content is intact may install: the original's manifest.
            assert installed.manifest.digest == GOOD_DIGEST
            allowed |= {p.relative_to(root).as_posix() for p in installed.path.rglob("*") if p.is_file()}
        assert written <= allowed
