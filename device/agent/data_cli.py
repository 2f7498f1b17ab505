"""``edgefleet-agent data``: the device's sample store (docs/device-data.md).

``stats`` (counts per source and class, never contents), ``eval`` (a model's accuracy on
the store's held-out samples, the split the ClientApp uses), ``import`` (a provisioned
``.npz`` for pilots, checked by the model like any label), ``export`` (the samples
themselves: only with an explicit flag, with a warning) and ``wipe``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError

__all__ = ["app"]

app = typer.Typer(help="The device's labelled samples: stats, eval, import, export, wipe.",
                  no_args_is_help=True)

CONFIG = typer.Option(..., "--config", "-c", help="agent.toml (repeat to layer files).")
JSON = typer.Option(False, "--json", help="Print one JSON object.")


def _cfg(config: list[Path]) -> Any:
    from edgefleet.device.agent.settings import load_agent_config

    return load_agent_config(*config)


def _store(cfg: Any) -> Any:
    from edgefleet.device.agent.samples import open_store

    return open_store(cfg)


def _model_package(cfg: Any, package: Path | None) -> Path:
    """The package to check inputs with: the given one, the active update slot, or the
    bootstrap package."""
    if package is not None:
        return package
    slots = cfg.state_dir / "updates" / "slots.json"
    if slots.is_file():
        from edgefleet.device.updates.slots import SlotStore

        store = SlotStore(cfg.state_dir / "updates")
        slot, info = store.active()
        if slot is not None and info is not None:
            return store.path(slot)
    if cfg.model.package is None:
        raise UsageError("no model to check samples with: pass --model PKG")
    return Path(cfg.model.package)


@app.command()
def stats(config: list[Path] = CONFIG, json_out: bool = JSON) -> None:
    """Samples stored, per label source and per class (never contents).

    Example: edgefleet-agent data stats -c /etc/edgefleet/agent.toml
    """
    with _store(_cfg(config)) as st:
        s = st.stats(by_model=True)
    s["path"] = str(st.path)
    if json_out:
        print_json(s)
        return
    console.print(f"{s['total']} samples ({s['bytes']} bytes, "
                  f"{'encrypted' if s['encrypted'] else 'not encrypted'}) in {s['path']}")
    console.print("by source: " + (", ".join(f"{k} {v}" for k, v in
                                              sorted(s["by_source"].items())) or "-"))
    console.print("by class:  " + (", ".join(f"{k}: {v}" for k, v in
                                              sorted(s["by_class"].items(),
                                                     key=lambda kv: int(kv[0]))) or "-"))


@app.command("eval")
def evaluate(
    package: Path = typer.Argument(..., help="Model package to evaluate."),
    config: list[Path] = CONFIG,
    source: str | None = typer.Option(None, "--source", help="Only samples labelled this "
                                      "way (api, serial, scorer, import)."),
    answered_by: str | None = typer.Option(None, "--answered-by", help="Only samples "
                                           "that NAME@VERSION answered."),
    every: bool = typer.Option(False, "--all", help="Every matching sample, not only the "
                               "held-out share (for a model that never trains on them)."),
    json_out: bool = JSON,
) -> None:
    """Accuracy of a model package on the store's held-out samples (the ClientApp's split).

    Examples:
      edgefleet-agent data eval /var/lib/edgefleet/updates/slots/a -c agent.toml
      edgefleet-agent data eval pkg -c agent.toml --all --source serial --answered-by cnn@1.0.0
    """
    from edgefleet.device.data.store import SOURCES, held_out
    from edgefleet.device.runtime.predictor import Predictor

    if source is not None and source not in SOURCES:
        raise UsageError(f"--source {source!r}: one of {', '.join(SOURCES)}")
    with _store(_cfg(config)) as st:
        got = st.samples()
    keep = np.ones(len(got.y), dtype=bool) if every else held_out(got.ids)
    if source is not None:
        keep &= np.asarray([s == source for s in got.sources], dtype=bool)
    if answered_by is not None:
        keep &= np.asarray([m == answered_by for m in got.models], dtype=bool)
    x_test, y_test = got.x[keep], got.y[keep]
    out: dict[str, Any] = ({"samples": len(y_test)} if every else
                           {"held_out": len(y_test), "train": len(got.y) - len(y_test)})
    out["accuracy"] = None
    if len(y_test):
        model = Predictor.load(package, threads=1)
        # The store keeps inputs flattened; an image model wants its (H, W, C) back.
        x_test = x_test.reshape(len(y_test), *model.manifest.input.shape)
        pred = [p.label for i in range(0, len(y_test), 256)
                for p in model.predict_batch(x_test[i:i + 256])]
        out["accuracy"] = float(np.mean(np.asarray(pred) == y_test))
    if json_out:
        print_json(out)
    else:
        acc = "n/a" if out["accuracy"] is None else f"{out['accuracy']:.3f}"
        console.print(f"accuracy {acc} on {len(y_test)} {'' if every else 'held-out '}samples")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help=".npz with x (n, features) and y (n,) class indices."),
    config: list[Path] = CONFIG,
    model: Path | None = typer.Option(None, "--model", help="Check inputs and classes with "
                                      "this package (default: the active model)."),
    json_out: bool = JSON,
) -> None:
    """Add a provisioned file of labelled samples (source 'import'), checked like any label.

    Example: edgefleet-agent data import pilot-samples.npz -c agent.toml
    """
    from edgefleet.device.data.labels import AnswerMemory, LabelIntake, LabelRefused
    from edgefleet.device.runtime.predictor import Predictor

    cfg = _cfg(config)
    if "import" not in cfg.data.label_sources:
        raise UsageError("imports are off by policy ([data] label_sources)")
    try:
        with np.load(file, allow_pickle=False) as f:
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{file}: not an .npz with x and y ({exc})") from None
    if len(x) != len(y):
        raise UsageError(f"{file}: {len(x)} inputs but {len(y)} labels")
    pred = Predictor.load(_model_package(cfg, model), threads=1)
    m = pred.manifest
    refused: dict[str, int] = {}
    with _store(cfg) as st:
        intake = LabelIntake(st, pred.validate, lambda: list(m.labels),
                             lambda: f"{m.name}@{m.version}", enabled={"import"},
                             memory=AnswerMemory(1))
        stored = 0
        for xi, yi in zip(x, y, strict=True):
            try:
                intake.label_input(xi, yi.item(), "import")
                stored += 1
            except LabelRefused as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
    out = {"stored": stored, "refused": refused}
    if json_out:
        print_json(out)
    else:
        console.print(f"stored {stored} samples; refused {sum(refused.values())} {refused}")


@app.command()
def export(
    out: Path = typer.Option(..., "--out", help="The .npz to write (x, y, source, ts)."),
    config: list[Path] = CONFIG,
    private_data: bool = typer.Option(False, "--i-understand-this-exports-private-data",
                                      help="Required: the file holds the device's raw "
                                           "samples, which otherwise never leave it."),
) -> None:
    """Write the stored samples to a file, for the operator only (explicit flag).

    Example: edgefleet-agent data export -c agent.toml --out /root/samples.npz
    --i-understand-this-exports-private-data
    """
    if not private_data:
        raise UsageError("export writes the device's private samples in the clear: pass "
                         "--i-understand-this-exports-private-data if that is what you want")
    print("WARNING: the exported file holds this device's raw samples and labels in the "
          "clear; they never leave the device otherwise. Keep it owner-only and delete it "
          "when done.", file=sys.stderr)
    with _store(_cfg(config)) as st:
        got = st.samples()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, x=got.x, y=got.y, source=np.asarray(got.sources), ids=got.ids)
    console.print(f"wrote {len(got.y)} samples to {out} (mode 0600)")


@app.command()
def wipe(config: list[Path] = CONFIG,
         yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete every stored sample (overwritten on disk).

    Example: edgefleet-agent data wipe -c agent.toml --yes
    """
    if not yes and not typer.confirm("Delete every sample this device stored?"):
        raise typer.Exit(1)
    with _store(_cfg(config)) as st:
        n = st.wipe()
    console.print(f"wiped {n} samples")
