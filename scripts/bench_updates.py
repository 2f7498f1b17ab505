"""Benchmark signed model updates: time per stage, and inference latency while updating.

A loopback registry serves a digits package under several versions; one device applies
them one after another while a thread keeps asking it for predictions. Reports the
median time of each update stage and inference p50/p99 idle vs during updates, side by
side in one run, and the number of failed inferences (must be 0). The TUF refresh and
download are also timed over HTTPS (a fleet-CA certificate, ``registry serve --tls-cert``'s
server) interleaved with plain HTTP, for the cost of TLS.

    .venv/bin/python scripts/bench_updates.py [--package out/digits] [--updates 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_common import md_table, write_section

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.inference.serving import ServingModel
from edgefleet.device.runtime.manifest import MANIFEST_NAME, file_sha256
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.updates.installer import Updater
from edgefleet.device.updates.sandbox import trial_load
from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.device.wire.updates import Assignment, target_path
from edgefleet.server.fleet.keys import ROLES, KeyRing
from edgefleet.server.fleet.pki import init_certs, issue_server_cert
from edgefleet.server.registry.http import RegistryServer, server_tls_context
from edgefleet.server.registry.repository import Registry


def _version(src: Path, dest: Path, version: str) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / MANIFEST_NAME).read_text())
    m["version"] = version
    for rel in m["files"]:
        m["files"][rel] = {"sha256": file_sha256(dest / rel), "size": (dest / rel).stat().st_size}
    (dest / MANIFEST_NAME).write_text(json.dumps(m))
    return dest


class _Traffic:
    def __init__(self, serving: ServingModel, x: np.ndarray) -> None:
        self.serving, self.x = serving, x
        self.lat: list[float] = []
        self.failed = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.serving.predict(self.x)
                self.lat.append((time.perf_counter() - t0) * 1e3)
            except Exception:
                self.failed += 1
            time.sleep(0.001)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", type=Path, help="digits package (default: build ONNX-only)")
    ap.add_argument("--updates", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-updates-"))
    try:
        src = args.package
        if src is None:
            from edgefleet.models.build.pipeline import BuildOptions, build_package

            src = tmp / "digits"
            build_package(BuildOptions(task="digits", out=src, formats="onnx", seed=0))
        keys = KeyRing(tmp / "reg" / "keys")
        for role in ROLES:
            keys.generate(role)
        reg = Registry(tmp / "reg", keys)
        reg.init_repo()
        versions = [f"1.{i}.0" for i in range(args.updates + 1)]
        push_s = []
        for v in versions:
            pkg = _version(src, tmp / "p" / v, v)
            t0 = time.perf_counter()
            reg.push(pkg)
            push_s.append(time.perf_counter() - t0)
        srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
        cfg = TufClientConfig(f"{srv.url}/metadata/", f"{srv.url}/targets/")
        state = tmp / "dev"
        tuf = TufClient(state, cfg, reg.repo.root_bytes())
        serving = ServingModel(Metrics())
        upd = Updater(state, tuf, serving, metrics=Metrics())
        upd.start()
        upd.apply(Assignment("digits-mlp", versions[0]))
        x = np.asarray(json.loads((src / MANIFEST_NAME).read_text())["golden"][0]["input"],
                       dtype=np.float32)

        idle = _Traffic(serving, x)
        idle.t.start()
        time.sleep(3.0)
        idle.stop.set()
        idle.t.join()

        busy = _Traffic(serving, x)
        busy.t.start()
        apply_s: list[float] = []
        for v in versions[1:]:
            t0 = time.perf_counter()
            upd.apply(Assignment("digits-mlp", v))
            apply_s.append(time.perf_counter() - t0)
        busy.stop.set()
        busy.t.join()

        # The stages on their own (same machine, same run); transfer over HTTP and HTTPS
        # interleaved, each client keeping its connections alive as a device does.
        certs = init_certs(tmp / "certs")
        cert, key = issue_server_cert(certs.ca.parent, "registry", ["127.0.0.1"])
        tls_srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts,
                                 tls=server_tls_context(cert, key)).start()
        tls_tuf = TufClient(tmp / "dev-tls", TufClientConfig(
            f"{tls_srv.url}/metadata/", f"{tls_srv.url}/targets/", ca_file=certs.ca),
            reg.repo.root_bytes())
        stage: dict[str, list[float]] = {k: [] for k in ("refresh", "download", "trial", "load",
                                                         "refresh_tls", "download_tls")}
        for v in versions[1:]:
            for client, sfx in ((tuf, ""), (tls_tuf, "_tls")):
                t0 = time.perf_counter()
                client.refresh(target_path("digits-mlp", v))
                stage["refresh" + sfx].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.fetch(target_path("digits-mlp", v), tmp / "dl.tar")
                stage["download" + sfx].append(time.perf_counter() - t0)
                (tmp / "dl.tar").unlink()
            t0 = time.perf_counter()
            trial_load(tmp / "p" / v, ["onnx-int8"])
            stage["trial"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Predictor.load(tmp / "p" / v, variant="onnx-int8", threads=1, metrics=Metrics())
            stage["load"].append(time.perf_counter() - t0)
        srv.stop()
        tls_srv.stop()

        med = statistics.median
        size = (reg.artifacts / reg.list()[0].sha256).stat().st_size
        rows = [
            ["registry push (verify, pack, sign)", f"{med(push_s) * 1e3:.0f}"],
            ["TUF refresh (metadata only)", f"{med(stage['refresh']) * 1e3:.0f}"],
            [f"TUF refresh + verified download ({size // 1024} KiB)",
             f"{med(stage['download']) * 1e3:.0f}"],
            ["sandboxed trial load (subprocess, rlimits)", f"{med(stage['trial']) * 1e3:.0f}"],
            ["in-process load (sha256 + golden + warm-up)", f"{med(stage['load']) * 1e3:.0f}"],
            ["whole update (apply: all of the above + slot write + health)",
             f"{med(apply_s) * 1e3:.0f}"],
        ]
        lat = md_table(["inference (ServingModel.predict)", "idle", "during updates", "ratio"], [
            ["p50 ms", f"{_pct(idle.lat, 50):.3f}", f"{_pct(busy.lat, 50):.3f}",
             f"{_pct(busy.lat, 50) / _pct(idle.lat, 50):.2f}"],
            ["p99 ms", f"{_pct(idle.lat, 99):.3f}", f"{_pct(busy.lat, 99):.3f}",
             f"{_pct(busy.lat, 99) / _pct(idle.lat, 99):.2f}"],
            ["inferences", len(idle.lat), len(busy.lat), ""],
            ["failed inferences", idle.failed, busy.failed, ""],
        ])
        tls = md_table(["transfer (median ms)", "HTTP", "HTTPS", "ratio"], [
            [name, f"{med(stage[k]) * 1e3:.1f}", f"{med(stage[k + '_tls']) * 1e3:.1f}",
             f"{med(stage[k + '_tls']) / med(stage[k]):.2f}"]
            for name, k in (("TUF refresh (metadata only)", "refresh"),
                            (f"TUF refresh + verified download ({size // 1024} KiB)",
                             "download"))])
        body = (f"{args.updates} updates of the digits package (onnx-int8) from a loopback "
                "registry; median of each stage.\n\n"
                + md_table(["stage", "median ms"], rows) + "\n\n" + lat + "\n\n"
                "Plain HTTP vs HTTPS (TLS 1.2+, EC P-384 certificate from the fleet CA), the "
                "same requests interleaved; each client keeps its connections alive.\n\n"
                + tls + "\n\n"
                "Command: `.venv/bin/python scripts/bench_updates.py`\n")
        path = write_section("updates", "Signed model updates", body)
        print(path.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
