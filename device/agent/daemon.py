"""The device agent: one process that serves, falls back, reports, updates and trains.

Parts and threads (each stops on the one shared stop event):

* input: a :class:`SerialReader` thread decodes frames into a bounded queue (oldest
  dropped, counted), so slow inference never blocks serial I/O and a flood never grows
  memory; one inference thread answers them through the cascade.
* the local predict API (Unix socket) for other programs on the device.
* telemetry: the spooled MQTT publisher and the interval reporter (with drift).
* updates: the TUF updater and its MQTT assignment listener (when enabled).
* federated learning: ``flower-supernode`` as a supervised child (when enabled).

Shutdown (SIGTERM/SIGINT): stop taking input, finish the frame in flight, publish a last
report and give the spool a moment to drain (what is not acknowledged stays on disk),
stop the children, exit 0.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.device.agent.local_api import LocalApiServer
from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core.errors import EdgefleetError, InputError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.process import SupervisedProcess
from edgefleet.device.core.prom_text import write_textfile
from edgefleet.device.data.labels import AnswerMemory, LabelIntake, LabelRefused
from edgefleet.device.inference.cascade import Answer, HybridPredictor
from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.inference.serving import ServingModel
from edgefleet.device.input.model_input import ModelInput
from edgefleet.device.privacy.ledger import LEDGER_FILE, hwm_path
from edgefleet.device.runtime.manifest import Manifest
from edgefleet.device.runtime.predictor import Prediction, Predictor
from edgefleet.device.wire.frames import Frame, PayloadType, decode_labels

if TYPE_CHECKING:  # each is imported where its part starts (optional dependencies)
    from edgefleet.device.agent.samples import RevocationWatch
    from edgefleet.device.data.store import SampleStore
    from edgefleet.device.input.serial_reader import SerialReader
    from edgefleet.device.telemetry.log_ring import LogRing
    from edgefleet.device.telemetry.publisher import TelemetryPublisher
    from edgefleet.device.telemetry.reporter import TelemetryReporter
    from edgefleet.device.updates.installer import Updater

__all__ = ["Agent", "answer_to_dict"]

log = logging.getLogger(__name__)


def answer_to_dict(a: Answer) -> dict[str, Any]:
    """The JSON form of one answer (local API and logs)."""
    p = a.prediction
    return {"label": p.label, "label_name": p.label_name, "confidence": round(p.confidence, 6),
            "source": a.source, "reason": a.reason, "model": a.model,
            "latency_ms": round(a.latency_ms, 3)}


def _program(name: str) -> str:
    """``name`` on PATH, else beside this interpreter (a venv that is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


class _ServingView:
    """What :class:`HybridPredictor` needs (a :class:`~edgefleet.device.inference.cascade.
    LocalModel`), read from whatever model is active right now."""

    def __init__(self, serving: ServingModel) -> None:
        self.serving = serving

    def _active(self) -> Predictor:
        model = self.serving.active
        if model is None:
            raise EdgefleetError("no model is active")
        return model

    @property
    def manifest(self) -> Manifest:
        return self._active().manifest

    def validate(self, x: Any) -> np.ndarray:
        return self._active().validate(x)

    def predict(self, x: Any) -> Prediction:
        return self.serving.predict(x)

    def validate_and_predict(self, x: Any) -> tuple[np.ndarray, Prediction]:
        """Validated once, by the model that answers (a swap in between cannot split them)."""
        return self.serving.validate_and_predict(x)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the SuperNode's runtime API)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_path() -> str:
    """PATH for flower-supernode with our venv's bin first: systemd's PATH lacks it, and
    the SuperNode itself starts ``flower-superexec`` and ``flwr-clientapp`` by name."""
    import os
    import sys

    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", os.defpath)
    return path if here in path.split(os.pathsep) else f"{here}{os.pathsep}{path}"


class Agent:
    """Owns every part of one device; :meth:`run` blocks until a signal stops it."""

    def __init__(self, cfg: AgentConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else default_metrics()
        self.stop_event = threading.Event()
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.serving = ServingModel(metrics=self.metrics)
        self.view = _ServingView(self.serving)
        self.hybrid: HybridPredictor | None = None
        self._hybrid_manifest: Manifest | None = None
        self._score_client: Any = None
        self._started = False
        self._supernode_down_reported = False
        self.drift: DriftMonitor | None = None
        self._drift_manifest: Manifest | None = None
        self._input: ModelInput | None = None
        self._queue: collections.deque[Frame] = collections.deque(maxlen=cfg.input.queue_size)
        self._queue_ready = threading.Condition()
        #: How to stop each MQTT part (score client, update listener), in start order.
        self._parts: list[Callable[[], None]] = []
        self._threads: list[threading.Thread] = []
        self.publisher: TelemetryPublisher | None = None
        self.reporter: TelemetryReporter | None = None
        self.updater: Updater | None = None
        self.supernode: SupervisedProcess | None = None
        self.api: LocalApiServer | None = None
        self.reader: SerialReader | None = None
        self.last_answers: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.store: SampleStore | None = None
        self.intake: LabelIntake | None = None
        self.memory = AnswerMemory(cfg.data.remember_answers)
        self.revocation: RevocationWatch | None = None
        self.log_ring: LogRing | None = None

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> Agent:
        """Start every enabled part; a part that fails to start is logged and counted."""
        if self.cfg.logs.enabled:
            self._start_logs()
        self._start_model()
        if self.cfg.data.enabled:
            self._start_data()
        if self.cfg.telemetry.enabled:
            self._start_telemetry()
        self._start_fallback()
        if self.cfg.updates.enabled:
            self._start_updates()
        # Ready to answer before the first input can arrive (API, serial): a request in
        # the window would otherwise get "not started" from a working agent.
        self._started = True
        if self.cfg.api.enabled:
            self.api = LocalApiServer(self.cfg.socket_path, self.predict_batch,
                                      self.metrics)
            if self.intake is not None:
                self.api.accept_labels(self.label_request)
            self.api.start()
        if self.cfg.input.serial:
            self._start_input()
        if self.cfg.fl.enabled:
            self._start_fl()
        self.metrics.set("agent_started", time.time())
        if self.serving.active is None:
            self.metrics.set("agent_state", "waiting_for_update")
            log.warning("agent %s started without a model: waiting for an update",
                        self.cfg.device_id)
            if self.reporter is not None:
                self.reporter.event("waiting_for_update",
                                    message="no model yet: waiting for an update")
        else:
            self.metrics.set("agent_state", "serving")
        log.info("agent %s started", self.cfg.device_id)
        return self

    def _start_logs(self) -> None:
        """The ring first, so the start-up of every other part is in it."""
        from edgefleet.device.telemetry.log_ring import LogRing
        from edgefleet.device.telemetry.log_server import LogServer

        lc = self.cfg.logs
        ring = self.log_ring = LogRing(lc.max_records, lc.max_bytes).install()
        self._parts.append(lambda: logging.getLogger().removeHandler(ring))
        server = LogServer(self.cfg.device_id, self.log_ring, self.cfg.mqtt,
                           metrics=self.metrics, rate=lc.rate, burst=lc.burst,
                           max_follows=lc.max_follows, secrets=self._known_secrets)
        self._parts.append(server.start().stop)

    def _known_secrets(self) -> list[str]:
        """Literal secrets redacted from every log line that leaves the device."""
        try:
            pw = self.cfg.mqtt.secret()
        except EdgefleetError:
            return []
        return [pw] if pw else []

    def _start_model(self) -> None:
        if self.cfg.updates.enabled:
            from edgefleet.device.updates.installer import Updater
            from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig

            u = self.cfg.updates
            assert u.trusted_root is not None
            tuf = TufClient(self.state_dir, TufClientConfig(
                metadata_url=u.metadata_url, targets_url=u.targets_url or u.metadata_url,
                ca_file=u.ca_file, client_cert=u.client_cert, client_key=u.client_key),
                u.trusted_root.read_bytes())
            from edgefleet.device.runtime.envelope import FleetKey

            self.updater = Updater(self.state_dir / "updates", tuf, self.serving,
                                   variant=self.cfg.model.variant, metrics=self.metrics,
                                   fleet_key=FleetKey.load(u.fleet_key) if u.fleet_key else None,
                                   require_encryption=u.require_encryption)
            if self.updater.start() is not None:
                return
        if self.cfg.model.package is None:
            if self.updater is None:
                from edgefleet.device.core.errors import ConfigError

                raise ConfigError("no model: set [model] package, or [updates] so the "
                                  "agent can wait for one")
            return
        model = Predictor.load(self.cfg.model.package, variant=self.cfg.model.variant,
                               threads=self.cfg.model.threads, metrics=self.metrics)
        self.serving.swap(model, watch=False)

    def _start_data(self) -> None:
        """The sample store and the label intake (``[data]``)."""
        from edgefleet.device.agent.samples import RevocationWatch, open_store

        d = self.cfg.data
        self.store = open_store(self.cfg, self.metrics)
        enabled: set[str] = set(d.label_sources)
        if not d.cloud_labels:
            enabled.discard("scorer")
        self.intake = LabelIntake(self.store, self.view.validate, self._labels,
                                  self._model_ref, enabled=enabled, memory=self.memory,
                                  metrics=self.metrics)
        if d.wipe_on_revoke and self.cfg.telemetry.enabled:
            self.revocation = RevocationWatch(self.cfg, self.store, self.metrics)

    def _labels(self) -> list[str]:
        return list(self.view.manifest.labels)

    def _model_ref(self) -> str:
        m = self.view.manifest
        return f"{m.name}@{m.version}"

    def _answer_id(self, x: Any, a: Answer, frame: tuple[int, int] | None = None) -> str:
        """Every answer's id; the input behind it is kept only when labels can name it
        (a sample store is on): otherwise the inference path copies nothing."""
        if self.intake is None:
            return self.memory.new_id()
        return self.memory.remember(x, self._seen_by(a), frame)

    def _seen_by(self, a: Answer) -> str:
        """``name@version`` of the device model that saw the input behind ``a``."""
        if a.source != "cloud":
            return a.model
        try:
            return self._model_ref()
        except EdgefleetError:
            return a.model

    def label_request(self, items: list[Any]) -> dict[str, Any]:
        """The local API's label function (source ``api``)."""
        assert self.intake is not None
        return self.intake.label_many(items, "api")

    def _label_frame(self, frame: Frame) -> None:
        """A serial ``LABEL`` frame: ground truth for earlier frames of its sensor."""
        if self.intake is None:
            self.metrics.inc("data_labels_refused_source_disabled")
            return
        try:
            records = decode_labels(frame.payload)
        except ValueError as exc:
            self.intake.refuse("bad_request", str(exc))
            return
        for seq, cls in records:
            with contextlib.suppress(LabelRefused):  # counted by the intake
                self.intake.label_frame(frame.sensor_id, seq, cls)

    def _keep_cloud_label(self, x: Any, a: Answer) -> None:
        """The scorer's answer to an escalated sample, as a label of its own kind."""
        if self.intake is None or a.source != "cloud" or "scorer" not in self.intake.enabled:
            return
        if a.prediction.confidence < self.cfg.data.cloud_min_confidence:
            self.intake.refuse("low_confidence", "scorer answer below the floor")
            return
        with contextlib.suppress(LabelRefused):
            self.intake.label_input(x, a.prediction.label, "scorer")

    def _drift_for(self, manifest: Manifest) -> DriftMonitor | None:
        """The drift monitor of the active model (a new one after a swap)."""
        if manifest is not self._drift_manifest:
            self._drift_manifest = manifest
            self.drift = DriftMonitor.from_manifest(manifest, self.cfg.telemetry.drift_window)
            if self.reporter is not None:
                self.reporter.drift = self.drift
        return self.drift

    def _start_telemetry(self) -> None:
        from edgefleet.device.telemetry.publisher import TelemetryPublisher
        from edgefleet.device.telemetry.reporter import TelemetryReporter
        from edgefleet.device.telemetry.spool import MemorySpool, Spool, SpoolLike

        t = self.cfg.telemetry
        spool: SpoolLike
        try:
            spool = Spool(self.state_dir / "telemetry-spool.db", max_messages=t.spool_max_messages,
                          max_bytes=t.spool_max_bytes, max_age_s=t.spool_max_age_s,
                          metrics=self.metrics)
        except (OSError, sqlite3.Error) as exc:
            # A disk too full (or failing) to open the spool must not stop inference: keep a
            # bounded in-memory spool, say so loudly, and count it; the disk spool comes
            # back on the next start. The file on disk is left untouched.
            log.error("telemetry spool unavailable (%s); buffering in memory until restart", exc)
            self.metrics.inc("telemetry_spool_unavailable")
            spool = MemorySpool(max_messages=min(t.spool_max_messages, 10_000),
                                metrics=self.metrics, max_bytes=min(t.spool_max_bytes, 8 << 20))
        self.publisher = TelemetryPublisher(self.cfg.device_id, self.cfg.mqtt, spool,
                                            metrics=self.metrics).start()
        self.reporter = TelemetryReporter(self.publisher, interval=self.cfg.telemetry.interval_s,
                                          metrics=self.metrics, drift=self.drift,
                                          extra=self._extra_report).start()

    def _extra_report(self) -> dict[str, Any]:
        """Training state and ε from the privacy ledger; sample-store counts."""
        out = self._training_report()
        if self.store is not None:
            try:
                st = self.store.stats()
            except Exception as exc:  # a broken store must not stop telemetry
                log.warning("sample store stats unavailable: %s", exc)
                self.metrics.inc("data_stats_errors")
            else:
                refused = {k.removeprefix("data_labels_refused_"): int(v) for k, v in
                           self.metrics.snapshot()["counters"].items()
                           if k.startswith("data_labels_refused_")}
                out["samples"] = {"total": st["total"], "bytes": st["bytes"],
                                  "by_source": st["by_source"], "by_class": st["by_class"],
                                  "refused": refused}
        return out

    def _training_report(self) -> dict[str, Any]:
        """Training state and ε from the privacy ledger the SuperNode's ClientApp keeps;
        whether the agent serves or waits; a SuperNode that cannot run."""
        self.metrics.set("agent_state", "serving" if self.serving.active is not None
                         else "waiting_for_update")
        sn = self.supernode
        if sn is not None and sn.gave_up:
            if not self._supernode_down_reported and self.reporter is not None:
                self._supernode_down_reported = True
                log.error("flower-supernode keeps exiting: this device does not take part in "
                          "federated learning (see %s)", self.state_dir / "supernode.log")
                self.reporter.event("supernode_gave_up",
                                    message="flower-supernode keeps exiting; no federated "
                                            "learning on this device",
                                    log=str(self.state_dir / "supernode.log"))
            return {"training": {"state": "unavailable", "epsilon": None}}
        mark = self._hwm_path()  # ε from the ledger's high-water mark
        if mark is None or not mark.exists():
            return {}
        try:
            data = json.loads(mark.read_text())
        except (OSError, json.JSONDecodeError):
            self.metrics.inc("ledger_unreadable")
            return {}
        eps, budget = data.get("epsilon"), self.cfg.fl.privacy.budget
        if not isinstance(eps, int | float):
            return {}
        state = "budget_spent" if eps >= budget else "ready"
        return {"training": {"state": state, "epsilon": float(eps)}}

    def _hwm_path(self) -> Path | None:
        if not self.cfg.fl.enabled:
            return None
        return hwm_path(self._fl_state_dir() / LEDGER_FILE)

    def _fl_state_dir(self) -> Path:
        return self.cfg.fl_state_dir

    def _start_fallback(self) -> None:
        client = None
        if self.cfg.fallback.mode != "off":
            from edgefleet.device.inference.score_client import ScoreClient

            client = ScoreClient(self.cfg.mqtt, self.cfg.device_id, qos=self.cfg.fallback.qos,
                                 metrics=self.metrics).start()
            self._parts.append(client.close)
        self._score_client = client
        if self.serving.active is not None:
            self._hybrid_for(self.serving.active.manifest)

    def _hybrid_for(self, manifest: Manifest) -> HybridPredictor:
        """The cascade of the active model (a new one after a swap: its τ, labels, name)."""
        if self.hybrid is None or manifest is not self._hybrid_manifest:
            self._hybrid_manifest = manifest
            self.hybrid = HybridPredictor(self.view, self.cfg.fallback, self._score_client,
                                          metrics=self.metrics)
        return self.hybrid

    def _start_updates(self) -> None:
        from edgefleet.device.updates.listener import UpdateAgent

        assert self.updater is not None  # made by _start_model when updates are enabled
        director = None
        if self.cfg.updates.director_key is not None:
            from edgefleet.device.updates.director import DirectorTrust, load_public_key

            director = DirectorTrust(self.updater.state_dir, self.cfg.device_id,
                                     load_public_key(self.cfg.updates.director_key))
        agent = UpdateAgent(self.cfg.device_id, self.updater, self.cfg.mqtt,
                            groups=(self.cfg.group,), metrics=self.metrics, director=director)
        self._parts.append(agent.start().stop)

    def _start_input(self) -> None:
        from edgefleet.device.input.serial_reader import SerialReader

        assert self.cfg.input.serial is not None
        self.reader = SerialReader(self.cfg.input.serial, self._enqueue,
                                   baudrate=self.cfg.input.baudrate, metrics=self.metrics).start()
        t = threading.Thread(target=self._infer_loop, name="inference", daemon=True)
        t.start()
        self._threads.append(t)

    def _start_fl(self) -> None:
        fl = self.cfg.fl
        # The device's privacy policy, and a ledger that must exist (made at enrollment).
        node_cfg: dict[str, Any] = {"state-dir": str(self._fl_state_dir()), **fl.node_config,
                                    **fl.privacy.node_config(), "privacy-ledger-required": True}
        # The agent's SuperNode trains on its store and nothing else: always named (over
        # any node_config of agent.toml), so no ClientApp falls back to built-in data.
        node_cfg.update({"sample-store": str(self.cfg.store_path),
                         "min-samples": self.cfg.data.min_samples})
        if self.store is not None and self.store.stats()["encrypted"]:
            node_cfg["sample-key"] = str(self.cfg.store_key_path)
        # The package it serves (head fine-tuning of an imported model): the updater's
        # active slot, or the configured package.
        if self.updater is not None:
            node_cfg["model-package"] = str(self.updater.state_dir)
        elif self.cfg.model.package is not None:
            node_cfg["model-package"] = str(self.cfg.model.package)
        program = [_program(fl.supernode)]
        if fl.trusted_app_keys is not None:  # Flower's SuperNode + the fleet's app signature
            program = [sys.executable, "-m", "edgefleet.device.fl.supernode"]
        port = fl.runtime_port or _free_port()
        argv = [*program, "--superlink", fl.superlink,
                "--port", str(port), "--node-config",
                " ".join(f"{k}={json.dumps(v)}" for k, v in node_cfg.items())]
        if fl.insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(fl.root_certificates)]
        if fl.auth_private_key is not None:
            argv += ["--auth-supernode-private-key", str(fl.auth_private_key)]
        if fl.trusted_app_keys is not None:
            argv += ["--trusted-entities", str(fl.trusted_app_keys)]
        self._fl_state_dir().mkdir(parents=True, exist_ok=True)
        self.supernode = SupervisedProcess("supernode", argv,
                                           log_path=self.state_dir / "supernode.log",
                                           env={"FLWR_HOME": str(self._fl_state_dir()),
                                                "PATH": _child_path()},
                                           metrics=self.metrics).start()

    # -- serving ----------------------------------------------------------------------
    def _enqueue(self, frame: Frame) -> None:
        with self._queue_ready:
            if len(self._queue) == self._queue.maxlen:
                self.metrics.inc("input_queue_dropped")
            self._queue.append(frame)
            self._queue_ready.notify()

    def _next_frame(self) -> Frame | None:
        with self._queue_ready:
            while not self._queue and not self.stop_event.is_set():
                self._queue_ready.wait(0.5)
            return self._queue.popleft() if self._queue else None

    def _infer_loop(self) -> None:
        while not self.stop_event.is_set():
            frame = self._next_frame()
            if frame is None:
                continue
            try:
                self.answer_frame(frame)
            except InputError:
                pass  # counted by the validator
            except EdgefleetError as exc:
                log.warning("frame %d not answered: %s", frame.seq, exc)
                self.metrics.inc("inference_unavailable")
            except Exception:  # a bug must not stop the input loop
                log.exception("answering frame %d failed", frame.seq)
                self.metrics.inc("inference_internal_errors")

    def _input_for(self, manifest: Manifest) -> ModelInput:
        """How inputs become the active model's samples (new after a swap: its spec)."""
        if self._input is None or self._input.manifest is not manifest:
            self._input = ModelInput(manifest, hop=self.cfg.input.hop, metrics=self.metrics)
        return self._input

    def _active_manifest(self) -> Manifest:
        active = self.serving.active
        if active is None:
            self.metrics.inc("inference_no_model")
            raise EdgefleetError("no model yet: waiting for an update")
        return active.manifest

    def answer_frame(self, frame: Frame) -> Answer | None:
        """Turn one sensor frame into the model's input and answer it (a label frame
        labels earlier frames instead; a frame that completes no window: no answer)."""
        if frame.payload_type == PayloadType.LABEL:
            self._label_frame(frame)
            return None
        a: Answer | None = None
        shaping = self._input_for(self._active_manifest())
        # Decoded once. The raw sensor sample behind a built-in task's features; an
        # imported model's input is the raw sample itself.
        raw = frame.values()
        for x in shaping.frame(frame, raw):
            a = self.answer(x, raw if shaping.builtin else None)
            answer_id = self._answer_id(x, a, (frame.sensor_id, frame.seq))
            self.last_answers.append({"seq": frame.seq, "sensor": frame.sensor_id,
                                      "id": answer_id, **answer_to_dict(a)})
            self._keep_cloud_label(x, a)
        return a

    def answer(self, x: Any, raw: Any = None) -> Answer:
        """One sample through the cascade; records drift."""
        if not self._started:
            raise EdgefleetError("the agent is not started")
        manifest = self._active_manifest()
        a = self._hybrid_for(manifest).predict(x, raw)
        drift = self._drift_for(manifest)
        if drift is not None:
            drift.observe(x, a.local.confidence)
        return a

    def predict_batch(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """The local API's predict function: one answer per sample (shaped by the model's
        input spec), each with the ``id`` a later label can name."""
        out = []
        for row in self._input_for(self._active_manifest()).request(batch):
            a = self.answer(row)
            out.append({"id": self._answer_id(row, a),
                        **answer_to_dict(a)})
            self._keep_cloud_label(row, a)
        return out

    # -- shutdown ---------------------------------------------------------------------
    def request_stop(self, *_args: object) -> None:
        """Signal handler: begin a graceful stop."""
        self.stop_event.set()
        with self._queue_ready:
            self._queue_ready.notify_all()

    def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT, stop; returns the exit code (0)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        next_textfile = 0.0
        while not self.stop_event.wait(1.0):
            if self.revocation is not None:
                try:
                    self.revocation.check()
                except Exception:
                    log.exception("revocation check failed")
            if time.monotonic() >= next_textfile:
                next_textfile = time.monotonic() + self.cfg.metrics.interval_s
                self.write_metrics_textfile()
        self.stop()
        self.write_metrics_textfile()
        return 0

    def write_metrics_textfile(self) -> None:
        """The counters as ``[metrics] textfile`` (if set); a failure is counted only."""
        path = self.cfg.metrics.textfile
        if path is None:
            return
        try:
            write_textfile(path, self.metrics)
        except OSError as exc:
            self.metrics.inc("metrics_textfile_errors")
            log.warning("cannot write the metrics textfile %s: %s", path, exc)

    def stop(self, drain_s: float = 3.0) -> None:
        """Stop taking input, finish in-flight work, flush telemetry, stop the children."""
        self.stop_event.set()
        if self.reader is not None:
            self.reader.stop()
        for t in self._threads:
            t.join(5)
        if self.api is not None:
            self.api.stop()
        if self.supernode is not None:
            self.supernode.stop()
        for stop_part in reversed(self._parts):
            with contextlib.suppress(Exception):
                stop_part()
        if self.reporter is not None:
            with contextlib.suppress(Exception):
                self.reporter.report()
            self.reporter.stop()
        if self.publisher is not None:
            self.publisher.drain(drain_s)
            self.publisher.stop()
        if self.store is not None:
            self.store.close()
        log.info("agent %s stopped", self.cfg.device_id)
