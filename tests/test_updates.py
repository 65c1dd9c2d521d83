"""Over-the-air updates against a real HTTP server on 127.0.0.1.

v1 is the tiny Phi-3.5 bundle, signed; v2 changes only tokenizer_config.json (a
tokenizer-only release); v3 has truncated weights (it verifies, but cannot load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from channel_server import ChannelServer, serve
from edgephi.core.errors import (
    ChannelError,
    DowngradeRefused,
    DownloadError,
    HealthCheckFailed,
    IncompatibleBundle,
    IntegrityError,
    KeyFileError,
    SignatureError,
    UpdateLocked,
)
from edgephi.packager import finalize, writer
from edgephi.packager.publish import publish, write_index
from edgephi.runtime import bundle, download, load, updater
from edgephi.runtime.options import GenerationOptions
from edgephi.runtime.sections import TargetFacts
from edgephi.runtime.signing import SigningKey, make_rotation
from edgephi.runtime.store import DISK_MARGIN, Store

NAME = "phi35-tiny"


def derive(v1: Path, out: Path, version: str, key: SigningKey, edit, **manifest_fields) -> Path:  # type: ignore[no-untyped-def]
    """A new release of v1: same files but for what ``edit(folder)`` changes."""
    work = out.with_suffix(".d")
    installed = Store(work / "store").install(v1, bundle.TrustPolicy({}, skip=True))
    folder = work / "model"
    shutil.copytree(installed.path, folder)
    (folder / "manifest.json").unlink()
    edit(folder)
    files = tuple(finalize.file_entries(folder))
    manifest = dataclasses.replace(
        installed.manifest, version=version, files=files, signed_by=(), **manifest_fields
    )
    writer.write_bundle(out, manifest, folder, [key])
    shutil.rmtree(work)
    return out


def note(text: str):  # type: ignore[no-untyped-def]
    def edit(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        path.write_text(path.read_text().rstrip().rstrip("}") + f', "edgephi_note": "{text}"}}\n')

    return edit


def truncate_weights(folder: Path) -> None:
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    k = SigningKey.generate()
    k.save(tmp_path_factory.mktemp("publisher") / "publisher.key")
    return k


@pytest.fixture(scope="module")
def releases(phi3_bundle: Path, key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("releases")
    v1 = d / "v1.phi"
    writer.resign(phi3_bundle, v1, [key])
    return {
        "1.0.0": v1,
        "1.1.0": derive(v1, d / "v2.phi", "1.1.0", key, note("v2")),
        "1.2.0": derive(v1, d / "v3.phi", "1.2.0", key, truncate_weights),
        "0.9.0": derive(v1, d / "v0.phi", "0.9.0", key, note("old")),
        "2.0.0-arm": derive(
            v1,
            d / "v2-arm.phi",
            "2.0.0",
            key,
            note("arm"),
            target=TargetFacts.from_dict({"name": "rpi5", "execution_provider": "cpu", "arch": "riscv64"}),
        ),
    }


@pytest.fixture
def device(tmp_path: Path, key: SigningKey) -> Store:
    store = Store(tmp_path / "device")
    pub = tmp_path / "publisher.pub"
    pub.write_text(key.public.to_text())
    store.trust.add(pub)
    return store


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[tuple[Path, ChannelServer]]:
    folder = tmp_path / "channel"
    folder.mkdir()
    with serve(folder) as server:
        yield folder, server


def runs(store: Store, version: str) -> None:
    """The current version is ``version``, complete (every hash), and generates."""
    current = store.current(NAME)
    assert current is not None and current.manifest.version == version
    for entry in current.manifest.files:
        path = current.path / entry.path
        assert path.stat().st_size == entry.size
    engine = load(NAME, store=store)
    done = engine.generate(
        [{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=3, temperature=0)
    )
    assert done.stats.generated_tokens == 3


def edge_run(
    store: Store, *args: str, env: dict[str, str] | None = None, preexec=None
) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def,type-arg]
    exe = str(Path(sys.executable).with_name("edge-run"))
    return subprocess.run(
        [exe, *args, "--store", str(store.root)]
        if args[0] in ("update", "rollback", "hold")
        else [exe, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
    )


def test_update_v1_to_v2_then_rollback(device: Store, channel, releases, key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    [first] = updater.update(server.url, NAME, store=device)
    assert (first.status, first.old_version, first.new_version) == ("updated", None, "1.0.0")
    runs(device, "1.0.0")
    publish(releases["1.1.0"], folder, key)
    assert updater.update(server.url, store=device, check_only=True)[0].status == "available"
    [second] = updater.update(server.url, store=device)
    assert (second.status, second.old_version, second.new_version) == ("updated", "1.0.0", "1.1.0")
    runs(device, "1.1.0")
    assert updater.update(server.url, store=device)[0].status == "up-to-date"
    out = edge_run(device, "rollback", NAME)
    assert out.returncode == 0 and "rolled back to 1.0.0" in out.stdout
    runs(device, "1.0.0")
    # The rollback sticks: the next update (a cron job) does not take 1.1.0 again...
    [kept] = updater.update(server.url, store=device)
    assert (kept.status, kept.old_version, kept.new_version) == ("rejected", "1.0.0", "1.1.0")
    assert "1.1.0 was rolled back on this device" in kept.line()
    runs(device, "1.0.0")
    # ... unless the user asks for it again,
    out = edge_run(device, "update", server.url, NAME, "--retry")
    assert out.returncode == 0 and "updated 1.0.0 → 1.1.0" in out.stdout, out.stderr
    runs(device, "1.1.0")
    # or a newer version is published.
    edge_run(device, "rollback", NAME)
    publish(derive(releases["1.0.0"], tmp_path / "v4.phi", "1.3.0", key, note("v4")), folder, key)
    assert updater.update(server.url, store=device)[0].status == "updated"
    runs(device, "1.3.0")


def test_a_held_model_stays_until_released(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    out = edge_run(device, "hold", NAME)
    assert out.returncode == 0 and out.stdout.strip() == f"{NAME}: held at 1.0.0"
    publish(releases["1.1.0"], folder, key)
    [held] = updater.update(server.url, store=device)
    assert (held.status, held.old_version, held.new_version) == ("held", "1.0.0", "1.1.0")
    runs(device, "1.0.0")
    assert edge_run(device, "hold", NAME, "--off").returncode == 0
    assert updater.update(server.url, store=device)[0].status == "updated"
    runs(device, "1.1.0")


def test_a_tokenizer_only_release_downloads_under_one_percent(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    publish(releases["1.1.0"], folder, key)
    server.reset_counters()
    [result] = updater.update(server.url, NAME, store=device)
    size = releases["1.1.0"].stat().st_size
    assert server.bytes_sent < size / 100, (server.bytes_sent, size)
    assert result.downloaded_bytes < size / 100
    assert not any("model.onnx" in r or "bundles/" in r for r in server.requests)
    # Each file is stored once in the channel: blobs, no second copy as a whole bundle.
    assert not (folder / "bundles").exists()
    stored = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    files = bundle.open_bundle(releases["1.1.0"]).manifest.total_size  # both releases, uncompressed
    assert stored < files * 1.01, (stored, files)


def test_full_bundle_channel_without_blobs(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key, blobs=False)
    assert not (folder / "blobs").exists()
    [result] = updater.update(server.url, NAME, store=device)
    assert result.downloaded_bytes == releases["1.0.0"].stat().st_size
    runs(device, "1.0.0")


@pytest.mark.parametrize("ignore_range", [False, True])
def test_an_interrupted_download_resumes(device: Store, channel, releases, key, ignore_range: bool) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    server.ignore_range = ignore_range
    publish(releases["1.0.0"], folder, key)
    killed = edge_run(device, "update", server.url, NAME, env={"EDGEPHI_FAULT_INJECT": "mid-download"})
    assert killed.returncode == -signal.SIGKILL
    assert list((device.root / "downloads").glob("*.part"))  # a partial file survived the kill
    assert device.current(NAME) is None
    server.reset_counters()
    done = edge_run(device, "update", server.url, NAME)
    assert done.returncode == 0, done.stderr
    assert (server.range_requests > 0) is (not ignore_range)
    runs(device, "1.0.0")


def test_a_clean_close_mid_file_keeps_the_part_and_resumes(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    """A server (a proxy, a mobile link) that ends a blob with a clean FIN half-way."""
    folder, server = channel
    publish(releases["1.0.0"], folder, key, blobs=False)
    size = releases["1.0.0"].stat().st_size
    server.cut_after = size // 2
    with pytest.raises(DownloadError, match=f"broke off after {size // 2} of {size} bytes"):
        updater.update(server.url, NAME, store=device)
    [part] = (device.root / "downloads").glob("*.part")
    assert part.stat().st_size == size // 2 and device.current(NAME) is None
    server.reset_counters()
    [result] = updater.update(server.url, NAME, store=device)
    assert server.range_requests == 1 and result.downloaded_bytes == size - size // 2
    runs(device, "1.0.0")


def test_a_dribbling_server_is_given_up_and_the_part_kept(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    """A link that sends a byte at a time, each within the per-read timeout: the minimum
    rate ends the update (it used to hold the update lock for as long as the server liked)."""
    folder, server = channel
    publish(releases["1.0.0"], folder, key, blobs=False)
    size = releases["1.0.0"].stat().st_size
    server.pace = (1, 0.2)  # 5 bytes a second
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"too slow: \d+ bytes in the last 2 s, under 1024 bytes/s"):
        updater.update(server.url, NAME, store=device, pace=download.Pace(window=2.0))
    assert time.monotonic() - start < 10
    [part] = (device.root / "downloads").glob("*.part")
    assert 0 < part.stat().st_size < size and device.current(NAME) is None
    # A link fast enough per window, but an update slower than its deadline, stops too.
    server.pace = (64 << 10, 0.05)  # about 1.3 MB/s
    with pytest.raises(DownloadError, match="ran past its deadline of 1 s"):
        updater.update(server.url, NAME, store=device, pace=download.Pace(deadline=1.0))
    kept = part.stat().st_size
    assert kept > 64 << 10
    server.pace = None
    server.reset_counters()
    [result] = updater.update(server.url, NAME, store=device)
    assert server.range_requests == 1 and result.downloaded_bytes == size - kept
    runs(device, "1.0.0")


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A file system of ``size`` bytes at ``path`` (a tmpfs: needs root, as CI has)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_an_orphan_of_a_failed_switch_is_not_counted_twice(channel, releases, key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An update killed after unpacking (as a disk that fills at the switch leaves it) left
    a whole version that is neither current nor previous. The retry uses that copy rather
    than asking for room for a second one, and an orphan of a superseded version goes."""
    folder, server = channel
    with small_disk(tmp_path / "disk", 256 << 20) as disk:
        device = Store(disk / "device")
        (tmp_path / "publisher.pub").write_text(key.public.to_text())
        device.trust.add(tmp_path / "publisher.pub")
        publish(releases["1.0.0"], folder, key)
        updater.update(server.url, NAME, store=device)
        publish(releases["1.1.0"], folder, key)
        killed = edge_run(device, "update", server.url, NAME, env={"EDGEPHI_FAULT_INJECT": "before-switch"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        [orphan] = [m for m in device.installed(NAME) if m.manifest.version == "1.1.0"]
        assert device.current(NAME).manifest.version == "1.0.0"  # type: ignore[union-attr]
        # Room for the margin and half the release again: not for a second copy of it.
        needed = bundle.open_bundle(releases["1.1.0"]).manifest.total_size
        filler = disk / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(disk).free - DISK_MARGIN - needed // 2))
        retried = edge_run(device, "update", server.url, NAME)
        assert retried.returncode == 0, retried.stderr
        assert device.current(NAME).path == orphan.path  # type: ignore[union-attr]
        filler.unlink()
        runs(device, "1.1.0")
        # A release killed the same way, then superseded by a newer one: its orphan goes.
        publish(releases["1.2.0"], folder, key)
        edge_run(device, "update", server.url, NAME, env={"EDGEPHI_FAULT_INJECT": "before-switch"})
        [stale] = [m.path for m in device.installed(NAME) if m.manifest.version == "1.2.0"]
        publish(derive(releases["1.0.0"], tmp_path / "v4.phi", "1.3.0", key, note("v4")), folder, key)
        retried = edge_run(device, "update", server.url, NAME)
        assert retried.returncode == 0, retried.stderr
        assert not stale.exists()
        runs(device, "1.3.0")


def test_an_index_digest_is_never_a_path(device: Store, channel, releases, key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A signed index whose sha256 climbs out of the store (or names a local file) is refused."""
    folder, server = channel
    release = publish(releases["1.0.0"], folder, key, blobs=False)
    outside = tmp_path / "outside"
    for digest in (f"../../../../{outside}/x", str(releases["1.0.0"]).removesuffix(".phi"), "A" * 64):
        write_index(folder, {NAME: dataclasses.replace(release, sha256=digest)}, key, 30)
        with pytest.raises(ChannelError, match="sha256 that is not 64 hex digits"):
            updater.update(server.url, NAME, store=device)
    write_index(folder, {NAME: dataclasses.replace(release, manifest_sha256="0" * 63)}, key, 30)
    with pytest.raises(ChannelError, match="sha256 that is not 64 hex digits"):
        updater.update(server.url, NAME, store=device)
    assert not outside.exists() and device.current(NAME) is None


def test_a_replayed_older_index_cannot_freeze_the_device(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    """A network attacker replays the index (validly signed, unexpired) that offered 1.0.0
    after the device saw the one offering 1.1.0: before, the device said "up to date"."""
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    old = {n: (folder / n).read_bytes() for n in ("index.json", "index.sig")}
    time.sleep(1.1)  # issued_at has one-second resolution
    publish(releases["1.1.0"], folder, key)
    [seen] = updater.update(server.url, NAME, store=device, check_only=True)
    assert seen.status == "available"
    for n, data in old.items():
        (folder / n).write_bytes(data)
    with pytest.raises(ChannelError, match="older than the one this device accepted"):
        updater.update(server.url, NAME, store=device)
    runs(device, "1.0.0")


STEPS = ["mid-download", "after-download", "mid-unpack", "before-switch", "after-switch"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_every_step_leaves_a_complete_model(
    device: Store, channel, releases, key, step: str
) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    publish(releases["1.1.0"], folder, key)
    killed = edge_run(device, "update", server.url, NAME, env={"EDGEPHI_FAULT_INJECT": step})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    current = device.current(NAME)
    assert current is not None
    runs(device, current.manifest.version)  # old or new, complete either way
    assert current.manifest.version == ("1.1.0" if step == "after-switch" else "1.0.0")
    retried = edge_run(device, "update", server.url, NAME)
    assert retried.returncode == 0, retried.stderr
    runs(device, "1.1.0")
    assert device.highest_accepted(NAME) == "1.1.0"
    # The killed process's staging folder went with the next install, not a day later.
    assert not device.staging_dir.exists() or list(device.staging_dir.iterdir()) == []


def test_refusals_leave_the_device_as_it_was(  # type: ignore[no-untyped-def]
    device: Store, channel, releases, key, tmp_path: Path
) -> None:
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    publish(releases["1.1.0"], folder, key)
    updater.update(server.url, NAME, store=device)

    def unchanged() -> None:
        runs(device, "1.1.0")

    # A lower version than the highest accepted (from another channel).
    old = tmp_path / "old-channel"
    publish(releases["0.9.0"], old, key)
    with pytest.raises(DowngradeRefused, match=r"0\.9\.0"):
        updater.update(str(old), NAME, store=device)
    unchanged()
    # An expired index.
    expired = tmp_path / "expired"
    publish(releases["1.2.0"], expired, key, expires_days=1e-9)
    with pytest.raises(ChannelError, match="expired"):
        updater.update(str(expired), NAME, store=device)
    unchanged()
    # An index signed by a key the device does not trust.
    stranger = tmp_path / "stranger"
    other = SigningKey.generate()
    writer.resign(releases["1.2.0"], tmp_path / "x.phi", [other])
    publish(tmp_path / "x.phi", stranger, other)
    with pytest.raises(ChannelError, match="trusts none"):
        updater.update(str(stranger), NAME, store=device)
    unchanged()
    # A bundle for another kind of device.
    foreign = tmp_path / "foreign"
    publish(releases["2.0.0-arm"], foreign, key)
    with pytest.raises(IncompatibleBundle, match="riscv64"):
        updater.update(str(foreign), NAME, store=device)
    unchanged()
    # A tampered blob on the server.
    tampered = tmp_path / "tampered"
    publish(releases["1.2.0"], tampered, key)
    v3 = bundle.open_bundle(releases["1.2.0"]).manifest
    new_sha = {f.sha256 for f in v3.files} - {f.sha256 for f in device.current(NAME).manifest.files}  # type: ignore[union-attr]
    blob = tampered / "blobs" / sorted(new_sha)[0]
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    with pytest.raises(IntegrityError):
        updater.update(str(tampered), NAME, store=device)
    unchanged()
    # A signed entry that offers neither blobs nor a whole bundle.
    empty = tmp_path / "empty"
    release = publish(releases["1.2.0"], empty, key)
    write_index(empty, {NAME: dataclasses.replace(release, blobs="")}, key, 30)
    with pytest.raises(ChannelError, match="offers neither blobs nor a bundle"):
        updater.update(str(empty), NAME, store=device)
    unchanged()
    # Disk full: the updater's writes fail part-way (a file-size limit stands in for a full disk).
    publish(releases["1.2.0"], folder, key)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = edge_run(device, "update", server.url, NAME, preexec=small_disk)
    [error] = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 1 and "could not write" in error and "File too large" in error
    unchanged()


def test_a_failed_health_check_keeps_the_old_version(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    publish(releases["1.2.0"], folder, key)
    with pytest.raises(HealthCheckFailed, match=r"1\.2\.0"):
        updater.update(server.url, NAME, store=device)
    runs(device, "1.0.0")
    assert [m.manifest.version for m in device.installed(NAME)] == ["1.0.0"]
    out = edge_run(device, "update", server.url, NAME)
    assert out.returncode == 1 and "previous one kept" in out.stderr


def test_a_release_whose_template_hangs_fails_its_health_check_in_seconds(  # type: ignore[no-untyped-def]
    device: Store, channel, releases, key, tmp_path: Path
) -> None:
    """The health check renders the new release's template while holding the update lock:
    an endless one is stopped by the sandbox's deadline, and the old version stays."""
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)

    def endless(model: Path) -> None:
        (model / "chat_template.jinja").unlink(missing_ok=True)
        config = model / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data["chat_template"] = (
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
        )
        config.write_text(json.dumps(data))

    publish(derive(releases["1.0.0"], tmp_path / "hangs.phi", "1.1.0", key, endless), folder, key)
    start = time.monotonic()
    with pytest.raises(
        HealthCheckFailed, match=r"1\.1\.0 does not run: the model's chat template was stopped"
    ):
        updater.update(server.url, NAME, store=device)
    assert time.monotonic() - start < 60
    runs(device, "1.0.0")


def edge_pack(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    exe = str(Path(sys.executable).with_name("edge-pack"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def trusted_pub(key: SigningKey, folder: Path) -> Path:
    path = folder / f"{key.key_id}.pub"
    path.write_text(key.public.to_text())
    return path


def test_a_threshold_needs_that_many_trusted_signatures(
    device: Store, channel, releases, key, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    second = SigningKey.generate()
    device.trust.add(trusted_pub(second, tmp_path))
    # More than the keys trusted, or a damaged policy: refused, nothing relaxed.
    out = edge_run(device, "trust", "threshold", "3", "--store", str(device.root))
    assert out.returncode == 1 and "needs 3 trusted keys; this device trusts 2" in out.stderr
    out = edge_run(device, "trust", "threshold", "2", "--store", str(device.root))
    assert out.returncode == 0, out.stderr
    with pytest.raises(SignatureError, match=r"signed by 1 trusted key.*asks for 2"):
        device.install(releases["1.0.0"])
    both = writer.resign(releases["1.0.0"], tmp_path / "both.phi", [key, second])
    assert device.install(tmp_path / "both.phi").manifest.digest == both.digest
    # The index, too: one signature is not enough.
    publish(tmp_path / "both.phi", folder, key)
    with pytest.raises(ChannelError, match="asks for 2"):
        updater.update(server.url, NAME, store=device)
    write_index(folder, channel_releases(folder, key), [key, second], 30)
    [result] = updater.update(server.url, NAME, store=device)
    assert result.status == "updated" and device.current(NAME).manifest.version == "1.0.0"  # type: ignore[union-attr]
    device.trust.policy_file.write_text("{")
    with pytest.raises(KeyFileError, match=r"trust policy .* is damaged"):
        device.install(releases["1.1.0"])


def channel_releases(folder: Path, key: SigningKey) -> dict:  # type: ignore[type-arg]
    from edgephi.runtime import channel as channel_format

    raw = (folder / "index.json").read_bytes()
    sig = (folder / "index.sig").read_bytes()
    return dict(channel_format.verify_index(raw, sig, {key.key_id: key.public}).releases)


def test_a_key_rotation_reaches_devices_through_the_channel(  # type: ignore[no-untyped-def]
    device: Store, channel, releases, key, tmp_path: Path
) -> None:
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    updater.update(server.url, NAME, store=device)
    # The publisher hands over to a new key with the real CLI, and publishes with it.
    old_file, new_file = tmp_path / "publisher.key", tmp_path / "next.key"
    key.save(old_file)
    new = SigningKey.generate()
    new.save(new_file)
    out = edge_pack("rotate-key", str(folder), "--old", str(old_file), "--new", str(new_file))
    assert out.returncode == 0, out.stderr
    signed_by_new = tmp_path / "v2-new.phi"
    writer.resign(releases["1.1.0"], signed_by_new, [new])
    out = edge_pack("publish", str(signed_by_new), str(folder), "--key", str(new_file))
    assert out.returncode == 0, out.stderr
    # The device took the rotation on its own, then the release signed by the new key.
    out = edge_run(device, "update", server.url, NAME)
    assert out.returncode == 0, out.stderr
    assert f"trusting the publisher's new key {new.key_id} in place of {key.key_id}" in out.stderr
    assert set(device.trust.keys()) == {new.key_id} and set(device.trust.retired()) == {key.key_id}
    runs(device, "1.1.0")
    # The old key no longer vouches for a bundle given by hand (a stolen key is useless)...
    with pytest.raises(SignatureError, match="trusts none of them"):
        device.install(releases["1.2.0"])
    # ...but the version installed under it still runs, by name, after a rollback.
    assert edge_run(device, "rollback", NAME).returncode == 0
    runs(device, "1.0.0")
    # A second update finds the rotation already taken and nothing to do.
    out = edge_run(device, "update", server.url, NAME, "--retry")
    assert out.returncode == 0 and "trusting" not in out.stderr, out.stderr


def forged(key: SigningKey, new: SigningKey, how: str) -> bytes:
    statement = json.loads(make_rotation(key, new))
    if how == "signed by the new key only":
        statement["signatures"] = [s for s in statement["signatures"] if s["keyid"] == new.key_id]
    elif how == "without the new key's signature":
        statement["signatures"] = [s for s in statement["signatures"] if s["keyid"] == key.key_id]
    elif how == "its new key swapped after signing":
        statement["rotation"]["to"] = SigningKey.generate().public.to_text().strip()
    return json.dumps(statement).encode()


FORGERIES = {
    "signed by the new key only": "not validly signed by that key",
    "without the new key's signature": "not signed by the new key itself",
    "its new key swapped after signing": "not validly signed by that key",
}


@pytest.mark.parametrize("how", list(FORGERIES))
def test_a_forged_rotation_changes_nothing(
    device: Store, channel, releases, key, how: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    attacker = SigningKey.generate()
    (folder / "keys").mkdir()
    (folder / "keys" / "rotations.json").write_text(
        json.dumps({"rotations": [json.loads(forged(key, attacker, how))]})
    )
    with pytest.raises(SignatureError, match=FORGERIES[how]):
        updater.update(server.url, NAME, store=device)
    statement = tmp_path / "rotation.json"
    statement.write_bytes(forged(key, attacker, how))
    out = edge_run(device, "trust", "rotate", str(statement), "--store", str(device.root))
    assert out.returncode == 1 and FORGERIES[how] in out.stderr
    assert set(device.trust.keys()) == {key.key_id} and not device.trust.retired()
    assert device.current(NAME) is None


def test_one_updater_at_a_time(device: Store, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    with updater.update_lock(device):
        out = edge_run(device, "update", server.url, NAME)
        assert out.returncode == 1 and "another update is running" in out.stderr
    with pytest.raises(UpdateLocked), updater.update_lock(device), updater.update_lock(device):
        pass


def test_updates_need_a_trust_store(tmp_path: Path, channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, server = channel
    publish(releases["1.0.0"], folder, key)
    with pytest.raises(ChannelError, match="trusted publisher key"):
        updater.update(server.url, NAME, store=Store(tmp_path / "bare"))


def test_publish_refuses_a_version_not_above_the_channels(channel, releases, key) -> None:  # type: ignore[no-untyped-def]
    folder, _ = channel
    publish(releases["1.1.0"], folder, key)
    with pytest.raises(Exception, match="higher version"):
        publish(releases["1.0.0"], folder, key)
