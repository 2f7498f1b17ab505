"""A federated run that fine-tunes the head of an imported model (run config ``package``).

The devices train the head (a NumPy MLP) on their own backbone embeddings
(:mod:`edgefleet.device.fl.head`); the server starts them from the package's
``head.npz``, evaluates each round's head on the embeddings of the operator's evaluation
data, and at the end writes the head back into the fp32 graph and runs the import again
on it (:func:`edgefleet.models.build.importer.import_model`) with the package's recorded
preprocessing, cut and calibration method and the calibration data kept at import
(``source/``): int8 ONNX, temperature, golden inputs, a new backbone and head. A
TFLite variant is not rebuilt (the fine-tuned graph is ONNX; converting ONNX to TFLite
needs a converter the project does not ship), so a fine-tuned version has ONNX variants
only.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import (
    HeadCut,
    Manifest,
    Variant,
    file_sha256,
    load_package,
    write_manifest,
)
from edgefleet.device.runtime.mlp import MLP, load_params

__all__ = ["HeadJob"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _bump(version: str) -> str:
    parts = [int(p) for p in version.split(".")]
    parts += [0] * (3 - len(parts))
    parts[-1] += 1
    return ".".join(map(str, parts))


@dataclass(frozen=True)
class HeadJob:
    """The imported package a run fine-tunes, and the server's evaluation of its head."""

    root: Path
    manifest: Manifest
    cut: HeadCut
    initial: MLP
    x_eval: F32
    y_eval: I64

    @classmethod
    def open(cls, package: str) -> HeadJob:
        """Check the package and its kept data; embed the evaluation data once."""
        from edgefleet.models.build.head import SOURCE_DIR

        root = Path(package).expanduser()
        m = load_package(root)
        cut = m.head
        if cut is None or not cut.trainable or cut.backbone is None or cut.params is None:
            raise UsageError(f"{root}: the package has no trainable head (import it with "
                             "edgefleet models import; see docs/bring-your-own-model.md)")
        for name in ("calibration", "eval"):
            kept = root / SOURCE_DIR / f"{name}.npz"
            want = m.lineage.get(name, {}).get("sha256")
            if not kept.is_file() or file_sha256(kept) != want:
                raise UsageError(f"{root}: {SOURCE_DIR}/{name}.npz is missing or is not the "
                                 "data the package was imported with")
        with np.load(root / SOURCE_DIR / "eval.npz", allow_pickle=False) as f:
            x, y = np.asarray(f["x"], np.float32), np.asarray(f["y"], np.int64)
        ref = m.variant("onnx-int8")
        backbone = open_backend(root, Variant(
            file=cut.backbone, format="onnx", precision="int8", input_name=ref.input_name,
            output_name=cut.embedding, input_shape=ref.input_shape), threads=1)
        emb = np.asarray(backbone.run(normalize(x.reshape(len(x), -1), m.normalization)),
                         np.float32)
        return cls(root, m, cut, MLP.from_params(load_params(root / cut.params)), emb, y)

    @property
    def backbone_sha256(self) -> str:
        """What the devices' active package must have (round config ``head-backbone``)."""
        assert self.cut.backbone is not None
        return self.manifest.files[self.cut.backbone].sha256

    def package(self, model: MLP, out: Path, lineage: dict[str, Any]) -> Path:
        """The fine-tuned version: head written back, re-imported into ``out``."""
        from edgefleet.models.build.head import SOURCE_DIR, write_head
        from edgefleet.models.build.importer import ImportOptions, import_model
        from edgefleet.models.build.onnx_export import CALIB_METHODS

        m = self.manifest
        pre = m.input.preprocessing
        method = m.lineage.get("quantization", {}).get("onnx", {}).get("method")
        with tempfile.TemporaryDirectory(prefix=".head.") as td:
            fp32 = write_head(self.root / m.variant("onnx-fp32").file, self.cut,
                              list(model.params), Path(td) / "model_fp32.onnx")
            labels = Path(td) / "labels.txt"
            labels.write_text("\n".join(m.labels) + "\n", encoding="utf-8")
            opts = ImportOptions(
                model=fp32, calibration=self.root / SOURCE_DIR / "calibration.npz",
                eval=self.root / SOURCE_DIR / "eval.npz", out=out, labels=labels,
                head_from=None if self.cut.auto else self.cut.node, name=m.name,
                version=_bump(m.version), task=m.task, layout=m.input.layout)
            if pre is not None:
                opts = replace(opts, scale=pre.scale, mean=pre.mean, std=pre.std)
            if method in CALIB_METHODS:
                opts = replace(opts, methods=(method,))
            res = import_model(opts)
        parent = {"name": m.name, "version": m.version,
                  "backbone_sha256": self.backbone_sha256,
                  "tflite": "not rebuilt: the fine-tuned graph is ONNX" if
                  "tflite-int8" in m.variants else None}
        new = res.manifest.model_copy(update={"lineage": {
            **res.manifest.lineage, "fine_tuned": {**lineage, "parent": parent}}})
        write_manifest(out, new)
        return out
