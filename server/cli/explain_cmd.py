"""``edgefleet explain``: which input features drove one prediction, as numbers and a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError

__all__ = ["explain"]


def _load_row(path: Path, index: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read as .npy: {exc}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        return arr
    if arr.ndim == 2 and 0 <= index < len(arr):
        one: np.ndarray = arr[index]
        return one
    raise UsageError(f"{path}: want one row or a batch with row {index}, got shape {arr.shape}")


def _plot(png: Path, names: list[str], attr: np.ndarray, title: str, image: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if image:
        side = round(len(attr) ** 0.5)
        lim = float(np.abs(attr).max()) or 1.0
        im = ax.imshow(attr.reshape(side, side), cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, label="attribution (logit units)")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        order = np.argsort(-np.abs(attr))[:20][::-1]
        ax.barh([names[i] for i in order], attr[order],
                color=["#c0392b" if attr[i] > 0 else "#2471a3" for i in order])
        ax.set_xlabel("attribution (logit units)")
    ax.set_title(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def explain(
    package: Path = typer.Argument(..., help="Model package folder."),
    input_file: Path = typer.Option(..., "--input", help=".npy file: one raw sample or a batch."),
    row: int = typer.Option(0, "--row", help="Which row of a batch to explain."),
    target: int = typer.Option(-1, "--target", help="Class to explain (default: predicted)."),
    out: Path = typer.Option(None, "--png", help="Write a picture of the attributions here."),
    steps: int = typer.Option(64, "--steps", min=4, help="Integration steps."),
    top: int = typer.Option(10, "--top", min=1, help="Features to list."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Integrated-gradients attribution of one prediction to the input features.

    Attributions are in logit units and sum to logit(x) − logit(baseline), the baseline
    being the training mean. Example:
    edgefleet explain out/digits --input sample.npy --png why.png
    """
    from edgefleet.models.core.explain import explain_package
    from edgefleet.models.core.tasks import get_task

    x = _load_row(input_file, row)
    manifest, ex = explain_package(package, x, None if target < 0 else target, steps=steps)
    task = get_task(manifest.task)
    names = list(task.feature_names or [f"x{i}" for i in range(len(ex.attributions))])
    if out is not None:
        _plot(out, names, ex.attributions,
              f"{manifest.name}: why '{manifest.labels[ex.target]}'", image=task.name == "digits")
    order = np.argsort(-np.abs(ex.attributions))
    if json_out:
        print_json({
            "target": ex.target, "label": manifest.labels[ex.target], "logit": ex.logit,
            "baseline_logit": ex.baseline_logit, "completeness_gap": ex.completeness_gap,
            "attributions": dict(zip(names, ex.attributions.tolist(), strict=True)),
            "png": str(out) if out else None,
        })
        return
    table = Table("feature", "attribution", title=f"why '{manifest.labels[ex.target]}' "
                  f"(logit {ex.logit:.3f} vs baseline {ex.baseline_logit:.3f})")
    for i in order[:top]:
        table.add_row(names[i], f"{ex.attributions[i]:+.4f}")
    console.print(table)
    console.print(f"sum of attributions {ex.attributions.sum():+.4f}, completeness gap "
                  f"{ex.completeness_gap:.2e}" + (f"; picture: {out}" if out else ""))
