"""Director-signed assignments (wire v2) and what a device accepts of them (DirectorTrust).

Each refusal has its own reason; the device's state (key, seq, digest) survives a restart,
so neither a replay nor a rotation is forgotten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefleet.device.core.errors import ConfigError, UpdateRejected
from edgefleet.device.updates.director import DirectorTrust, load_public_key
from edgefleet.device.wire import updates as wire
from edgefleet.server.fleet.director_key import DirectorKey

NOW = 1_700_000_000.0
SHA = "ab" * 32


def _raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return DirectorKey(key).public_raw


def _signed(key: ed25519.Ed25519PrivateKey, *, device: str = "pi-1", version: str = "1.1.0",
            seq: int = 1, expires: float = NOW + 3600, rollback: bool = False,
            chain: tuple[wire.KeyLink, ...] = ()) -> bytes:
    a = wire.Assignment("digits-mlp", version, rollout="r1", rollback=rollback, sha256=SHA)
    return wire.sign_assignment(a, device=device, seq=seq, expires=int(expires), key=key,
                                chain=chain)


def _decode(payload: bytes) -> wire.SignedAssignment:
    sa = wire.decode_signed_assignment(payload)
    assert sa is not None
    return sa


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _trust(tmp: Path, key: ed25519.Ed25519PrivateKey, device: str = "pi-1") -> DirectorTrust:
    return DirectorTrust(tmp, device, _raw(key), clock=lambda: NOW)


def _reason(trust: DirectorTrust, payload: bytes) -> str:
    with pytest.raises(UpdateRejected) as exc:
        trust.accept(_decode(payload))
    return exc.value.reason


def test_signed_assignment_round_trip_and_canonical_bytes(key: ed25519.Ed25519PrivateKey
                                                          ) -> None:
    payload = _signed(key, rollback=True)
    body = json.loads(payload)
    assert body["v"] == wire.SIGNED_VERSION and body["signed"]["device"] == "pi-1"
    sa = _decode(payload)
    assert sa.assignment == wire.Assignment("digits-mlp", "1.1.0", rollout="r1",
                                            rollback=True, sha256=SHA)
    assert (sa.device, sa.seq, sa.expires) == ("pi-1", 1, int(NOW + 3600))
    # What was signed is the sorted, compact JSON of the signed part, whatever the spacing.
    assert sa.signed_bytes == wire.canonical_bytes(body["signed"])
    spaced = json.dumps(body, indent=3).encode()
    assert _decode(spaced).verify(_raw(key)) == _raw(key)
    assert wire.decode_signed_assignment(b"") is None


def test_unsigned_and_malformed_v2_are_refused_with_their_reasons(
        key: ed25519.Ed25519PrivateKey) -> None:
    for v1 in (wire.Assignment("m", "1.0.0").encode(), b'{"v": 1, "model": "m", '
                                                       b'"version": "1.0.0"}'):
        with pytest.raises(UpdateRejected) as exc:
            wire.decode_signed_assignment(v1)
        assert exc.value.reason == "unsigned_assignment"
    body = json.loads(_signed(key))
    for broken in ({**body, "v": 3}, {**body, "signed": {**body["signed"], "seq": -1}},
                   {**body, "signed": {**body["signed"], "shadow": 1}},
                   {**body, "signed": {**body["signed"], "device": "a/b"}},
                   {**body, "signed": {**body["signed"], "device": "pi-1\n"}},
                   {**body, "signed": {**body["signed"], "sha256": "a" * 64 + "\n"}},
                   {**body, "keyid": body["keyid"] + "\n"},
                   {**body, "sig": body["sig"] + "\n"},
                   {**body, "sig": "***"}, {**body, "chain": [{"key": "x"}]}):
        with pytest.raises(UpdateRejected) as exc:
            wire.decode_signed_assignment(json.dumps(broken).encode())
        assert exc.value.reason == "bad_assignment", broken
    with pytest.raises(UpdateRejected) as exc:
        wire.decode_signed_assignment(b" " * (wire.MAX_ASSIGNMENT_BYTES + 1))
    assert exc.value.reason == "too_large"


def test_each_refusal_has_its_own_reason(tmp_path: Path, key: ed25519.Ed25519PrivateKey
                                         ) -> None:
    trust = _trust(tmp_path, key)
    other = ed25519.Ed25519PrivateKey.generate()
    assert _reason(trust, _signed(other)) == "bad_signature"  # forged: another key
    tampered = json.loads(_signed(key))
    tampered["signed"]["version"] = "9.9.9"  # the signed part changed after signing
    assert _reason(trust, json.dumps(tampered).encode()) == "bad_signature"
    assert _reason(trust, _signed(key, device="pi-2")) == "wrong_device"
    assert _reason(trust, _signed(key, expires=NOW - 1)) == "expired"
    assert trust.seq == 0  # nothing refused moved the floor

    first = _signed(key, seq=5)
    assert trust.accept(_decode(first)).version == "1.1.0"
    assert trust.seq == 5
    assert trust.accept(_decode(first)).version == "1.1.0"  # the same one again: current
    assert _reason(trust, _signed(key, seq=4, version="1.0.0")) == "replayed"
    newer = _signed(key, seq=6, version="1.2.0")
    assert trust.accept(_decode(newer)).version == "1.2.0"
    assert _reason(trust, first) == "replayed"  # after a newer one, never again

    # A restart remembers all of it.
    again = _trust(tmp_path, key)
    assert (again.seq, again.digest) == (6, _decode(newer).digest)
    assert _reason(again, first) == "replayed"
    # A new enrollment (another pinned key) starts afresh.
    fresh = _trust(tmp_path, other)
    assert fresh.seq == 0 and fresh.key == _raw(other)


def test_a_device_follows_signed_key_rotations_and_drops_the_old_key(
        tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    k2, k3 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    chain = (wire.sign_key_link(key, _raw(k2)), wire.sign_key_link(k2, _raw(k3)))
    trust = _trust(tmp_path, key)
    assert trust.accept(_decode(_signed(k3, seq=1, chain=chain))).version == "1.1.0"
    assert trust.key == _raw(k3)
    assert _trust(tmp_path, key).key == _raw(k3)  # persisted
    # The old key no longer signs anything this device takes.
    assert _reason(trust, _signed(key, seq=9)) == "bad_signature"
    # A link the old key did not sign is a forgery, not a rotation.
    evil = ed25519.Ed25519PrivateKey.generate()
    forged = wire.KeyLink(wire.sign_key_link(evil, _raw(evil)).key, wire.director_key_id(_raw(k3)),
                          wire.sign_key_link(evil, _raw(evil)).sig)
    assert _reason(trust, _signed(evil, seq=10, chain=(*chain, forged))) == "bad_signature"


def test_the_pinned_key_file(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    pub = tmp_path / "director.pub"
    pub.write_text(wire.encode_director_key(_raw(key)) + "\n")
    assert load_public_key(pub) == _raw(key)
    pub.write_text("bm90IGEga2V5")
    with pytest.raises(ConfigError, match="director key"):
        load_public_key(pub)
