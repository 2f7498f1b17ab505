"""``edgefleet report``: one HTML page with PNG plots of the fleet's telemetry over time.

Plots (one line per device): latency p95, median calibrated confidence, fallback share
and input drift PSI, read from the stored ``metrics`` messages. Static files only, so
the report can be mailed or served from anywhere.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from edgefleet.server.telemetry.store import Store

__all__ = ["series", "write_report"]

PLOTS = (
    ("latency.png", "Latency p95 (ms)", "latency_p95"),
    ("confidence.png", "Median confidence", "confidence_p50"),
    ("fallback.png", "Fallback share", "fallback_share"),
    ("drift.png", "Input drift (PSI)", "drift_input"),
)


def series(store: Store, limit: int = 20_000) -> dict[str, dict[str, list[Any]]]:
    """Per device: ``ts`` and each plotted quantity, oldest first: the newest ``limit``
    raw metrics messages, and before them up to ``limit`` hourly means of the history
    that ``edgefleet fleet prune`` rolled up."""
    out: dict[str, dict[str, list[Any]]] = {}

    def add(device: str, ts: float, lat: Any, conf: Any, fallback: Any, n: Any,
            drift: Any) -> None:
        s = out.setdefault(device, {k: [] for k in
                                    ("ts", "latency_p95", "confidence_p50",
                                     "fallback_share", "drift_input")})
        s["ts"].append(dt.datetime.fromtimestamp(ts))
        s["latency_p95"].append(lat)
        s["confidence_p50"].append(conf)
        s["fallback_share"].append((fallback or 0) / n if n else None)
        s["drift_input"].append(drift)

    for h in store.hourly(kind="metrics", limit=limit):
        add(h["device"], h["hour"] + 1800.0, h["latency_p95"], h["confidence_p50"],
            h["fallback"], h["inferences"], h["drift_input"])
    for m in store.messages(kind="metrics", limit=limit, newest=True):
        body = json.loads(m["payload"]).get("body", {})
        add(m["device"], m["ts"], (body.get("latency_ms") or {}).get("p95"),
            (body.get("confidence") or {}).get("p50"), body.get("fallback"),
            body.get("inferences") or 0, (body.get("drift") or {}).get("input_psi"))
    for s in out.values():
        order = sorted(range(len(s["ts"])), key=lambda i: s["ts"][i])
        for k in s:
            s[k] = [s[k][i] for i in order]
    return out


def _plot(data: dict[str, dict[str, list[Any]]], key: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    for device, s in sorted(data.items()):
        pts = [(t, v) for t, v in zip(s["ts"], s[key], strict=True) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=device, linewidth=1.2)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if data and len(data) <= 12:
        ax.legend(fontsize="small", loc="best")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(store: Store, out: Path, limit: int = 20_000,
                 fl_db: Path | None = None) -> Path:
    """Write ``index.html`` and one PNG per plot into ``out``; returns the HTML path.

    With ``fl_db`` (the FL store) the page also shows accuracy per device of recent runs.
    """
    out.mkdir(parents=True, exist_ok=True)
    data = series(store, limit)
    for fname, title, key in PLOTS:
        _plot(data, key, title, out / fname)
    rows = []
    for d in store.devices():
        n = d["n_inferences"] or 0
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            d["device"], "online" if d["online"] else "offline", d["model_version"] or "-", n,
            f"{d['n_fallback'] / n:.1%}" if n else "-",
            f"{d['n_degraded'] / n:.1%}" if n else "-",
            d["drift_input"] if d["drift_input"] is not None else "-",
            d["epsilon"] if d["epsilon"] is not None else "-")) + "</tr>")
    alerts = "".join(f"<li>{html.escape(a['device'])}: {html.escape(a['kind'])}</li>"
                     for a in store.open_alerts()) or "<li>none</li>"
    imgs = "".join(f'<h2>{html.escape(t)}</h2><img src="{f}" alt="{html.escape(t)}">'
                   for f, t, _ in PLOTS)
    if fl_db is not None:
        from edgefleet.server.fl.report import fl_section

        imgs += fl_section(fl_db, out)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgefleet report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>edgefleet fleet report</h1>
<p>Generated {dt.datetime.now().isoformat(timespec="seconds")} from
{sum(len(s["ts"]) for s in data.values())} metrics messages.</p>
<table><tr><th>device</th><th>status</th><th>model</th><th>inferences</th><th>fallback</th>
<th>degraded</th><th>drift PSI</th><th>ε</th></tr>{"".join(rows)}</table>
<h2>Open alerts</h2><ul>{alerts}</ul>
{imgs}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
