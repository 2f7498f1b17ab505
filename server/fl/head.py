"""A federated run that fine-tunes the head of an imported model (run config ``package``).

The devices train the head (a NumPy MLP) on their own backbone embeddings
(:mod:`edgefleet.device.fl.head`); the server starts them from the package's
``head.npz``, evaluates each round's head on the embeddings of the operator's evaluation
data, and at the end writes the head back into the fp32 graph and runs the import again
on it (:func:`edgefleet.models.build.importer.import_model`) with the package's recorded
preprocessing, cut and calibration method and the calibration data kept at import
(``source/``): int8 ONNX, temperature, golden inputs, a new backbone and head. When the
parent has a TFLite variant and the import kept its TensorFlow model, the new head is
written into that model too and converted like at import (full-integer, the same
calibration rows): the new version has all three variants. Otherwise (an ONNX source,
a SavedModel ending in softmax, a package imported without the kept model) it has ONNX
variants only, and ``lineage.fine_tuned.tflite`` says why.
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

__all__ = ["HeadJob", "head_package"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _bump(version: str) -> str:
    parts = [int(p) for p in version.split(".")]
    parts += [0] * (3 - len(parts))
    parts[-1] += 1
    return ".".join(map(str, parts))


def head_package(package: str) -> tuple[Path, Manifest, HeadCut]:
    """The package a head run fine-tunes, its manifest and cut, checked before a run
    starts: a trainable head and the kept calibration and evaluation data."""
    from edgefleet.models.build.head import SOURCE_DIR

    root = Path(package).expanduser()
    m = load_package(root)
    cut = m.head
    if m.lineage.get("model", {}).get("kind") == "tflite":
        raise UsageError(f"{root}: imported from an int8 TFLite file, which has no fp32 "
                         "graph to cut a head from: import the Keras, SavedModel or ONNX "
                         "model it came from to fine-tune it")
    if cut is None or not cut.trainable or cut.backbone is None or cut.params is None:
        raise UsageError(f"{root}: the package has no trainable head (import it with "
                         "edgefleet models import; see docs/bring-your-own-model.md)")
    for name in ("calibration", "eval"):
        kept = root / SOURCE_DIR / f"{name}.npz"
        want = m.lineage.get(name, {}).get("sha256")
        if not kept.is_file() or file_sha256(kept) != want:
            raise UsageError(f"{root}: {SOURCE_DIR}/{name}.npz is missing or is not the "
                             "data the package was imported with")
    return root, m, cut


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

        root, m, cut = head_package(package)
        assert cut.backbone is not None and cut.params is not None
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
            sm, tflite = self._tflite_source(model, fp32, Path(td) / "saved_model")
            labels = Path(td) / "labels.txt"
            labels.write_text("\n".join(m.labels) + "\n", encoding="utf-8")
            opts = ImportOptions(
                model=fp32, calibration=self.root / SOURCE_DIR / "calibration.npz",
                eval=self.root / SOURCE_DIR / "eval.npz", out=out, labels=labels,
                head_from=None if self.cut.auto else self.cut.node, name=m.name,
                version=_bump(m.version), task=m.task, layout=m.input.layout,
                tflite_source=sm)
            if pre is not None:
                opts = replace(opts, scale=pre.scale, mean=pre.mean, std=pre.std)
            if method in CALIB_METHODS:
                opts = replace(opts, methods=(method,))
            res = import_model(opts)
        parent = {"name": m.name, "version": m.version,
                  "backbone_sha256": self.backbone_sha256,
                  "variants": sorted(m.variants)}
        new = res.manifest.model_copy(update={"lineage": {
            **res.manifest.lineage,
            "fine_tuned": {**lineage, "parent": parent, "tflite": tflite}}})
        write_manifest(out, new)
        return out

    def _tflite_source(self, model: MLP, fp32: Path, dest: Path
                       ) -> tuple[Path | None, dict[str, Any]]:
        """The kept TensorFlow model with the new head (a SavedModel at ``dest``) when the
        parent has a TFLite variant and its source allows; else ``None`` and the reason."""
        from edgefleet.models.build.head import (
            SOURCE_DIR,
            HeadError,
            head_params,
            kept_tf_source,
            tf_source_with_head,
        )

        m = self.manifest
        kind = m.lineage.get("model", {}).get("kind")
        if "tflite-int8" not in m.variants:
            earlier = (m.lineage.get("fine_tuned", {}).get("tflite") or {}).get("reason")
            why = (f"the parent {m.version} has no TFLite variant either ({earlier})"
                   if earlier else
                   {"onnx": "the source is an ONNX model (no TensorFlow model to convert)",
                    "savedmodel": "the source SavedModel ends in softmax"}.get(
                       str(kind), "the parent has no TFLite variant"))
            return None, {"rebuilt": False, "reason": why}
        src = kept_tf_source(self.root)
        if src is None:
            return None, {"rebuilt": False, "reason": "the package keeps no TensorFlow "
                          "model in source/ (imported before fine-tuned TFLite existed: "
                          "import it again)"}
        ref = m.variant("onnx-fp32")
        with np.load(self.root / SOURCE_DIR / "eval.npz", allow_pickle=False) as f:
            x = np.asarray(f["x"], np.float32)
        rows = normalize(x.reshape(len(x), -1), m.normalization)
        want = np.asarray(open_backend(fp32.parent, ref.model_copy(update={
            "file": fp32.name}), threads=1).run(rows), np.float32)
        try:
            info = tf_source_with_head(
                src, head_params(self.root / ref.file, self.cut), list(model.params), dest,
                rows.reshape(len(rows), *(ref.input_shape or m.input.shape)), want)
        except HeadError as exc:
            return None, {"rebuilt": False, "reason": str(exc)}
        return dest, {"rebuilt": True, "from": f"source/{src.name}", **info}
