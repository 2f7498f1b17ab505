"""``edgefleet predict``: run a model package on raw samples from a ``.npy`` file."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["predict"]

#: Rows shown in the human-readable table; ``--json`` always prints every row.
SHOWN_ROWS = 20


class BackendChoice(StrEnum):
    """Which runtime runs the package (its best int8 variant)."""

    onnx = "onnx"
    tflite = "tflite"


def predict(
    package: Path = typer.Argument(..., help="Model package folder."),
    input_file: Path = typer.Option(..., "--input", "-i",
                                    help="A .npy file: one raw sample or a batch, in the "
                                         "package's input shape (or flat rows)."),
    backend: BackendChoice | None = typer.Option(None, "--backend",
                                                 help="onnx or tflite (default: the manifest's "
                                                      "default variant)."),
    threads: int = typer.Option(3, "--threads", min=1, help="Runtime threads."),
    json_out: bool = typer.Option(False, "--json",
                                  help="A JSON list of {label, label_name, confidence, "
                                       "latency_ms}, one per row."),
) -> None:
    """Verify a package, then predict the class of every row of a .npy file.

    The package's files are checked against its manifest and its golden inputs are run
    first; a package altered after build is refused. Samples are raw values, checked
    against the manifest's input spec like the agent's inputs (the manifest's
    normalization is applied here, once), e.g. digits rows of 64 pixels 0..16, or
    ``(n, 8, 8, 1)`` images for an imported CNN.

    Example: edgefleet predict out/digits --input rows.npy --backend tflite --json
    """
    import numpy as np

    from edgefleet.device.core.errors import UsageError
    from edgefleet.device.runtime.input_spec import InputAdapter
    from edgefleet.device.runtime.predictor import Predictor

    pred = Predictor.load(package, backend=backend.value if backend else None, threads=threads)
    try:
        x = np.load(input_file, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{input_file}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{input_file}: not a readable .npy array ({exc})") from None
    answers = pred.predict_batch(InputAdapter(pred.manifest.input, pred.metrics).batch(x))
    if json_out:
        print_json([{"label": a.label, "label_name": a.label_name,
                     "confidence": a.confidence, "latency_ms": a.latency_ms} for a in answers])
        return
    console.print(f"{pred.manifest.name} {pred.manifest.version} ({pred.variant}), "
                  f"{len(answers)} sample(s) in {answers[0].latency_ms:.3f} ms")
    for i, a in enumerate(answers[:SHOWN_ROWS]):
        console.print(f"  {i:4d}  {a.label_name:>12s}  confidence {a.confidence:.3f}")
    if len(answers) > SHOWN_ROWS:
        console.print(f"  … {len(answers) - SHOWN_ROWS} more (use --json for all)")
