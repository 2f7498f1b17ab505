"""HTML of the dashboard's pages: plain strings, every value through :func:`e`.

No template engine: the pages are small, and one escaping function applied to every
value is easy to check (a device name or alert text holding ``<script>`` renders as
text). Numbers that move carry ``data-live``/``data-device`` attributes; the static
script (``static/dashboard.js``) fills them from the server-sent events.
"""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import quote

from edgefleet.device.wire.logs import LEVELS
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN
from edgefleet.server.telemetry.rows import fmt_time, fmt_value

__all__ = ["LOG_LINES", "alerts_page", "device_page", "e", "error_page", "fl_page",
           "fleet_page", "login_page", "logs_form", "logs_page", "rollouts_page"]

NAV = (("/", "Fleet"), ("/rollouts", "Rollouts"), ("/fl", "Federated"), ("/alerts", "Alerts"),
       ("/report/", "Plots"))


def e(value: Any) -> str:
    """Escaped text of any value (``-`` for None)."""
    return "-" if value is None else html.escape(str(value), quote=True)


def _num(v: Any, pct: bool = False) -> str:
    return e(fmt_value(v, pct))


def _live(device: str, field: str, value: str, fmt: str = "num") -> str:
    return (f'<span data-live="{e(field)}" data-device="{e(device)}" data-fmt="{e(fmt)}">'
            f"{value}</span>")


def device_link(name: str) -> str:
    """A link to a device's page, or plain text for a name no page can have."""
    if re.fullmatch(DEVICE_ID_PATTERN, name):
        return f'<a href="/devices/{quote(name)}">{e(name)}</a>'
    return e(name)


