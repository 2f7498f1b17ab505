"""Head fine-tuning on the device: the active package's backbone makes the training inputs.

When the server trains the head of an imported model (round config
:data:`~edgefleet.device.wire.federated.HEAD_BACKBONE`), the ClientApp reads the package
it serves (node-config ``model-package``: a package folder, or the updater's state
folder, whose ``slots.json`` names the active slot), checks that its backbone is the
one the server names, and turns each stored sample into the backbone's embedding: the
package's normalization, then the int8 backbone (onnxruntime). The head is the
:class:`~edgefleet.device.runtime.mlp.MLP` the server sends; only it is trained and sent.
Embeddings of store samples are cached (:mod:`edgefleet.device.data.embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.durable import read_json
from edgefleet.device.core.errors import ConfigError
from edgefleet.device.data.embeddings import EmbeddingCache, cache_folder
from edgefleet.device.runtime.backends import InferenceBackend, open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import HeadCut, Manifest, Variant, load_package

__all__ = ["ActiveHead", "load_head", "package_dir"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def package_dir(model_package: str) -> Path:
    """The package folder ``model-package`` names (the active slot of an updater folder)."""
    root = Path(model_package).expanduser()
    if (root / "slots.json").is_file():
        ptr = read_json(root / "slots.json")
        active = ptr.get("active") if isinstance(ptr, dict) else None
        if active not in ("a", "b"):
            raise ConfigError("no active model slot", path=str(root))
        return root / "slots" / str(active)
    return root


@dataclass(frozen=True)
class ActiveHead:
    """The served package's backbone, verified, and what the head takes."""

    root: Path
    manifest: Manifest
    cut: HeadCut
    sha256: str
    backend: InferenceBackend

    def embed(self, x: F32) -> F32:
        """Embeddings of raw input rows (the package's normalization, then the backbone)."""
        out: F32 = np.asarray(self.backend.run(normalize(x, self.manifest.normalization)),
                              np.float32)
        return out

    def inputs(self, x: F32, ids: I64 | None, store: str, sealed: bool) -> F32:
        """Embeddings of ``x``, cached by sample id for an unsealed sample store."""
        if ids is None or not store or sealed or len(ids) != len(x):
            return self.embed(x)
        cache = EmbeddingCache(cache_folder(Path(store).expanduser()), self.sha256)
        return cache.get(ids, x, self.embed)


def load_head(model_package: str, wanted_sha256: str) -> ActiveHead:
    """The active package's head, if its backbone is ``wanted_sha256``; else ConfigError."""
    if not model_package:
        raise ConfigError("the server trains a model head, but this node names no "
                          "model-package")
    root = package_dir(model_package)
    manifest = load_package(root)
    cut = manifest.head
    if cut is None or not cut.trainable or cut.backbone is None:
        raise ConfigError(f"the active package {manifest.name}@{manifest.version} has no "
                          "trainable head", path=str(root))
    sha = manifest.files[cut.backbone].sha256
    if sha != wanted_sha256:
        raise ConfigError(f"the server trains the head of backbone {wanted_sha256[:12]}, the "
                          f"active package {manifest.name}@{manifest.version} has "
                          f"{sha[:12]}", path=str(root))
    ref = manifest.variant("onnx-int8" if "onnx-int8" in manifest.variants else "onnx-fp32")
    backend = open_backend(root, Variant(file=cut.backbone, format="onnx", precision="int8",
                                         input_name=ref.input_name, output_name=cut.embedding,
                                         input_shape=ref.input_shape), threads=1)
    return ActiveHead(root, manifest, cut, sha, backend)
