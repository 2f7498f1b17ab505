"""The exception tree shared by every edgefleet component.

::

    EdgefleetError                 (exit code 1 unless a subclass says otherwise)
    ├── ConfigError                bad or missing configuration (exit 78, EX_CONFIG)
    ├── UsageError                 a wrong argument on the command line (exit 64)
    ├── MissingExtraError          an optional dependency is not installed (exit 69)
    ├── ModelError
    │   ├── PackageError           a model package is missing, corrupt or tampered with
    │   ├── ModelRejected          a model failed its golden inputs or trial load
    │   └── UpdateRejected         a model update refused before activation (``reason``)
    │       ├── UpdateUnavailable  the repository could not be reached (retried later)
    │       │   ├── TlsRejected    its HTTPS certificate did not verify (wrong CA, MITM)
    │       │   └── ClientCertRejected it refused this device's client certificate (revoked)
    │       ├── TargetNotSigned    the assignment names a target TUF does not vouch for
    │       ├── SignatureRejected  metadata not signed by the trusted keys (unknown key)
    │       ├── RollbackRejected   metadata older than what the device has seen
    │       ├── MetadataExpired    expired metadata (freeze attack)
    │       ├── MixAndMatchRejected metadata files from different releases
    │       ├── TargetMismatch     downloaded bytes differ from the signed hash (tampered)
    │       ├── DownloadTruncated  fewer bytes than the signed length
    │       ├── DownloadTooLarge   more bytes than the signed length (endless data)
    │       ├── SlowRetrieval      the server sends too slowly (slow retrieval attack)
    │       └── DecryptFailed      an encrypted package does not authenticate (tampered,
    │                              wrong key, moved from another package)
    └── InputError                 an inference input failed validation

Errors carry the context a person needs (file, key, variant) as attributes and in
their one-line message; the CLIs print ``error: <message>`` and exit with ``exit_code``.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""

    exit_code: int = 1


class ConfigError(EdgefleetError):
    """Configuration that cannot be used; exit code 78 stops systemd restart loops."""

    exit_code = 78

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ""
        if path:
            where += f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key


class UsageError(EdgefleetError):
    """A command-line argument that cannot be used."""

    exit_code = 64


class MissingExtraError(EdgefleetError):
    """An optional dependency is missing; the message names the extra to install."""

    exit_code = 69

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(
            f"{what} needs the '{module}' module: install it with "
            f"pip install 'edgefleet[{extra}]'"
        )
        self.extra = extra
        self.module = module


class ModelError(EdgefleetError):
    """A model that cannot be built, loaded or served."""

    exit_code = 65


class PackageError(ModelError):
    """A model package that is missing, malformed, truncated or tampered with."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class ModelRejected(ModelError):
    """A model that loaded but failed its golden inputs or its trial run."""


class InputError(EdgefleetError):
    """An inference input that failed validation (shape, dtype, NaN/inf, range)."""

    exit_code = 65

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpdateRejected(ModelError):
    """A model update that was refused before it could replace the active model.

    ``reason`` is a short stable token (``rollback``, ``expired``, ...) that events and
    counters use; the message says what happened in words.
    """

    reason: str = "rejected"

    def __init__(self, message: str, *, reason: str | None = None,
                 target: str | None = None) -> None:
        super().__init__(f"{target}: {message}" if target else message)
        if reason:
            self.reason = reason
        self.target = target


class UpdateUnavailable(UpdateRejected):
    """The repository could not be reached or answered with an HTTP error; retry later."""

    reason = "unavailable"


class TlsRejected(UpdateUnavailable):
    """The registry's HTTPS certificate did not verify against the configured CA.

    A subclass of :class:`UpdateUnavailable` so the agent keeps retrying with backoff
    (a renewed certificate or a fixed network heals it) while counting every refusal.
    """

    reason = "tls"


class TargetNotSigned(UpdateRejected):
    """The assignment names a target that the signed targets metadata does not list."""

    reason = "not_signed"


class SignatureRejected(UpdateRejected):
    """Metadata lacks a threshold of signatures from the keys the device trusts."""

    reason = "bad_signature"


class ClientCertRejected(UpdateUnavailable):
    """The registry requires a client certificate and refused this device's (none, one
    from another CA, or one no longer enrolled: revoked). Retried with backoff, since
    re-enrollment heals it, and counted every time."""

    reason = "client_cert"


class RollbackRejected(UpdateRejected):
    """Metadata with a lower version than the device has already seen."""

    reason = "rollback"


class MetadataExpired(UpdateRejected):
    """Expired metadata: a repository (or an attacker) replaying a frozen state."""

    reason = "expired"


class MixAndMatchRejected(UpdateRejected):
    """Metadata files that do not belong to the same signed snapshot."""

    reason = "mix_and_match"


class TargetMismatch(UpdateRejected):
    """Downloaded bytes do not match the signed sha256 (tampered in transit or at rest)."""

    reason = "hash_mismatch"


class DownloadTruncated(UpdateRejected):
    """The download ended before the signed length."""

    reason = "truncated"


class DownloadTooLarge(UpdateRejected):
    """The server sent more bytes than the signed length (endless data attack)."""

    reason = "too_large"


class SlowRetrieval(UpdateRejected):
    """The server sent too slowly (slow retrieval attack); the download was abandoned."""

    reason = "slow_retrieval"


class DecryptFailed(UpdateRejected):
    """An encrypted package whose header or chunks do not authenticate with the fleet key."""

    reason = "decrypt_failed"
