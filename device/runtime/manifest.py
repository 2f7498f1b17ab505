"""The model package: a folder of model files plus ``manifest.json``.

The format is documented in docs/model-package.md and versioned by ``format_version``.
Reading a package never trusts it: every path must stay inside the folder, every file's
size and sha256 must match the manifest, and the manifest itself is size-limited before
it is parsed. Signing (TUF) wraps this format; it does not replace these checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeGuard, get_args

from pydantic import AfterValidator, Field, ValidationError, field_validator

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import PackageError

__all__ = [
    "FORMAT_VERSION",
    "GOLDEN_RULE_KEY",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "GoldenRule",
    "GoldenSample",
    "HeadCut",
    "InputSpec",
    "Manifest",
    "Normalization",
    "Preprocessing",
    "QuantParams",
    "Variant",
    "VariantName",
    "file_sha256",
    "is_variant_name",
    "load_package",
    "manifest_json",
    "safe_member",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
VariantName = Literal["onnx-fp32", "onnx-int8", "tflite-int8", "tflite-fp32"]
_VARIANT_NAMES: frozenset[str] = frozenset(get_args(VariantName))


def is_variant_name(name: str) -> TypeGuard[VariantName]:
    """Whether ``name`` is one of the variant names a package may hold."""
    return name in _VARIANT_NAMES


class QuantParams(StrictModel):
    """Affine int8 quantization: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int = Field(ge=-128, le=127)


class Variant(StrictModel):
    """One runnable form of the model (format and precision)."""

    file: str
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "int8"]
    input_name: str = "input"
    output_name: str = "logits"
    #: TFLite full-integer models take int8 in and give int8 out.
    input_quant: QuantParams | None = None
    output_quant: QuantParams | None = None
    #: The model tensor's shape of one sample when it is not the flat feature row the
    #: device validates and normalizes (an imported CNN takes ``[8, 8, 1]``): the backend
    #: reshapes ``(n, features)`` to ``(n, *input_shape)``, a view, no copy.
    input_shape: list[int] | None = Field(default=None, min_length=1)


def _positive(v: list[float]) -> list[float]:
    if any(s <= 0 for s in v):
        raise ValueError("every std must be > 0")
    return v


#: Standard deviations divide: every one must be positive.
_Stds = Annotated[list[float], AfterValidator(_positive)]


class Preprocessing(StrictModel):
    """How a raw input becomes the model's input: ``(x * scale - mean) / std``.

    ``mean``/``std`` hold one value (all channels) or one per channel of ``layout``.
    Recorded as the operator declared it; the device applies it through the equivalent
    per-feature :class:`Normalization`, so older code paths need nothing new.
    """

    scale: float = Field(default=1.0, gt=0)
    mean: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    std: _Stds = Field(default_factory=lambda: [1.0], min_length=1)


class InputSpec(StrictModel):
    """What one raw input row looks like before normalization."""

    dtype: Literal["float32"] = "float32"
    shape: list[int] = Field(min_length=1, description="shape of one sample")
    min_value: float | None = None
    max_value: float | None = None
    #: Where channels are (imported models): ``flat`` rows, images ``NHWC``/``NCHW``,
    #: windows ``NWC`` (samples x channels). None: a built-in task's flat feature row.
    layout: Literal["flat", "NHWC", "NCHW", "NWC"] | None = None
    preprocessing: Preprocessing | None = None


class HeadCut(StrictModel):
    """Where an imported model splits into a frozen backbone and a trainable head.

    ``node`` is the ONNX node that starts the head (the last Gemm/MatMul before the
    output, or ``--head-from``); ``embedding`` is the tensor feeding it and ``dim`` its
    width. Recorded now so on-device head fine-tuning can build on it.
    """

    node: str
    op: str
    embedding: str
    dim: int | None = Field(default=None, ge=1)
    auto: bool = True
    #: Set when the package can fine-tune its head on the device: ``backbone`` is the
    #: int8 ONNX graph cut at ``embedding`` (its output), ``params`` the head's fp32
    #: weights ``[W1, b1, ...]`` (``write_params``), a NumPy MLP of ``layers`` dense layers.
    backbone: str | None = None
    params: str | None = None
    layers: int | None = Field(default=None, ge=1, le=2)

    @property
    def trainable(self) -> bool:
        """Whether the package ships a backbone and head weights to fine-tune."""
        return self.backbone is not None and self.params is not None


