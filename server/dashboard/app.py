"""The dashboard's ASGI app (Starlette): sign-in, pages, actions, server-sent events.

Every page needs a signed session cookie (HttpOnly, SameSite=Strict, Secure over TLS);
every action is a POST carrying the session's CSRF token and goes through
:mod:`edgefleet.server.dashboard.actions` (the CLI's own calls, audit-logged). Input is
hostile: form bodies are read up to :data:`MAX_FORM` bytes and parsed by hand into a few
known fields, query parameters are bounded and checked, device names match the wire's
pattern. Each refusal answers with a stable ``reason`` and counts
``dashboard_refused_<reason>``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.wire.logs import LEVELS
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN
from edgefleet.server.dashboard import actions, pages, views
from edgefleet.server.dashboard.auth import LoginLimiter, Session, SessionSigner, Users
from edgefleet.server.dashboard.proxies import TrustedProxies
from edgefleet.server.fleet.audit import audit_details

__all__ = ["COOKIE", "MAX_FORM", "DashboardConfig", "create_app"]

COOKIE = "ef_session"
#: Bytes of a form body read at most (a sign-in or an action is far smaller).
MAX_FORM = 4096
MAX_QUERY = 64
#: Model names in rollout URLs (the registry's names are shorter and simpler).
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ALERT_KIND_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
REQUEST_PATTERN = r"^[0-9a-f]{1,32}$"
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
CSP = ("default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


@dataclass
class DashboardConfig:
    """What the app serves and how."""

    sources: views.Sources
    #: Users, the session secret and the plots cache live here (owner-only).
    state: Path
    secret: bytes
    tls: bool = False
    #: Seconds between server-sent updates; a stream ends after ``stream_seconds``
    #: (the browser reconnects), at most ``max_streams`` at once.
    interval: float = 2.0
    stream_seconds: float = 300.0
    max_streams: int = 32
    login_attempts: int = 5
    login_window: float = 300.0
    #: Reverse proxies whose ``X-Forwarded-For`` names the client (sign-in limit, audit
    #: entries); none: the peer address is the client.
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    #: A device page's logs: seconds to wait for the device, fetches running at once.
    logs_timeout: float = 5.0
    max_log_fetches: int = 4


class _Refused(Exception):
    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status


class _Stream(StreamingResponse):
    """Server-sent events holding one of ``max_streams`` slots for as long as the response
    runs, however it ends: finished, client gone, or cancelled before its first byte (then
    the generator never starts, so a ``finally`` in it would never give the slot back)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Live:
    """One SSE payload shared by every stream, recomputed at most once per interval."""

    def __init__(self, src: views.Sources, interval: float) -> None:
        self.src, self.interval = src, interval
        self._lock = threading.Lock()
        self._at, self._data = 0.0, ""

    def payload(self) -> str:
        with self._lock:
            if time.monotonic() - self._at >= self.interval:
                self._data = json.dumps(views.live_rows(self.src), separators=(",", ":"))
                self._at = time.monotonic()
            return self._data


