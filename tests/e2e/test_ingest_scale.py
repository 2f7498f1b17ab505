"""Two ingest workers on PostgreSQL, driven by `edgefleet loadgen`'s virtual devices,
through a broker restart and a SIGKILLed worker: nothing lost, nothing stored twice.

Every part is real: the fleet home enrolls the devices (broker accounts and ACL), the
broker is mosquitto with persistence on the home's files, the workers are `edgefleet
ingest run --worker I/2` processes, the store is a PostgreSQL server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker, free_port
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.telemetry.ingest import partition_of
from edgefleet.server.telemetry.loadgen import (
    LoadConfig,
    LoadReport,
    enroll_devices,
    run_load,
    settle_store,
)
from edgefleet.server.telemetry.store import open_store
from tests.conftest import BIN, run_cli
from tests.support.postgres import postgres_server
from tests.support.telemetry import as_root_extra, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.fault]

DEVICES = 20
PER_DEVICE = 120  # 2,400 messages at 400/s: six seconds of load


def _home(tmp: Path, dsn: str) -> FleetHome:
    return FleetHome.create(tmp / "home", broker_host="127.0.0.1", broker_port=free_port(),
                            server={"broker_local_port": free_port(), "store": dsn})


def _broker(home: FleetHome, workdir: Path) -> MosquittoBroker:
    """Devices on the home's broker port, services on its loopback port; persistence on."""
    files = home.broker_files()
    return MosquittoBroker(workdir, BrokerConfig(
        port=home.settings.broker_port, allow_anonymous=False, persistence=True,
        password_file=files.password_file, acl_file=files.acl_file,
        extra=[*as_root_extra(),
               f"listener {home.settings.server.broker_local_port} 127.0.0.1"])).start()


def _worker(home: FleetHome, i: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "edgefleet"), "ingest", "run", "--worker", f"{i}/2", "--json"],
        env={**os.environ, "EDGEFLEET_HOME": str(home.root)}, text=True,
        stdout=log.open("a"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(240)
def test_two_workers_lose_nothing_across_broker_restart_and_sigkill(tmp_path: Path) -> None:
    with postgres_server() as dsn:
        home = _home(tmp_path, dsn)
        fleet = enroll_devices(home, DEVICES, "e2e-")
        assert {partition_of(d.name, 2) for d in fleet} == {0, 1}
        broker = _broker(home, tmp_path / "broker")
        logs = [tmp_path / f"worker{i}.log" for i in (0, 1)]
        workers = [_worker(home, i, logs[i]) for i in (0, 1)]
        store = open_store(dsn)
        try:
            # A worker's session exists from its first subscription on: wait until a
            # message of every device (both partitions) is stored.
            def warm_up() -> bool:
                warm = run_load(fleet, LoadConfig("127.0.0.1", home.settings.broker_port,
                                                  messages=1, rate=100), processes=1)
                return settle_store(store, warm, 3).lost == 0

            assert wait_until(warm_up, 60, every=0.5), "the workers did not start"
            before = store.message_stats()["rows"]

            cfg = LoadConfig("127.0.0.1", home.settings.broker_port, messages=PER_DEVICE,
                             rate=400)
            box: dict[str, LoadReport] = {}
            load = threading.Thread(target=lambda: box.update(r=run_load(fleet, cfg,
                                                                         processes=2)))
            load.start()
            assert wait_until(lambda: store.message_stats()["rows"] >= before + 300, 60)
            workers[1].send_signal(signal.SIGKILL)  # its devices queue at the broker
            workers[1].wait(10)
            time.sleep(0.8)
            broker.stop()  # SIGTERM: sessions and queues go to the persistence file
            time.sleep(0.5)
            broker.start()
            time.sleep(0.8)
            workers[1] = _worker(home, 1, logs[1])  # same session: gets its queue
            load.join(180)
            report = box["r"]
            settle_store(store, report, 90)
            totals = report.totals()
            assert report.sent == DEVICES * PER_DEVICE, totals
            assert report.unacked == 0 and report.refused == 0, totals
            assert report.lost == 0 and report.duplicated == 0, totals
            assert report.stored == report.sent, totals
            # every message had a subscriber: the restarted broker restored both sessions
            assert report.no_subscribers == 0, totals
            assert report.connects > DEVICES, totals  # the restart really cut them off
            stats = store.message_stats()
            assert stats["rows"] == stats["distinct"] == before + DEVICES * PER_DEVICE
        finally:
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    w.kill()
            store.close()
            broker.kill()
        out = logs[0].read_text()
        assert '"workers": 2' in out and '"worker": 0' in out, out[-2000:]


def test_loadgen_cli_reports_a_clean_run(tmp_path: Path) -> None:
    home = FleetHome.create(tmp_path / "home", broker_host="127.0.0.1",
                            broker_port=free_port(),
                            server={"broker_local_port": free_port()})
    env = {"EDGEFLEET_HOME": str(home.root)}
    enroll_devices(home, 6, "cli-")  # enrolled before the broker reads its files
    broker = _broker(home, tmp_path / "broker")
    ingest = subprocess.Popen([str(BIN / "edgefleet"), "ingest", "run"],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        res = run_cli("loadgen", "-n", "6", "--prefix", "cli-", "--rate", "60",
                      "--duration", "2", "--json", env=env)
        assert res.returncode == 0, res.stderr
        import json

        rep = json.loads(res.stdout)
        assert rep["sent"] == rep["acked"] == rep["stored"] == 6 * 20, rep
        assert (rep["lost"], rep["duplicated"], rep["no_subscribers"]) == (0, 0, 0), rep
        # the same devices (bundles reused) with no broker reload needed; a new one is
        # enrolled but unknown to the broker until it reloads: the run says why it stops
        res = run_cli("loadgen", "-n", "7", "--prefix", "cli-", "--per-device", "1",
                      "--connect-timeout", "3", env=env)
        assert res.returncode == 1
        assert "did not connect" in res.stderr and "reload the broker" in res.stderr
        assert home.devices.get("cli-00006") is not None
    finally:
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(20)
        broker.kill()