class Normalization(StrictModel):
    """Per-feature standardization applied before the model: ``(x - mean) / std``."""

    mean: list[float]
    std: _Stds


class GoldenSample(StrictModel):
    """A raw input with the logits each variant must reproduce (within ``atol``)."""

    input: list[float]
    label: int
    logits: dict[str, list[float]]


#: Where a package keeps its per-variant golden rules: in ``extra``, which readers of
#: format 1 accept whatever it holds, so older agents still load the package (and keep
#: applying ``golden_atol`` the old way).
GOLDEN_RULE_KEY = "golden_rule"


class GoldenRule(StrictModel):
    """How a device compares an int8 variant's golden logits (docs/model-package.md).

    Two correct int8 runtimes (onnxruntime on x86-64 and on aarch64) round differently, and
    a deep network amplifies that; the recorded tolerance is therefore the variant's own
    quantization error on the golden inputs (int8 against fp32), not a share of the logits.
    """

    rule: Literal["int8-gap"]
    #: Largest absolute logit difference allowed on any golden logit.
    atol: float = Field(gt=0)
    #: Largest mean absolute logit difference over all golden logits.
    mean_atol: float = Field(gt=0)
    #: A golden input whose recorded top-2 margin exceeds this must keep its arg-max.
    argmax_margin: float = Field(ge=0)
    #: What the bounds were derived from (informational).
    reference: str | None = None
    fp32_gap_max: float | None = None
    fp32_gap_mean: float | None = None