def layout(title: str, body: str, *, user: str | None = None, csrf: str = "",
           active: str = "", live: bool = False) -> str:
    """The frame of every page: viewport for phones, nav, logout form, the live script."""
    nav = ""
    if user:
        links = "".join(f'<a href="{href}"{" class=on" if href == active else ""}>{name}</a>'
                        for href, name in NAV)
        nav = (f'<nav>{links}<form method="post" action="/logout" class="logout">'
               f'<input type="hidden" name="csrf" value="{e(csrf)}">'
               f'<button type="submit">Sign out {e(user)}</button></form></nav>')
    events = ' data-events="/events"' if live else ""
    status = ('<p class="live" id="live-status">connecting to live updates…</p>'
              if live else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · edgefleet</title>
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body{events}><header><h1>edgefleet</h1>{nav}</header>
<main><h2>{e(title)}</h2>{status}{body}</main>
<script src="/static/dashboard.js"></script></body></html>
"""


def _form(action: str, csrf: str, label: str, fields: dict[str, str], cls: str = "") -> str:
    hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">'
                     for k, v in fields.items())
    return (f'<form method="post" action="{e(action)}" class="inline">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">{hidden}'
            f'<button type="submit" class="{e(cls)}">{e(label)}</button></form>')


def login_page(error: str = "", next_url: str = "/") -> str:
    """The sign-in form."""
    msg = f'<p class="error" id="login-error">{e(error)}</p>' if error else ""
    body = (f'{msg}<form method="post" action="/login" class="login">'
            f'<input type="hidden" name="next" value="{e(next_url)}">'
            '<label>User <input name="user" id="user" autocomplete="username" '
            'maxlength="32" required></label>'
            '<label>Password <input name="password" id="password" type="password" '
            'autocomplete="current-password" maxlength="256" required></label>'
            '<button type="submit" id="login">Sign in</button></form>')
    return layout("Sign in", body)


def error_page(message: str, reason: str, *, user: str | None = None, csrf: str = "") -> str:
    """A refused request or a failed action: what happened and its stable reason."""
    return layout("Not done", f'<p class="error" data-reason="{e(reason)}">{e(message)}</p>'
                  f"<p>reason: <code>{e(reason)}</code></p>"
                  '<p><a href="javascript:history.back()">back</a></p>', user=user, csrf=csrf)


def fleet_page(rows: list[dict[str, Any]], matched: int, *, status: str, group: str, text: str,
               groups: list[str], open_alerts: int, user: str, csrf: str) -> str:
    """Every device with its live numbers; filters by status, group and text."""
    opts = "".join(f'<option value="{e(v)}"{" selected" if v == status else ""}>{e(n)}</option>'
                   for v, n in (("", "any status"), ("online", "online"),
                                ("offline", "offline")))
    gopts = "".join(f'<option value="{e(g)}"{" selected" if g == group else ""}>'
                    f'{e(g or "any group")}</option>' for g in ["", *groups])
    filters = (f'<form method="get" action="/" class="filters">'
               f'<select name="status" aria-label="status">{opts}</select>'
               f'<select name="group" aria-label="group">{gopts}</select>'
               f'<input name="q" value="{e(text)}" maxlength="64" placeholder="device or '
               f'version" aria-label="search"><button type="submit">Filter</button></form>')
    head = ("<tr><th>device</th><th>status</th><th>group</th><th>model</th><th>inferences</th>"
            "<th>local</th><th>cloud</th><th>degraded</th><th>p95 ms</th><th>drift PSI</th>"
            "<th>ε / budget</th><th>last seen</th></tr>")
    body = []
    for r in rows:
        d = r["device"]
        model = (f"{r['model_name']}@{r['model_version']}" if r["model_name"]
                 else r["model_version"])
        body.append(
            f'<tr data-row="{e(d)}"><td data-label="device">{device_link(d)}</td>'
            f'<td data-label="status">{_live(d, "online", "online" if r["online"] else "offline", "online")}</td>'  # noqa: E501
            f'<td data-label="group">{e(r["group"] or "-")}</td>'
            f'<td data-label="model">{_live(d, "model_version", e(model), "text")}</td>'
            f'<td data-label="inferences">{_live(d, "inferences", _num(r["inferences"]))}</td>'
            f'<td data-label="local">{_live(d, "local_rate", _num(r["local_rate"], True), "pct")}</td>'  # noqa: E501
            f'<td data-label="cloud">{_live(d, "fallback_rate", _num(r["fallback_rate"], True), "pct")}</td>'  # noqa: E501
            f'<td data-label="degraded">{_live(d, "degraded_rate", _num(r["degraded_rate"], True), "pct")}</td>'  # noqa: E501
            f'<td data-label="p95 ms">{_live(d, "p95", _num(r["latency"].get("p95")))}</td>'
            f'<td data-label="drift PSI">{_live(d, "drift", _num(r["drift"]))}</td>'
            f'<td data-label="ε / budget"><span>{_live(d, "epsilon", _num(r["epsilon"]))} / '
            f'{_num(r["epsilon_budget"])}</span></td>'
            f'<td data-label="last seen">{_live(d, "last_seen", e(fmt_time(r["last_seen"])), "time")}</td></tr>')  # noqa: E501
    more = (f"<p>showing {len(rows)} of {matched} devices; narrow the filter</p>"
            if matched > len(rows) else "")
    summary = (f'<p class="summary"><span data-live="devices" data-fmt="num">{matched}</span> '
               f'devices · <a href="/alerts"><span data-live="open_alerts" data-fmt="num">'
               f"{open_alerts}</span> open alerts</a></p>")
    table = (f'<table class="cards" id="fleet">{head}{"".join(body)}</table>' if rows
             else "<p>no devices match</p>")
    return layout("Fleet", summary + filters + table + more, user=user, csrf=csrf, active="/",
                  live=True)


def device_page(v: dict[str, Any], *, user: str, csrf: str) -> str:
    """One device: its row, latest latency and system numbers, history, events, logs."""
    r, d = v["row"], v["row"]["device"]
    facts = [("status", _live(d, "online", "online" if r["online"] else "offline", "online")),
             ("group", e(r["group"] or "-")), ("model", _live(d, "model_version",
                                                            e(r["model_version"]), "text")),
             ("inferences", _live(d, "inferences", _num(r["inferences"]))),
             ("cloud", _live(d, "fallback_rate", _num(r["fallback_rate"], True), "pct")),
             ("degraded", _live(d, "degraded_rate", _num(r["degraded_rate"], True), "pct")),
             ("drift PSI", _live(d, "drift", _num(r["drift"]))),
             ("ε", _live(d, "epsilon", _num(r["epsilon"]))),
             ("latency p50 / p95 ms", f'{_num(v["latency"].get("p50"))} / '
                                      f'{_live(d, "p95", _num(v["latency"].get("p95")))}'),
             ("last seen", _live(d, "last_seen", e(fmt_time(r["last_seen"])), "time")),
             ("messages", f'{e(r["messages"])} (duplicates dropped {e(r["duplicates"])})'),
             ("spool dropped", e(r["spool_dropped"]))]
    facts += [(f"system {k}", e(val)) for k, val in list(v["system"].items())[:12]]
    dl = "<dl class='facts'>" + "".join(f"<dt>{e(k)}</dt><dd>{val}</dd>"
                                        for k, val in facts) + "</dl>"
    hist = "".join(f"<tr><td>{e(fmt_time(h['ts']))}</td><td>{_num(h['inferences'])}</td>"
                   f"<td>{_num(h['fallback_rate'], True)}</td><td>{_num(h['p95'])}</td>"
                   f"<td>{_num(h['drift_input'])}</td><td>{_num(h['drift_confidence'])}</td>"
                   "</tr>" for h in v["history"])
    history = ("<h3>History (recent metrics reports)</h3><table class='scroll'><tr><th>sent</th>"
               "<th>inferences</th><th>cloud</th><th>p95 ms</th><th>input PSI</th>"
               f"<th>confidence PSI</th></tr>{hist}</table>" if hist
               else "<h3>History</h3><p>no metrics stored yet</p>")
    events = "".join(f"<li>{e(fmt_time(ev['ts']))} <b>{e(ev['kind'])}</b> {e(ev['message'])}</li>"
                     for ev in v["events"]) or "<li>none</li>"
    logs = (f'<section id="logs"><h3>Logs</h3>{logs_form(d)}<p class="muted">Asked of the '
            "device over MQTT when you click (<code>edgefleet devices logs</code>), redacted "
            "on the device.</p></section>")
    return layout(f"Device {d}", dl + history + f"<h3>Events</h3><ul>{events}</ul>" + logs,
                  user=user, csrf=csrf, active="/", live=True)


#: Line counts the logs form offers (the device keeps about 2,000).
LOG_LINES = ("50", "200", "1000")


def logs_form(device: str, lines: str = "200", level: str = "DEBUG") -> str:
    """The button that asks a device for its logs (a GET: it changes nothing)."""
    nopts = "".join(f'<option{" selected" if n == lines else ""}>{n}</option>'
                    for n in LOG_LINES)
    lopts = "".join(f'<option{" selected" if lv == level else ""}>{lv}</option>'
                    for lv in LEVELS)
    return (f'<form method="get" action="/devices/{quote(device)}/logs" class="filters">'
            f'<label>lines <select name="lines">{nopts}</select></label> '
            f'<label>from <select name="level">{lopts}</select></label> '
            '<button type="submit" id="fetch-logs">Fetch recent logs</button></form>')


def logs_page(device: str, v: dict[str, Any], *, lines: str, level: str, user: str,
              csrf: str) -> str:
    """A device's recent log lines as it answered them, or why it did not."""
    back = f'<p><a href="/devices/{quote(device)}">back to {e(device)}</a></p>'
    if v["error"]:
        body = (f'<p class="error" id="logs-error" data-reason="{e(v["reason"])}">'
                f'{e(v["error"])}</p><p>reason: <code>{e(v["reason"])}</code></p>')
    elif not v["lines"]:
        body = '<p id="logs-empty">the device answered with no lines</p>'
    else:
        rows = "".join(f'<tr class="lv-{e(ln["level"]).lower()}"><td>{e(fmt_time(ln["ts"]))}</td>'
                       f'<td>{e(ln["level"])}</td><td>{e(ln["logger"])}</td>'
                       f'<td class="msg">{e(ln["msg"])}</td></tr>' for ln in v["lines"])
        body = (f'<p class="muted">{len(v["lines"])} lines, oldest first</p>'
                "<table class='scroll' id='log-lines'><tr><th>time</th><th>level</th>"
                f"<th>logger</th><th>message</th></tr>{rows}</table>")
    return layout(f"Logs of {device}", back + logs_form(device, lines, level) + body,
                  user=user, csrf=csrf, active="/")


def rollouts_page(v: dict[str, Any], *, user: str, csrf: str) -> str:
    """Rollouts with canary progress, decisions and promote/rollback buttons."""
    if v["missing"]:
        return layout("Rollouts", "<p>no registry (pass --registry or use a fleet home)</p>",
                      user=user, csrf=csrf, active="/rollouts")
    items = []
    for r in v["rollouts"]:
        n = len(r["devices"])
        progress = (f"{r['on_candidate']}/{n} canary devices report {e(r['version'])}" if n
                    else f"{e(r['mode'])} {e(r['group'] or '')}")
        decisions = "".join(
            f"<li>{e(x.get('time'))} <b>{e(x.get('action'))}</b> by {e(x.get('actor'))}"
            f"{': ' + e((x.get('details') or {}).get('reason')) if (x.get('details') or {}).get('reason') else ''}</li>"  # noqa: E501
            for x in r["decisions"])
        buttons = ""
        if r["status"] in ("running", "stopping"):
            buttons = (_form(f"/rollouts/{quote(r['model'])}/promote", csrf, "Promote", {})
                       + _form(f"/rollouts/{quote(r['model'])}/rollback", csrf, "Roll back", {},
                               "danger"))
        elif r["status"] == "promoted":
            buttons = _form(f"/rollouts/{quote(r['model'])}/rollback", csrf, "Roll back", {},
                            "danger")
        items.append(
            f'<article class="rollout" data-rollout="{e(r["id"])}"><h3>{e(r["model"])}@'
            f'{e(r["version"])} <span class="status {e(r["status"])}">{e(r["status"])}</span>'
            f'</h3><p>{progress}; threshold {_num(r["threshold"])}'
            f'{" (shadow)" if r["shadow"] else ""}; started {e(fmt_time(r["created"]))}</p>'
            f'{"<p>reason: " + e(r["reason"]) + "</p>" if r["reason"] else ""}'
            f"<ul>{decisions}</ul>{buttons}</article>")
    models = "".join(f"<tr><td>{e(m.get('name'))}</td><td>{e(m.get('version'))}</td>"
                     f"<td>{'yanked' if m.get('yanked') else ''}</td></tr>" for m in v["models"])
    body = ("".join(items) or "<p>no rollouts yet</p>") + (
        f"<h3>Registered versions</h3><table><tr><th>model</th><th>version</th><th></th></tr>"
        f"{models}</table>" if models else "")
    return layout("Rollouts", body, user=user, csrf=csrf, active="/rollouts")


def fl_page(runs: list[dict[str, Any]], *, user: str, csrf: str) -> str:
    """Federated runs: per-round accuracy and ε, device spread, declines by reason."""
    parts = []
    for run in runs:
        rounds = "".join(f"<tr><td>{e(r['round'])}</td><td>{_num(r['accuracy'])}</td>"
                         f"<td>{_num(r['epsilon'])}</td><td>{e(r['nodes'])}</td>"
                         f"<td>{e(r['declined'])}</td><td>"
                         + e(", ".join(f"{k} {n}" for k, n in sorted(r["declines"].items())))
                         + "</td></tr>" for r in run["rounds"])
        s = run["spread"]
        spread = ("<p>no per-device evaluation</p>" if s is None else
                  f"<p>last round across {e(s['devices'])} devices: min {_num(s['min'])}, "
                  f"median {_num(s['median'])}, max {_num(s['max'])}; worst node "
                  f"{e(s['worst'])}</p>")
        declines = ", ".join(f"{e(k)} {e(n)}" for k, n in sorted(run["declines"].items()))
        parts.append(
            f'<article class="run" data-run="{e(run["tag"])}"><h3>{e(run["tag"])} '
            f'<span class="status">{e(run["status"])}</span></h3>'
            f'<p>strategy {e(run["strategy"])}{"; error: " + e(run["error"]) if run["error"] else ""}'  # noqa: E501
            f"</p>{spread}<p>declined rounds by reason: {declines or 'none'}</p>"
            "<table class='scroll'><tr><th>round</th><th>accuracy</th><th>ε</th><th>devices</th>"
            f"<th>declined</th><th>why</th></tr>{rounds}</table></article>")
    return layout("Federated runs", "".join(parts) or "<p>no federated runs recorded</p>",
                  user=user, csrf=csrf, active="/fl")


def alerts_page(v: dict[str, Any], approvals: list[dict[str, Any]], *, user: str,
                csrf: str) -> str:
    """Open alerts with acknowledge buttons; retraining requests with approve/deny."""
    rows = []
    for a in v["open"]:
        ack = (f"acknowledged by {e(a['acknowledged_by'])}" if a["acknowledged_by"] else
               _form("/alerts/ack", csrf, "Acknowledge", {"device": a["device"],
                                                          "kind": a["kind"]}))
        rows.append(f'<tr data-alert="{e(a["device"])}|{e(a["kind"])}">'
                    f'<td data-label="device">{device_link(a["device"])}</td>'
                    f'<td data-label="alert">{e(a["kind"])}</td>'
                    f'<td data-label="since">{e(fmt_time(a["since"]))}</td>'
                    f'<td data-label="">{ack}</td></tr>')
    alerts = (f"<table class='cards'><tr><th>device</th><th>alert</th><th>since</th><th></th>"
              f"</tr>{''.join(rows)}</table>" if rows else "<p>no open alerts</p>")
    events = "".join(f"<li>{e(fmt_time(ev['ts']))} {e(ev['device'] or '-')} <b>{e(ev['kind'])}"
                     f"</b> {e(ev['message'])}</li>" for ev in v["events"]) or "<li>none</li>"
    reqs = []
    for r in approvals:
        d = r["details"] if isinstance(r["details"], dict) else {}
        act = ""
        if r["status"] == "pending":
            act = (_form("/approvals", csrf, "Approve", {"request": r["id"],
                                                         "decision": "approve"})
                   + _form("/approvals", csrf, "Reject", {"request": r["id"],
                                                          "decision": "deny"}, "danger"))
        reqs.append(f'<tr data-request="{e(r["id"])}"><td data-label="request">{e(r["id"])}</td>'
                    f'<td data-label="group">{e(r["group"])}</td>'
                    f'<td data-label="status">{e(r["status"])}'
                    f'{" by " + e(r["actor"]) if r["actor"] else ""}</td>'
                    f'<td data-label="alerting">{e(len(d.get("alerting", [])))}/'
                    f'{e(d.get("devices", "?"))}</td><td data-label="">{act}</td></tr>')
    approvals_html = (f"<table class='cards'><tr><th>request</th><th>group</th><th>status</th>"
                      f"<th>alerting</th><th></th></tr>{''.join(reqs)}</table>" if reqs
                      else "<p>no retraining requests</p>")
    body = (f"<h3>Open alerts</h3>{alerts}<h3>Retraining approvals</h3>{approvals_html}"
            f"<h3>Recent alert events</h3><ul>{events}</ul>")
    return layout("Alerts", body, user=user, csrf=csrf, active="/alerts")
