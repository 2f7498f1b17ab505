"""``agent.toml``: everything one device agent is told, validated once at start.

Sections mirror the agent's parts. Unknown keys are errors naming the key and the file
(a typo must not silently turn a feature off), and cross-field rules catch setups that
cannot work (node authentication without TLS, updates without a trusted root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgefleet.device.core.config import StrictModel, load_config, registry_is_https
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.inference.cascade import FallbackConfig
from edgefleet.device.privacy.policy import INSECURE_SEED_KEY, PrivacyPolicy
from edgefleet.device.runtime.backends import DEFAULT_THREADS
from edgefleet.device.telemetry.spool import DEFAULT_MAX_BYTES
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN

LabelSource = Literal["api", "serial", "scorer", "import"]
#: File name (in ``<state_dir>/keys``) of the sample-store key made at enrollment.
STORE_KEY = "sample-store.key"

__all__ = [
    "STORE_KEY",
    "AgentConfig",
    "ApiSection",
    "DataSection",
    "FlSection",
    "InputSection",
    "LogsSection",
    "ModelSection",
    "TelemetrySection",
    "UpdatesSection",
    "load_agent_config",
]


class ModelSection(StrictModel):
    """The model to serve before any signed update has been activated."""

    package: Path | None = Field(default=None, description="Bootstrap model package folder.")
    variant: str | None = Field(default=None,
                                description="Variant to run (default: the manifest's).")
    threads: int = Field(default=DEFAULT_THREADS, ge=1, le=64, description="Inference threads.")


class InputSection(StrictModel):
    """Sensor input: a serial port or pyserial URL; unset means local API only."""

    serial: str | None = Field(default=None,
                               description="tty path or pyserial URL (socket://...).")
    baudrate: int = Field(default=115200, ge=300)
    queue_size: int = Field(default=256, ge=1, le=100_000,
                            description="Frames waiting for inference; oldest dropped.")
    hop: int | None = Field(default=None, ge=1,
                            description="Models that take windows (layout NWC): samples "
                                        "between windows, at most the window length "
                                        "(larger counts as it); default the window length.")


class ApiSection(StrictModel):
    """The local predict API (a Unix socket)."""

    socket: Path | None = Field(default=None, description="Default: <state_dir>/agent.sock.")
    enabled: bool = True


class TelemetrySection(StrictModel):
    """Telemetry over MQTT with the on-disk spool."""

    enabled: bool = True
    interval_s: float = Field(default=10.0, gt=0)
    spool_max_messages: int = Field(default=50_000, ge=100)
    spool_max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024 * 1024,
                                 description="Cap on spooled topic + payload bytes; oldest "
                                             "dropped (SQLite overhead and a 4 MiB disk "
                                             "reserve come on top).")
    spool_max_age_s: float | None = Field(default=None, gt=0,
                                          description="Drop spooled messages older than "
                                                      "this (default: no age limit).")
    drift_window: int = Field(default=500, ge=10)


class UpdatesSection(StrictModel):
    """Signed model updates through TUF."""

    enabled: bool = False
    metadata_url: str = ""
    targets_url: str = ""
    trusted_root: Path | None = Field(default=None, description="The pinned TUF root.json.")
    ca_file: Path | None = Field(
        default=None, description="PEM CA that signed the registry's HTTPS certificate "
                                  "(the fleet CA; default: the system's trust store).")
    fleet_key: Path | None = Field(
        default=None, description="The fleet's package-encryption key (0600, from the "
                                  "enrollment bundle): decrypts encrypted model packages.")
    require_encryption: bool = Field(
        default=False, description="Refuse model packages that are not encrypted for the "
                                   "fleet key (reason encryption_required).")
    client_cert: Path | None = Field(
        default=None, description="This device's client certificate (PEM, from its "
                                  "enrollment bundle), for a registry that requires one.")
    client_key: Path | None = Field(default=None, description="The key of client_cert.")
    director_key: Path | None = Field(
        default=None, description="The director's public key pinned at enrollment: "
                                  "only assignments it signed for this device are followed.")

    @model_validator(mode="after")
    def _one_scheme(self) -> UpdatesSection:
        https = registry_is_https(self.metadata_url, self.targets_url)
        if self.ca_file is not None and not https:
            raise ValueError("ca_file is set but the registry URLs are not https://")
        if self.require_encryption and self.fleet_key is None:
            raise ValueError("require_encryption needs fleet_key (the key to decrypt with)")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.client_cert is not None and not https:
            raise ValueError("client_cert is set but the registry URLs are not https://")
        return self


class FlSection(StrictModel):
    """Federated learning: the agent runs and watches ``flower-supernode``.

    ``privacy`` is the device's privacy policy (written at enrollment): the SuperNode gets
    it as ``privacy-*`` node-config keys, which ``node_config`` may not set itself; nor
    may it set the insecure reproducible-noise seed (benchmarks and tests only).
    """

    enabled: bool = False
    superlink: str = "127.0.0.1:9092"
    insecure: bool = False
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    node_config: dict[str, str | int | float] = Field(default_factory=dict)
    runtime_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="SuperNode's local runtime API port (default: a free port at start, so "
                    "several agents share a host).")
    supernode: str = Field(default="flower-supernode", description="Program to run.")
    trusted_app_keys: Path | None = Field(
        default=None, description="Flower trusted-entities YAML (the enrollment bundle's "
        "app-trust.yaml): the SuperNode runs only Flower apps signed by these keys.")
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy,
                                   description="What this device accepts, whatever the "
                                               "server asks (edgefleet.device.privacy.policy).")

    @model_validator(mode="after")
    def _device_owns_its_privacy(self) -> FlSection:
        if INSECURE_SEED_KEY in self.node_config:
            raise ValueError(f"fl.node_config sets {INSECURE_SEED_KEY!r}: reproducible DP noise "
                             "is for benchmarks and tests only (anyone knowing the seed can "
                             "remove the noise); an enrolled device never uses it")
        own = sorted(k for k in self.node_config if k.startswith("privacy-"))
        if own:
            raise ValueError(f"fl.node_config sets {', '.join(own)}: the privacy policy goes "
                             "in [fl.privacy]")
        return self

    @model_validator(mode="after")
    def _tls_for_auth(self) -> FlSection:
        if self.enabled and not self.insecure and self.root_certificates is None:
            raise ValueError("fl needs root_certificates unless insecure = true")
        if self.enabled and self.insecure and self.auth_private_key is not None:
            raise ValueError("SuperNode authentication (auth_private_key) requires TLS")
        return self


class DataSection(StrictModel):
    """The local sample store (docs/device-data.md): what the device keeps to train on."""

    enabled: bool = True
    path: Path | None = Field(default=None, description="Default: <state_dir>/data/"
                                                        "samples.db.")
    max_samples: int = Field(default=10_000, ge=1, le=10_000_000)
    max_bytes: int = Field(default=32 << 20, ge=1024)
    max_age_days: float | None = Field(default=None, gt=0,
                                       description="Drop samples older than this.")
    label_sources: list[LabelSource] = Field(
        default_factory=lambda: list[LabelSource](["api", "serial", "import"]),
        description="Where labels may come from; 'scorer' also needs cloud_labels.")
    cloud_labels: bool = Field(default=False, description="Keep the scorer's answers to "
                               "escalated samples as labels (source 'scorer').")
    cloud_min_confidence: float = Field(default=0.9, ge=0, le=1,
                                        description="Scorer answers below this are not kept.")
    min_samples: int = Field(default=20, ge=2, description="Fewer stored samples: the "
                             "device declines a training round (reason 'few samples').")
    encrypt: bool = Field(default=True, description="Seal inputs with the key made at "
                          "enrollment (keys/sample-store.key) when it exists.")
    remember_answers: int = Field(default=4096, ge=1, le=1_000_000,
                                  description="Recent answers that can still be labelled.")
    wipe_on_revoke: bool = Field(default=True, description="Wipe the store when the broker "
                                 "refuses the credentials it accepted before.")


class LogsSection(StrictModel):
    """Remote logs (``edgefleet devices logs``, docs/operations.md "Device logs"): the recent
    records kept in memory, redacted, and how often the operator may ask for them."""

    enabled: bool = True
    max_records: int = Field(default=2000, ge=10, le=100_000,
                             description="Records kept in memory; oldest dropped.")
    max_bytes: int = Field(default=1 << 20, ge=4096, le=64 << 20,
                           description="Bytes of records kept in memory; oldest dropped.")
    rate: float = Field(default=1.0, gt=0, le=100, description="Requests a second.")
    burst: int = Field(default=3, ge=1, le=100, description="Requests at once.")
    max_follows: int = Field(default=2, ge=1, le=16, description="Follows at once.")


class MetricsSection(StrictModel):
    """The agent's counters for Prometheus, as a node-exporter textfile: no listening
    port and no metrics library on the device (docs/operations.md)."""

    textfile: Path | None = Field(default=None, description=(
        "Write the counters here in Prometheus' text format, atomically, every interval_s "
        "(node-exporter's textfile collector reads *.prom in its folder). Default: off."))
    interval_s: float = Field(default=15.0, ge=1.0, le=3600.0)


class AgentConfig(StrictModel):
    """The whole ``agent.toml``."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    group: str = Field(default="default", pattern=DEVICE_ID_PATTERN)
    state_dir: Path = Field(default=Path("/var/lib/edgefleet"),
                            description="Slots, spool, ledger and keys live here.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    input: InputSection = Field(default_factory=InputSection)
    api: ApiSection = Field(default_factory=ApiSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    updates: UpdatesSection = Field(default_factory=UpdatesSection)
    fl: FlSection = Field(default_factory=FlSection)
    data: DataSection = Field(default_factory=DataSection)
    logs: LogsSection = Field(default_factory=LogsSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)

    @model_validator(mode="after")
    def _something_to_serve(self) -> AgentConfig:
        if self.model.package is None and not self.updates.enabled:
            raise ValueError("set model.package, or enable updates to receive a model")
        if self.updates.enabled and (self.updates.trusted_root is None
                                     or not self.updates.metadata_url):
            raise ValueError("updates need metadata_url and trusted_root")
        return self

    @property
    def fl_state_dir(self) -> Path:
        """The SuperNode's state folder: privacy ledger, σ cache (``FLWR_HOME``)."""
        return Path(str(self.fl.node_config.get("state-dir", self.state_dir / "fl")))

    @property
    def socket_path(self) -> Path:
        """Where the local API listens."""
        return self.api.socket or self.state_dir / "agent.sock"

    @property
    def store_path(self) -> Path:
        """The local sample store."""
        return self.data.path or self.state_dir / "data" / "samples.db"

    @property
    def store_key_path(self) -> Path:
        """The sample-store key made at enrollment."""
        return self.state_dir / "keys" / STORE_KEY


def load_agent_config(*files: Path | str) -> AgentConfig:
    """Read and validate ``agent.toml`` (later files override earlier ones)."""
    return load_config(AgentConfig, files)
