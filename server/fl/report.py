"""The federated part of ``edgefleet report``: accuracy per device, not only the average.

Reads the FL store (``fl.db`` of ``edgefleet train``): for the newest runs, the spread
of the devices' federated-evaluation accuracy in the last round (min, median, max, the
worst device named), how many rounds devices declined and why (privacy budget spent,
a request outside the device's privacy policy, a ledger it cannot trust), and for the
newest run a PNG of that spread per round. A device the global model fails on shows up
here even when the average looks fine.
"""

from __future__ import annotations

import html
import statistics
from pathlib import Path

from edgefleet.server.fl.robust import device_spread
from edgefleet.server.fl.store import FlStore, declines_by_reason

__all__ = ["FL_PLOT", "fl_section"]

FL_PLOT = "fl_devices.png"


def _plot(evals: dict[int, dict[str, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(evals)
    lo = [min(evals[r].values()) for r in rounds]
    mid = [statistics.median(evals[r].values()) for r in rounds]
    hi = [max(evals[r].values()) for r in rounds]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.fill_between(rounds, lo, hi, alpha=0.25, label="min–max across devices")
    ax.plot(rounds, mid, marker=".", label="median device")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on the device's held-out data")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fl_section(fl_db: Path, out: Path, limit: int = 10) -> str:
    """HTML for the newest ``limit`` runs (and ``out/fl_devices.png`` when there is data)."""
    if not fl_db.exists():
        return f"<h2>Federated runs</h2><p>no FL store at {html.escape(str(fl_db))}</p>"
    store = FlStore(fl_db)
    rows = []
    plotted = False
    for run in store.runs(limit):
        evals = store.device_evals(run.tag)
        last = evals[max(evals)] if evals else {}
        spread = device_spread({int(n): a for n, a in last.items()})
        cells = [run.tag, run.status, str(run.params.get("strategy", "-")),
                 str(max(evals) if evals else "-")]
        cells += (["-"] * 5 if spread is None else [
            str(spread["devices"]), f"{spread['min']:.3f}", f"{spread['median']:.3f}",
            f"{spread['max']:.3f}", str(spread["worst"])])
        declines = declines_by_reason(store.rounds(run.tag))
        cells += [str(declines.get(why, 0)) for why in ("budget", "policy", "ledger")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        if evals and not plotted:
            _plot(evals, f"run {run.tag}: accuracy per device", out / FL_PLOT)
            plotted = True
    if not rows:
        return "<h2>Federated runs</h2><p>no runs yet</p>"
    img = (f'<img src="{FL_PLOT}" alt="accuracy per device, newest run">' if plotted else "")
    return ("<h2>Federated runs: accuracy per device (last round)</h2>"
            "<table><tr><th>run</th><th>status</th><th>strategy</th><th>round</th>"
            "<th>devices</th><th>min</th><th>median</th><th>max</th><th>worst node</th>"
            "<th>declined: budget</th><th>policy</th><th>ledger</th></tr>"
            + "".join(rows) + "</table>" + img)
