"""``edgefleet-sensor-sim``: a sensor that writes protocol frames to a serial port or a pty.

It plays the part of the microcontroller on the other end of the UART for demos, tests
and benchmarks: frames for ``digits`` (the 64 pixels, ``U8_VECTOR``) or ``vibration``
(a raw 3-axis window, ``ACCEL_F32``, or its 48 features, ``F32_VECTOR``), at a fixed
rate, with seeded faults from :mod:`edgefleet.models.sim.serial_faults`. It knows the
truth: with ``--label-every N`` it also sends ``LABEL`` frames carrying the true classes
of its last N sample frames (delayed ground truth). Everything, samples, labels and
faults, is deterministic in ``--seed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import typer

from edgefleet.device.core.cli_support import console, print_json, run_app, version_callback
from edgefleet.device.core.errors import UsageError
from edgefleet.device.wire.frames import PayloadType, encode_frame, encode_labels
from edgefleet.models.sim.serial_faults import FaultInjector, Faults
from edgefleet.models.sim.shift import Shift, shifted_pixels, shifted_windows

__all__ = ["app", "main", "samples"]

app = typer.Typer(name="edgefleet-sensor-sim", add_completion=False,
                  pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


class SimTask(StrEnum):
    """What the simulated sensor measures."""

    digits = "digits"
    vibration = "vibration"


class PayloadChoice(StrEnum):
    """For vibration: send the raw window or the device features."""

    raw = "raw"
    features = "features"


#: A pty dies with its last writer; give the reader this long to read what is left.
PTY_LINGER_S = 1.0
Sample = tuple[int, bytes, int]  # payload type, payload, true label


def samples(task: str, seed: int, payload: str = "raw",
            shift: Shift | None = None) -> Iterator[Sample]:
    """An endless, seeded stream of (payload type, payload bytes, label), maybe shifted."""
    rng = np.random.default_rng(seed)
    shift = shift or Shift()
    if task == "digits":
        from edgefleet.models.core.tasks import get_task

        split = get_task("digits").split()
        while True:
            for i in rng.permutation(len(split.y_test)):
                x = split.x_test[i] if shift.identity else shifted_pixels(split.x_test[i],
                                                                          shift, rng)
                pixels = np.clip(np.round(x), 0, 255).astype(np.uint8)
                yield PayloadType.U8_VECTOR, pixels.tobytes(), int(split.y_test[i])
    from edgefleet.device.input.features import band_energies
    from edgefleet.models.core.vibration import LABELS

    while True:
        label = int(rng.integers(len(LABELS)))
        window = next(shifted_windows([label], shift, rng)).astype("<f4")
        if payload == "features":
            yield PayloadType.F32_VECTOR, band_energies(window).astype("<f4").tobytes(), label
        else:
            yield PayloadType.ACCEL_F32, window.tobytes(), label


def _writer(port: str | None, create_pty: Path | None,
            baudrate: int) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """(write, close) for a serial port/URL, or for a new pty whose path ``create_pty`` links."""
    if create_pty is not None:
        master, slave = os.openpty()
        with contextlib.suppress(FileNotFoundError):
            create_pty.unlink()
        create_pty.symlink_to(os.ttyname(slave))
        typer.echo(f"pty {os.ttyname(slave)} linked at {create_pty}", err=True)

        def write_fd(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(master, view):]

        def close_fd() -> None:
            time.sleep(PTY_LINGER_S)  # let the reader drain the pty before it vanishes
            create_pty.unlink(missing_ok=True)
            os.close(master)
            os.close(slave)

        return write_fd, close_fd
    from edgefleet.device.input.serial_reader import open_port

    try:
        ser = open_port(str(port), baudrate=baudrate, timeout=None)
    except Exception as exc:  # pyserial raises SerialException/ValueError/OSError
        raise UsageError(f"cannot open {port}: {exc}") from None

    def write_serial(data: bytes) -> None:
        ser.write(data)

    return write_serial, ser.close


@app.command()
def run(
    task: SimTask = typer.Option(SimTask.digits, "--task", help="digits or vibration."),
    port: str | None = typer.Option(None, "--port", help="Serial device or pyserial URL "
                                    "(/dev/ttyUSB0, /tmp/a from socat, socket://host:port)."),
    create_pty: Path | None = typer.Option(None, "--create-pty",
                                           help="Make a pty and symlink this path to it."),
    rate: float = typer.Option(10.0, "--rate", min=0.0, help="Frames per second (0: flat out)."),
    count: int = typer.Option(0, "--count", min=0, help="Frames to send (0: until Ctrl-C)."),
    payload: PayloadChoice = typer.Option(PayloadChoice.raw, "--payload",
                                          help="vibration: raw window or 48 features."),
    sensor_id: int = typer.Option(1, "--sensor-id", min=0, max=0xFFFF),
    faults: str = typer.Option("", "--faults", help="e.g. bitflip=0.01,truncate=0.005,"
                               "garbage=0.01,pause=0.01,pause_s=0.3"),
    seed: int = typer.Option(0, "--seed", help="Seed for samples and faults."),
    shift: str = typer.Option("", "--shift", help="Move the distribution (docs/tasks.md): "
                              "vibration speed=1.6,gain=1.2; digits "
                              "intensity=0.5,noise=2,rotation=15,thickness=0.5."),
    baudrate: int = typer.Option(921_600, "--baudrate", min=1200),
    truth: Path | None = typer.Option(None, "--truth", help="Write seq, label, damaged "
                                      "as JSON lines here."),
    label_every: int = typer.Option(0, "--label-every", min=0, help="After every N sample "
                                    "frames send one LABEL frame with their true classes "
                                    "(delayed ground truth; 0: never)."),
    label_share: float = typer.Option(1.0, "--label-share", min=0.0, max=1.0,
                                      help="Share of the sample frames that get a label."),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as JSON at the end."),
    samples_out: Path | None = typer.Option(
        None, "--samples-out", help="Instead of frames: write this sensor's labelled share "
        "of the task (K of N, see --share) as FILE.npz for `edgefleet-agent data import`."),
    share: str = typer.Option("0/1", "--share", help="With --samples-out: share K of N."),
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Write sensor frames (docs/serial-protocol.md) at a fixed rate, with optional faults.

    Examples:

      edgefleet-sensor-sim --task digits --port /dev/ttyUSB0 --rate 50 --count 1000

      edgefleet-sensor-sim --task vibration --create-pty /tmp/sensor --faults bitflip=0.01

      edgefleet-sensor-sim --task vibration --create-pty /tmp/sensor --shift speed=1.6

      edgefleet-sensor-sim --task digits --create-pty /tmp/sensor --label-every 10

      edgefleet-sensor-sim --task digits --samples-out pilot.npz --share 1/2
    """
    if samples_out is not None:
        _write_share(task.value, share, samples_out, json_out)
        return
    if (port is None) == (create_pty is None):
        raise UsageError("give exactly one of --port and --create-pty")
    moved = Shift.parse(shift, task.value)
    injector = FaultInjector(Faults.parse(faults), seed=seed)
    write, close = _writer(port, create_pty, baudrate)
    truth_fh = truth.open("w", encoding="utf-8") if truth else None
    sent = damaged = nbytes = labelled = 0
    seq = 0  # every frame takes a sequence number, label frames too
    pending: list[tuple[int, int]] = []
    pick = np.random.default_rng([seed, 1])
    start = time.monotonic()
    stream = samples(task.value, seed, payload.value, moved)

    def send(ptype: int, data: bytes) -> int:
        nonlocal seq, nbytes
        ts = time.time_ns() // 1000
        chunks, touched = injector.apply(encode_frame(sensor_id, seq, ts, ptype, data))
        for chunk in chunks:
            if isinstance(chunk, float):
                time.sleep(chunk)
            else:
                write(chunk)
                nbytes += len(chunk)
        seq += 1
        return int(touched)

    try:
        while count == 0 or sent < count:
            ptype, data, label = next(stream)
            frame_seq = seq
            touched = send(ptype, data)
            if truth_fh:
                truth_fh.write(json.dumps({"seq": frame_seq, "label": label,
                                           "damaged": touched}) + "\n")
            if label_every and pick.random() < label_share:
                pending.append((frame_seq, label))
            sent += 1
            damaged += touched
            if label_every and sent % label_every == 0 and pending:
                send(PayloadType.LABEL, encode_labels(pending))
                labelled += len(pending)
                pending = []
            if rate > 0:
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    except KeyboardInterrupt:
        pass
    finally:
        close()
        if truth_fh:
            truth_fh.close()
    summary: dict[str, Any] = {"frames": sent, "damaged": damaged, "bytes": nbytes,
                               "labelled": labelled,
                               "seconds": round(time.monotonic() - start, 3)}
    if json_out:
        print_json(summary)
    else:
        typer.echo(f"sent {sent} frames ({damaged} damaged), {nbytes} bytes", err=True)


def _write_share(task: str, share: str, out: Path, json_out: bool) -> None:
    """A pilot's provisioned samples: the same Dirichlet share a simulated device holds."""
    from edgefleet.models.sim.fl_app import export_partition

    try:
        k, n = (int(v) for v in share.split("/"))
    except ValueError:
        raise UsageError(f"--share must be K/N, not {share!r}") from None
    if not 0 <= k < n:
        raise UsageError(f"--share {share}: K must be in 0..N-1")
    export_partition(task, k, n, out)
    with np.load(out) as f:
        rows = len(f["y"])
    if json_out:
        print_json({"samples": rows, "out": str(out), "share": share})
    else:
        console.print(f"wrote {rows} labelled samples (share {share} of {task}) to {out}")


def main() -> None:
    """Console-script entry point."""
    run_app(app)