class FileEntry(StrictModel):
    """Size and digest of one file in the package."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(StrictModel):
    """``manifest.json``: everything a device needs to run and verify the model."""

    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[0-9]+(\.[0-9]+){0,2}$")
    task: str
    created: str
    labels: list[str]
    input: InputSpec
    normalization: Normalization
    variants: dict[VariantName, Variant]
    default_variant: VariantName
    temperature: float = Field(default=1.0, gt=0)
    #: Calibrated-confidence threshold below which the device asks the cloud scorer.
    fallback_threshold: float | None = Field(default=None, ge=0, le=1)
    golden: list[GoldenSample] = Field(default_factory=list)
    golden_atol: dict[str, float] = Field(default_factory=dict)
    files: dict[str, FileEntry]
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    #: Per-feature reference histograms of the training inputs, for drift (PSI).
    reference_stats: dict[str, Any] | None = None
    #: Free-form extension data of later format revisions that still read as v1.
    extra: dict[str, Any] = Field(default_factory=dict)
    #: Imported models: the backbone/head split (docs/bring-your-own-model.md).
    head: HeadCut | None = None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {v} (this build reads {FORMAT_VERSION})")
        return v

    def variant(self, name: str | None = None) -> Variant:
        """The named variant, or the default one."""
        key = name or self.default_variant
        if is_variant_name(key) and key in self.variants:
            return self.variants[key]
        have = ", ".join(sorted(self.variants))
        raise PackageError(f"package has no variant {key!r} (it has: {have})")

    def golden_rule(self, variant: str) -> GoldenRule | None:
        """``variant``'s golden rule, or None: then ``golden_atol`` and an equal arg-max on
        every golden input apply, as for packages written before rules existed. A rule this
        reader does not know, or one on an fp32 variant, also means None (the older,
        stricter check)."""
        raw = self.extra.get(GOLDEN_RULE_KEY)
        var = self.variants.get(variant) if is_variant_name(variant) else None
        if (var is None or var.precision != "int8" or not isinstance(raw, dict)
                or not isinstance(raw.get(variant), dict)):
            return None
        try:
            return GoldenRule.model_validate(raw[variant])
        except ValidationError:
            return None

    def variant_for_backend(self, backend: str) -> str:
        """The best variant for ``onnx`` or ``tflite`` (int8 first)."""
        for prec in ("int8", "fp32"):
            key = f"{backend}-{prec}"
            if key in self.variants:
                return key
        raise PackageError(f"package has no {backend} variant")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (packages can be larger than RAM on a Pi Zero)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_member(root: Path, rel: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` and symlinks out."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel in ("", "."):
        raise PackageError(f"file name {rel!r} points outside the package", path=str(root))
    candidate = root / Path(*pure.parts)
    resolved = candidate.resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        raise PackageError(f"file {rel!r} resolves outside the package", path=str(root)) from None
    return candidate


def _drop_unset_additions(raw: dict[str, Any]) -> dict[str, Any]:
    """Leave out the keys added for imported models while they are unset, so a package
    that does not use them is byte-for-byte what earlier readers (strict: unknown keys
    are errors) accept."""
    if raw.get("head") is None:
        raw.pop("head", None)
    else:
        for key in ("backbone", "params", "layers"):
            if raw["head"].get(key) is None:
                raw["head"].pop(key, None)
    for key in ("layout", "preprocessing"):
        if raw["input"].get(key) is None:
            raw["input"].pop(key, None)
    for var in raw["variants"].values():
        if var.get("input_shape") is None:
            var.pop("input_shape", None)
    return raw


def manifest_json(manifest: Manifest) -> str:
    """The exact text :func:`write_manifest` writes (sorted keys, so it is reproducible)."""
    raw = _drop_unset_additions(manifest.model_dump(mode="json"))
    return json.dumps(raw, indent=2, sort_keys=True) + "\n"


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
    target = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp"
    data = manifest_json(manifest)
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(target)
    return target


def read_manifest(root: Path) -> Manifest:
    """Parse and validate ``manifest.json`` without checking the other files."""
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise PackageError("not a model package folder", path=str(root))
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PackageError(f"no {MANIFEST_NAME}", path=str(root)) from None
    if size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST_NAME} is {size} bytes (limit {MAX_MANIFEST_BYTES})",
                           path=str(root))
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError; deep nesting
        raise PackageError(f"{MANIFEST_NAME} is not valid JSON ({exc})", path=str(root)) from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise PackageError(f"{MANIFEST_NAME}: {key}: {err['msg']}", path=str(root)) from None


def load_package(root: Path | str, *, verify: bool = True) -> Manifest:
    """Read a package's manifest and (by default) check every file's size and sha256.

    Raises :class:`PackageError` naming the first file that is missing, outside the
    folder, of the wrong size or with the wrong digest.
    """
    root = Path(root)
    manifest = read_manifest(root)
    for variant in manifest.variants.values():
        if variant.file not in manifest.files:
            raise PackageError(f"variant file {variant.file!r} is not listed in files",
                               path=str(root))
    head = manifest.head
    for rel in (head.backbone, head.params) if head is not None else ():
        if rel is not None and rel not in manifest.files:
            raise PackageError(f"head file {rel!r} is not listed in files", path=str(root))
    if not verify:
        return manifest
    for rel, entry in manifest.files.items():
        member = safe_member(root, rel)
        if member.is_symlink():
            raise PackageError(f"{rel}: symlinks are not allowed in a package", path=str(root))
        try:
            size = member.stat().st_size
        except FileNotFoundError:
            raise PackageError(f"{rel}: file is missing", path=str(root)) from None
        if size != entry.size:
            raise PackageError(f"{rel}: size {size} != manifest {entry.size} (truncated or "
                               "altered)", path=str(root))
        if file_sha256(member) != entry.sha256:
            raise PackageError(f"{rel}: sha256 does not match the manifest (altered)",
                               path=str(root))
    return manifest