def create_app(cfg: DashboardConfig, metrics: Metrics | None = None) -> Starlette:
    """The dashboard as an ASGI application."""
    src = cfg.sources
    users = Users(cfg.state)
    signer = SessionSigner(cfg.secret)
    limiter = LoginLimiter(cfg.login_attempts, cfg.login_window)
    metrics = metrics or Metrics()
    live = _Live(src, cfg.interval)
    streams = {"open": 0}
    log_fetches = threading.BoundedSemaphore(cfg.max_log_fetches)
    report_lock = threading.Lock()

    def headers(resp: Response, csp: str = CSP) -> Response:
        resp.headers["Content-Security-Policy"] = csp
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def html(text: str, status: int = 200) -> Response:
        return headers(HTMLResponse(text, status_code=status))

    def refuse(exc: _Refused, session: Session | None = None) -> Response:
        metrics.inc(f"dashboard_refused_{exc.reason}")
        resp = html(pages.error_page(exc.message, exc.reason,
                                     user=session.user if session else None,
                                     csrf=signer.csrf(session) if session else ""), exc.status)
        resp.headers["X-Refused-Reason"] = exc.reason
        return resp

    def client_of(request: Request) -> str:
        """The client's address: the peer's, or the forwarded one from a trusted proxy."""
        peer = request.client.host if request.client else "?"
        found = cfg.trusted_proxies.client(peer, request.headers.getlist("x-forwarded-for"))
        if found.ignored is not None:
            metrics.inc(f"dashboard_forwarded_ignored_{found.ignored}")
        return found.host

    def session_of(request: Request) -> Session | None:
        s = signer.verify(request.cookies.get(COOKIE))
        return s if s is not None and s.user in users.names() else None

    def to_login(request: Request) -> Response:
        nxt = request.url.path
        if request.url.query:
            nxt += "?" + request.url.query
        return headers(RedirectResponse(f"/login?next={quote(nxt[:512], safe='/')}", 303))

    def param(request: Request, name: str, allowed: tuple[str, ...] | None = None) -> str:
        value = request.query_params.get(name, "")
        if len(value) > MAX_QUERY:
            raise _Refused("bad_query", f"query parameter {name} is too long")
        if allowed is not None and value not in allowed:
            raise _Refused("bad_query", f"query parameter {name} must be one of "
                           f"{', '.join(a or '(empty)' for a in allowed)}")
        return value

    async def read_form(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM):
            raise _Refused("form_too_large", f"a form is at most {MAX_FORM} bytes", 413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                raise _Refused("form_too_large", f"a form is at most {MAX_FORM} bytes", 413)
        try:
            parsed = parse_qs(body.decode("utf-8"), max_num_fields=16, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise _Refused("bad_form", "the form is not UTF-8 url-encoded data") from None
        out = {}
        for f in fields:
            vals = parsed.get(f, [])
            if len(vals) > 1:
                raise _Refused("bad_form", f"field {f} given twice")
            out[f] = vals[0] if vals else ""
        return out

    def check(value: str, pattern: str, what: str) -> str:
        if not re.fullmatch(pattern, value):
            raise _Refused("bad_name", f"{what} is not a valid name")
        return value

    async def authed_post(request: Request, fields: tuple[str, ...]
                          ) -> tuple[Session, dict[str, str]]:
        session = session_of(request)
        if session is None:
            raise _Refused("not_signed_in", "sign in first", 401)
        form = await read_form(request, ("csrf", *fields))
        if not signer.csrf_ok(session, form["csrf"]):
            raise _Refused("bad_csrf", "the form's CSRF token is missing or not this "
                           "session's (reload the page)", 403)
        return session, form

    # -- sign-in ---------------------------------------------------------------------
    def safe_next(value: str) -> str:
        return value if value.startswith("/") and not value.startswith("//") \
            and "\\" not in value and len(value) <= 512 else "/"

    async def login_form(request: Request) -> Response:
        return html(pages.login_page(next_url=safe_next(request.query_params.get("next", "/"))))

    async def login(request: Request) -> Response:
        client = client_of(request)
        try:
            if limiter.blocked(client):
                raise _Refused("rate_limited", "too many failed sign-ins from this address; "
                               "wait a few minutes", 429)
            form = await read_form(request, ("user", "password", "next"))
        except _Refused as exc:
            return refuse(exc)
        ok = await run_in_threadpool(users.check, form["user"], form["password"])
        if not ok:
            limiter.failed(client)
            metrics.inc("dashboard_refused_bad_login")
            resp = html(pages.login_page("wrong user or password", safe_next(form["next"])), 401)
            resp.headers["X-Refused-Reason"] = "bad_login"
            return resp
        limiter.succeeded(client)
        metrics.inc("dashboard_logins")
        resp = headers(RedirectResponse(safe_next(form["next"]), 303))
        resp.set_cookie(COOKIE, signer.issue(form["user"]), max_age=int(signer.ttl),
                        httponly=True, samesite="strict", secure=cfg.tls, path="/")
        return resp

    async def logout(request: Request) -> Response:
        try:
            await authed_post(request, ())
        except _Refused as exc:
            return refuse(exc)
        resp = headers(RedirectResponse("/login", 303))
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=cfg.tls)
        return resp

    # -- pages -------------------------------------------------------------------------
    async def page(request: Request, render: Any) -> Response:
        session = session_of(request)
        if session is None:
            return to_login(request)
        start = time.perf_counter()
        try:
            return html(await run_in_threadpool(render, session, signer.csrf(session)))
        except _Refused as exc:
            return refuse(exc, session)
        finally:
            metrics.observe("dashboard_page_ms", (time.perf_counter() - start) * 1000)

    async def fleet(request: Request) -> Response:
        def render(s: Session, csrf: str) -> str:
            status = param(request, "status", ("", "online", "offline"))
            groups = sorted(set(src.groups.values()))
            group = param(request, "group", ("", *groups))
            text = param(request, "q")
            rows, matched = views.fleet_rows(src, status=status, group=group, text=text)
            return pages.fleet_page(rows, matched, status=status, group=group, text=text,
                                    groups=groups, open_alerts=len(src.store.open_alerts()),
                                    user=s.user, csrf=csrf)
        return await page(request, render)

    async def device(request: Request) -> Response:
        def render(s: Session, csrf: str) -> str:
            name = check(request.path_params["name"], DEVICE_ID_PATTERN, "the device")
            v = views.device_view(src, name)
            if v is None:
                raise _Refused("unknown_device", f"no device {name} in the store", 404)
            return pages.device_page(v, user=s.user, csrf=csrf)
        return await page(request, render)

    async def device_logs(request: Request) -> Response:
        """A device's recent logs, asked of it now: a page of its own, so a silent device
        never holds up the device page (at most ``logs_timeout`` seconds here)."""
        session = session_of(request)
        if session is None:
            return to_login(request)
        try:
            name = check(request.path_params["name"], DEVICE_ID_PATTERN, "the device")
            lines = param(request, "lines", ("", *pages.LOG_LINES)) or "200"
            level = param(request, "level", ("", *LEVELS)) or "DEBUG"
            if src.logs is None:
                raise _Refused("logs_unavailable", "remote logs need the broker's operator "
                               "account: run the dashboard with the fleet home (--home)", 503)
            if src.store.device(name) is None:
                raise _Refused("unknown_device", f"no device {name} in the store", 404)
            if not log_fetches.acquire(blocking=False):
                raise _Refused("logs_busy", "other log requests are running; try again in a "
                               "few seconds", 503)
        except _Refused as exc:
            return refuse(exc, session)
        try:
            v = await run_in_threadpool(views.device_logs, src, name, lines=int(lines),
                                        level=level, timeout=cfg.logs_timeout)
        finally:
            log_fetches.release()
        resp = html(pages.logs_page(name, v, lines=lines, level=level, user=session.user,
                                    csrf=signer.csrf(session)),
                    504 if v["reason"] == "timeout" else 502 if v["reason"] else 200)
        if v["reason"]:
            metrics.inc(f"dashboard_logs_failed_{v['reason']}")
            resp.headers["X-Refused-Reason"] = v["reason"]
        else:
            metrics.inc("dashboard_logs_fetched")
            metrics.inc("dashboard_log_lines", len(v["lines"]))
        return resp

    async def rollouts(request: Request) -> Response:
        return await page(request, lambda s, csrf: pages.rollouts_page(
            views.rollouts_view(src), user=s.user, csrf=csrf))

    async def fl(request: Request) -> Response:
        return await page(request, lambda s, csrf: pages.fl_page(views.fl_view(src),
                                                                 user=s.user, csrf=csrf))

    async def alerts(request: Request) -> Response:
        return await page(request, lambda s, csrf: pages.alerts_page(
            views.alerts_view(src), views.approvals_view(src), user=s.user, csrf=csrf))

    # -- actions -----------------------------------------------------------------------
    async def act(request: Request, fields: tuple[str, ...], run: Any, back: str) -> Response:
        session: Session | None = None
        client = client_of(request)

        def audited(s: Session, f: dict[str, str]) -> None:
            with audit_details(client=client):  # in the worker thread that writes them
                run(s, f)
        try:
            session, form = await authed_post(request, fields)
            await run_in_threadpool(audited, session, form)
        except _Refused as exc:
            return refuse(exc, session)
        except (EdgefleetError, RuntimeError, OSError) as exc:
            metrics.inc("dashboard_action_failed")
            return refuse(_Refused("action_failed", str(exc), 409), session)
        metrics.inc("dashboard_actions")
        return headers(RedirectResponse(back, 303))

    async def ack(request: Request) -> Response:
        def run(s: Session, f: dict[str, str]) -> None:
            actions.acknowledge_alert(src, s.user, check(f["device"], DEVICE_ID_PATTERN,
                                                         "the device"),
                                      check(f["kind"], ALERT_KIND_PATTERN, "the alert kind"))
        return await act(request, ("device", "kind"), run, "/alerts")

    async def approval(request: Request) -> Response:
        def run(s: Session, f: dict[str, str]) -> None:
            if f["decision"] not in ("approve", "deny"):
                raise _Refused("bad_form", "decision must be approve or deny")
            actions.decide_request(src, s.user, check(f["request"], REQUEST_PATTERN,
                                                      "the request"), f["decision"] == "approve")
        return await act(request, ("request", "decision"), run, "/alerts")

    async def rollout_op(request: Request) -> Response:
        op = request.path_params["op"]

        def run(s: Session, _f: dict[str, str]) -> None:
            model = check(request.path_params["model"], MODEL_PATTERN, "the model")
            if op not in ("promote", "rollback"):
                raise _Refused("bad_action", "unknown rollout action", 404)
            (actions.promote if op == "promote" else actions.rollback)(src, s.user, model)
        return await act(request, (), run, "/rollouts")

    # -- live updates, plots, static files ------------------------------------------------
    async def events(request: Request) -> Response:
        if session_of(request) is None:
            return refuse(_Refused("not_signed_in", "sign in first", 401))
        if streams["open"] >= cfg.max_streams:
            return refuse(_Refused("too_many_streams", "too many live views open", 503))
        streams["open"] += 1
        metrics.set("dashboard_streams_open", streams["open"])

        def release() -> None:
            streams["open"] -= 1
            metrics.set("dashboard_streams_open", streams["open"])

        async def gen() -> AsyncIterator[str]:
            end = time.monotonic() + cfg.stream_seconds
            yield "retry: 3000\n\n"
            while time.monotonic() < end:
                data = await run_in_threadpool(live.payload)
                yield f"event: fleet\ndata: {data}\n\n"
                await asyncio.sleep(cfg.interval)
                if await request.is_disconnected():
                    break
        resp = _Stream(gen(), release)
        resp.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return headers(resp)

    def plots_dir() -> Path:
        """The static report (``edgefleet report``) of the store, rewritten at most once a
        minute into ``<state>/report``."""
        from edgefleet.server.telemetry.report import write_report

        out = cfg.state / "report"
        with report_lock:
            index = out / "index.html"
            if not index.exists() or time.time() - index.stat().st_mtime > 60:
                write_report(src.store, out, fl_db=src.fl_db)
        return out

    async def report(request: Request) -> Response:
        from edgefleet.server.fl.report import FL_PLOT
        from edgefleet.server.telemetry.report import PLOTS

        session = session_of(request)
        if session is None:
            return to_login(request)
        name = request.path_params.get("name") or "index.html"
        if name not in {"index.html", FL_PLOT, *(p[0] for p in PLOTS)}:
            return refuse(_Refused("unknown_file", "no such plot", 404), session)
        out = await run_in_threadpool(plots_dir)
        if not (out / name).is_file():
            return refuse(_Refused("unknown_file", "no such plot", 404), session)
        # The report's own page has an inline style sheet; it runs no script.
        return headers(FileResponse(out / name), CSP.replace("style-src 'self'",
                                                             "style-src 'unsafe-inline'"))

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return refuse(_Refused("unknown_file", "no such file", 404))
        data = resources.files("edgefleet.server.dashboard").joinpath("static", name)
        return headers(Response(data.read_bytes(), media_type=STATIC[name]))

    async def healthz(_request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    app = Starlette(routes=[
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", fleet), Route("/devices/{name}", device),
        Route("/devices/{name}/logs", device_logs),
        Route("/rollouts", rollouts), Route("/fl", fl), Route("/alerts", alerts),
        Route("/alerts/ack", ack, methods=["POST"]),
        Route("/approvals", approval, methods=["POST"]),
        Route("/rollouts/{model}/{op}", rollout_op, methods=["POST"]),
        Route("/events", events), Route("/report/", report), Route("/report/{name}", report),
        Route("/static/{name}", static), Route("/healthz", healthz),
    ])
    app.state.metrics = metrics
    return app
