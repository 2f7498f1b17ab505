"""Encrypted model packages: round trip, every field tampered, model swap, wrong key, and
the owner-only slot the plaintext lands in."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from edgefleet.device.core.errors import ConfigError, DecryptFailed, UpdateRejected
from edgefleet.device.runtime.archive import extract_package, pack_package
from edgefleet.device.runtime.envelope import (
    MAGIC,
    MIN_CHUNK,
    FleetKey,
    FleetPublicKey,
    encrypt_package,
    is_encrypted,
    open_package,
    read_key_ids,
)
from edgefleet.device.runtime.manifest import MANIFEST_NAME, file_sha256
from edgefleet.device.updates.slots import SlotStore

pytestmark = pytest.mark.timeout(120)

# Header offsets: fixed part 15 bytes, then per recipient key id 8, ephemeral 32, wrapped 48.
FIXED = 15
REC = 8 + 32 + 48


def _decrypt(path: Path, key: FleetKey, model: str = "m", version: str = "1.0.0") -> bytes:
    with path.open("rb") as fh:
        reader = open_package(fh, key, model, version)
        out = reader.read()
        reader.finish()
    assert out is not None
    return out


def _enc(tmp_path: Path, data: bytes, keys: list[FleetKey], name: str = "c.enc",
         chunk: int = MIN_CHUNK) -> Path:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    dest = tmp_path / name
    dest.unlink(missing_ok=True)
    return encrypt_package(plain, dest, [k.public for k in keys], "m", "1.0.0", chunk)


@pytest.mark.parametrize("size", [0, 1, MIN_CHUNK - 1, MIN_CHUNK, 3 * MIN_CHUNK + 17])
def test_round_trip_any_size(tmp_path: Path, size: int) -> None:
    key = FleetKey.generate()
    data = os.urandom(size)
    enc = _enc(tmp_path, data, [key])
    assert is_encrypted(enc) and enc.read_bytes().startswith(MAGIC)
    assert stat.S_IMODE(enc.stat().st_mode) == 0o600
    assert size < 16 or data[:64] not in enc.read_bytes()  # a byte or two may recur by chance
    assert _decrypt(enc, key) == data


def test_two_recipients_each_decrypt_and_ids_are_listed(tmp_path: Path) -> None:
    old, new = FleetKey.generate(), FleetKey.generate()
    enc = _enc(tmp_path, b"x" * 9000, [old, new])
    assert read_key_ids(enc) == [old.public.key_id, new.public.key_id]
    assert _decrypt(enc, old) == _decrypt(enc, new) == b"x" * 9000


def _tamper_cases() -> list[tuple[str, int]]:
    body = FIXED + REC
    return [("magic", 0), ("format version", 8), ("suite", 9), ("chunk size", 12),
            ("recipient count", 14), ("key id", FIXED), ("ephemeral key", FIXED + 8),
            ("wrapped key", FIXED + 40), ("wrapped key tag", FIXED + REC - 1),
            ("first chunk", body + 5), ("first chunk tag", body + MIN_CHUNK + 3),
            ("last chunk", -20), ("last chunk tag", -1)]


@pytest.mark.parametrize(("what", "offset"), _tamper_cases())
def test_tampering_with_any_field_is_refused(tmp_path: Path, what: str, offset: int) -> None:
    key = FleetKey.generate()
    enc = _enc(tmp_path, os.urandom(2 * MIN_CHUNK + 100), [key])
    data = bytearray(enc.read_bytes())
    data[offset] ^= 0x01
    enc.write_bytes(bytes(data))
    with pytest.raises(UpdateRejected) as info:
        _decrypt(enc, key)
    # A changed key id reads as "not for this key"; everything else cannot authenticate.
    assert info.value.reason == ("wrong_fleet_key" if what == "key id" else "decrypt_failed"), what


@pytest.mark.parametrize("cut", ["truncate_last_chunk", "drop_last_chunk", "append_chunk",
                                 "swap_chunks"])
def test_truncation_extension_and_reordering_are_refused(tmp_path: Path, cut: str) -> None:
    key = FleetKey.generate()
    enc = _enc(tmp_path, os.urandom(3 * MIN_CHUNK + 10), [key])
    raw = enc.read_bytes()
    head, ct = raw[:FIXED + REC], raw[FIXED + REC:]
    size = MIN_CHUNK + 16
    chunks = [ct[i:i + size] for i in range(0, len(ct), size)]
    if cut == "truncate_last_chunk":
        chunks[-1] = chunks[-1][:-5]
    elif cut == "drop_last_chunk":
        chunks = chunks[:-1]
    elif cut == "append_chunk":
        chunks.append(chunks[0])
    else:
        chunks[0], chunks[1] = chunks[1], chunks[0]
    enc.write_bytes(head + b"".join(chunks))
    with pytest.raises(DecryptFailed):
        _decrypt(enc, key)


def test_ciphertext_of_another_model_or_version_is_refused(tmp_path: Path) -> None:
    key = FleetKey.generate()
    enc = _enc(tmp_path, b"weights" * 1000, [key])
    for model, version in (("other", "1.0.0"), ("m", "1.0.1")):
        with pytest.raises(DecryptFailed, match=f"{model}@{version}"):
            _decrypt(enc, key, model, version)


def test_wrong_key_is_refused_by_id_and_by_tag(tmp_path: Path) -> None:
    key, stranger = FleetKey.generate(), FleetKey.generate()
    enc = _enc(tmp_path, b"abc" * 3000, [key])
    with pytest.raises(UpdateRejected, match=stranger.public.key_id) as info:
        _decrypt(enc, stranger)
    assert info.value.reason == "wrong_fleet_key"
    # A header naming the stranger's key id, but wrapped for another key: the tag fails.
    data = bytearray(enc.read_bytes())
    data[FIXED:FIXED + 8] = bytes.fromhex(stranger.public.key_id)
    enc.write_bytes(bytes(data))
    with pytest.raises(DecryptFailed, match="wrapped data key"):
        _decrypt(enc, stranger)


def test_hostile_headers_are_bounded(tmp_path: Path) -> None:
    key = FleetKey.generate()
    for blob in (b"", MAGIC, MAGIC + b"\x01\x01" + (1 << 30).to_bytes(4, "big") + b"\x01",
                 MAGIC + b"\x01\x01" + MIN_CHUNK.to_bytes(4, "big") + b"\xff",
                 MAGIC + b"\x01\x01" + MIN_CHUNK.to_bytes(4, "big") + b"\x01" + b"\0" * 10):
        with pytest.raises(DecryptFailed):
            open_package(io.BytesIO(blob), key, "m", "1.0.0")


def test_key_files_are_owner_only(tmp_path: Path) -> None:
    key = FleetKey.generate()
    path = tmp_path / "fleet.key"
    path.write_bytes(key.pem())
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        FleetKey.load(path)
    path.chmod(0o600)
    assert FleetKey.load(path).public == key.public
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(key.public.pem())
    assert FleetPublicKey.load(pub).key_id == key.public.key_id
    with pytest.raises(ConfigError, match="X25519"):
        FleetKey.load(_ed25519(tmp_path))


def _ed25519(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p = tmp_path / "ed.key"
    p.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    p.chmod(0o600)
    return p


def _modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_encrypted_package_decrypts_only_into_an_owner_only_slot(
        tmp_path: Path, digits_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    spare = tmp_path / "tmp"  # every temporary file this process makes would land here
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    key = FleetKey.generate()
    tar = pack_package(digits_package, tmp_path / "p.tar")
    enc = encrypt_package(tar, tmp_path / "p.enc", [key.public], "digits-mlp", "1.0.0")
    state = tmp_path / "state"
    store = SlotStore(state)
    slot, manifest = store.stage(enc, "digits-mlp", "1.0.0", "digits-mlp/1.0.0.tar",
                                 file_sha256(enc), key=key)
    root = store.path(slot)
    assert manifest.version == "1.0.0" and (root / MANIFEST_NAME).is_file()
    assert store.slot_ok(slot)
    # Plaintext files 0600, folders 0700, under a 0700 slots folder; nothing else written.
    assert {m for m in _modes(root) if m != 0o700} == {0o600}
    assert stat.S_IMODE(store.slots_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in state.iterdir()) == ["slots", "slots.json"]
    assert list(spare.iterdir()) == []
    # The same bytes as the plaintext package, file for file.
    for f in (digits_package / MANIFEST_NAME, *[digits_package / r for r in manifest.files]):
        assert (root / f.name).read_bytes() == f.read_bytes()


def test_failed_decryption_leaves_no_plaintext_behind(tmp_path: Path,
                                                      digits_package: Path) -> None:
    key = FleetKey.generate()
    tar = pack_package(digits_package, tmp_path / "p.tar")
    enc = encrypt_package(tar, tmp_path / "p.enc", [key.public], "digits-mlp", "1.0.0")
    data = bytearray(enc.read_bytes())
    data[-30] ^= 0x80  # the last chunk: the manifest and early files were already unpacked
    enc.write_bytes(bytes(data))
    store = SlotStore(tmp_path / "state")
    with pytest.raises(DecryptFailed):
        store.stage(enc, "digits-mlp", "1.0.0", "t", file_sha256(enc), key=key)
    assert list(store.slots_dir.iterdir()) == []
    assert store.active() == (None, None)


def test_plain_archives_also_unpack_owner_only(tmp_path: Path, digits_package: Path) -> None:
    tar = pack_package(digits_package, tmp_path / "p.tar")
    out = extract_package(tar, tmp_path / "out")
    assert {m for m in _modes(out) if m != 0o700} == {0o600}
