"""``edgefleet train``: federated training with differential privacy on Flower."""

from __future__ import annotations

import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["describe_declines", "embedded_policy", "fine_tuned_lines", "train"]


def _sigterm_as_interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def embedded_policy(dp: str, epsilon: float) -> dict[str, Any]:
    """Node config of the embedded simulated devices: a policy admitting this run."""
    return {"privacy-min-mode": dp, "privacy-max-run-epsilon": max(5.0, epsilon),
            "privacy-budget": max(10.0, epsilon)}


_REASON_TEXT = {"budget": "privacy budget spent", "policy": "outside the device's privacy "
                "policy", "ledger": "privacy ledger missing or rolled back"}


def describe_declines(declines: dict[str, int]) -> str:
    """``3 × outside the device's privacy policy, 1 × privacy budget spent``."""
    return ", ".join(f"{n} × {_REASON_TEXT.get(why, why)}"
                     for why, n in sorted(declines.items(), key=lambda kv: -kv[1]))


def train(
    task: str = typer.Option("digits", help="Task whose partitions the devices hold."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
    dp: str = typer.Option("sample", "--dp",
                           help="sample: DP-SGD on each device (per-record ε); client: Flower's "
                                "client-level DP (per-device ε); off: no DP."),
    epsilon: float = typer.Option(3.0, "--epsilon", min=0.001, help="Target ε for this run."),
    delta: float = typer.Option(1e-5, "--delta", min=1e-12, max=0.1, help="δ of the guarantee."),
    devices: int = typer.Option(5, "--devices", min=1, help="SuperNodes (embedded) or expected."),
    simulate: int = typer.Option(0, "--simulate", min=0, metavar="N",
                                 help="Run N virtual devices on Flower's simulation runtime "
                                      "(Ray) instead of SuperNode processes; sample per "
                                      "round with --fraction / --min-nodes."),
    ray_address: str = typer.Option("", "--ray-address", envvar="RAY_ADDRESS",
                                    help="--simulate on a running Ray cluster (`ray start "
                                         "--head`'s address, e.g. 10.0.0.5:6379) instead of "
                                         "a local Ray."),
    ray_cpus: int = typer.Option(0, "--ray-cpus", min=0,
                                 help="--simulate: CPUs of the local Ray, one ClientApp per "
                                      "CPU (0: all cores)."),
    data_shares: int = typer.Option(0, "--data-shares", min=0,
                                    help="--simulate: distinct Dirichlet shares of the task; "
                                         "device i holds share i mod S (0: N, at most 100)."),
    superlink: str | None = typer.Option(
        None, "--superlink", help="host:port of a running SuperLink (default: the fleet "
        "home's; without a home, an embedded SuperLink and --devices SuperNodes)."),
    embedded: bool = typer.Option(False, "--embedded", help="Run an embedded SuperLink and "
                                  "--devices simulated SuperNodes even when a fleet home "
                                  "names a SuperLink."),
    head_of: Path | None = typer.Option(
        None, "--head-of", help="An imported model's package folder (models import): the "
        "devices fine-tune its head on their stored samples' backbone embeddings and the "
        "result is its next version (docs/bring-your-own-model.md)."),
    base: str | None = typer.Option(
        None, "--base", help="MODEL or MODEL@VERSION in the registry this run improves: the "
        "result is packaged as its next version (lineage parent), to canary as an upgrade."),
    registry: Path | None = typer.Option(None, "--registry", envvar="EDGEFLEET_REGISTRY",
                                         help="Registry of --base (default: the fleet "
                                              "home's)."),
    home: Path | None = typer.Option(None, "--home", envvar="EDGEFLEET_HOME",
                                     help="Fleet home: its SuperLink, CA, registry, run "
                                          "folder (<home>/fl) and the key that signs the "
                                          "Flower app."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates",
                                                  help="CA of a remote SuperLink's TLS cert."),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Embedded run without TLS and node authentication."),
    strategy: str = typer.Option("fedavg", "--strategy",
                                 help="fedavg, fedprox, fedadam, or the poisoning-robust "
                                      "trimmed (trimmed mean) and median (coordinate-wise)."),
    trim_beta: float = typer.Option(0.2, "--trim-beta", min=0.0, max=0.49,
                                    help="trimmed: share cut from each tail per coordinate."),
    norm_bound: float = typer.Option(0.0, "--norm-bound", min=0.0,
                                     help="Clip each device's update to this L2 norm before "
                                          "aggregation (0: off)."),
    fraction: float = typer.Option(1.0, "--fraction", min=0.01, max=1.0,
                                   help="Share of connected devices sampled per round."),
    min_nodes: int = typer.Option(0, "--min-nodes", min=0,
                                  help="Devices needed per round (0: all of --devices)."),
    local_steps: int = typer.Option(5, "--local-steps", min=1,
                                    help="Local steps per round (few, large steps suit DP)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="(Expected) batch size."),
    lr: float = typer.Option(0.1, "--lr", min=1e-6, help="Local learning rate."),
    clip: float = typer.Option(1.0, "--clip", min=1e-6, help="Per-example clip (sample DP)."),
    update_clip: float = typer.Option(1.0, "--update-clip", min=1e-6,
                                      help="Model-update clip (client DP)."),
    pretrain_epochs: int = typer.Option(40, "--pretrain-epochs", min=0,
                                        help="Pretrain on the public (calibration) split "
                                             "before round 1; 0: start from random weights."),
    round_timeout: float = typer.Option(120.0, "--round-timeout", min=1.0,
                                        help="Seconds to wait for replies in a round."),
    seed: int = typer.Option(-1, "--seed", help="Seed of the initial model and pretraining (-1: "
                                                "0). Devices' DP noise never uses it: it "
                                                "comes from each device's OS entropy."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Model package folder [default: out/<task>-fl]."),
    fmt: str = typer.Option("all", "--format", help="Package formats: onnx, tflite or all."),
    work: Path | None = typer.Option(None, "--work-dir",
                                     help="Certificates, logs, node state and the run "
                                          "database (default: <home>/fl, else .edgefleet/fl)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Train a model across devices with Flower and package the result.

    Examples:

      edgefleet train --task digits --rounds 5 --epsilon 3          (embedded, TLS + node auth)

      edgefleet train --rounds 3 --dp client --devices 10 --json

      edgefleet train --strategy trimmed --norm-bound 3 --dp off     (poisoning-robust)

      edgefleet train --superlink 10.0.0.2:8000 --root-certificates ca.pem --devices 20

      edgefleet train --base digits-mlp --devices 2 --rounds 3   (the fleet home's SuperLink;
      the result is the next version of digits-mlp)

      edgefleet train --simulate 1000 --fraction 0.1 --rounds 3   (1,000 virtual devices on
      Flower's simulation runtime, 100 per round; add --ray-address for a Ray cluster)

    Each device decides its privacy (its policy, set at enrollment): a round it refuses
    (budget spent, request outside its policy, ledger it cannot trust) is counted as
    declined, by reason. The embedded simulated devices get a policy admitting the mode
    and ε asked for here (they stand in for devices whose policy you set).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.cli.home_opts import fleet_home
    from edgefleet.server.fl.runner import (
        EmbeddedFederation,
        check_settings,
        follow_run,
        submit_run,
    )
    from edgefleet.server.fl.settings import run_settings
    from edgefleet.server.fl.simulation import DEFAULT_SHARES
    from edgefleet.server.fl.store import FlStore, RoundRow, declines_by_reason
    from edgefleet.server.fleet.app_signing import fleet_key
    from edgefleet.server.fleet.home import default_root
    from edgefleet.server.fleet.superlink import FlRunError, SuperLinkConn

    if dp not in ("sample", "client", "off"):
        raise UsageError(f"--dp must be sample, client or off, not {dp!r}")
    if simulate and (superlink or embedded):
        raise UsageError("--simulate runs its own virtual devices: drop --superlink/--embedded")
    if simulate:
        devices = simulate
        # A run at fleet size samples: the default minimum is the sample, not the fleet.
        min_nodes = min_nodes or max(1, int(simulate * fraction))
    fh = fleet_home(home)
    if (superlink is None and not embedded and not simulate and fh is not None
            and fh.settings.superlink):
        superlink = fh.settings.superlink_control or fh.settings.superlink
        root_certificates = root_certificates or fh.settings.superlink_ca
    if embedded:
        superlink = None
    work = (work or (fh.fl_dir if fh is not None else Path(".edgefleet/fl"))).resolve()
    parent = _base(base, registry, home, task, work) if base else None
    tag = uuid.uuid4().hex[:12]
    settings = run_settings({
        "tag": tag, "task": task, "num-rounds": rounds, "strategy": strategy,
        "trim-beta": trim_beta, "norm-bound": norm_bound,
        "fraction": fraction, "min-nodes": min_nodes or devices, "num-nodes": devices,
        "dp": dp, "epsilon": epsilon, "delta": delta, "clip": clip, "update-clip": update_clip,
        "local-steps": local_steps, "batch-size": batch_size, "lr": lr, "seed": seed,
        "pretrain-epochs": pretrain_epochs, "round-timeout": round_timeout,
        "initial-params": str(parent[2]) if parent else "",
        "package": str(head_of.resolve()) if head_of else "",
        "db": str(work / "fl.db"), "out": str((out or Path("out") / f"{task}-fl").resolve()),
        "formats": fmt})
    check_settings(settings)
    store = FlStore(work / "fl.db")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    rows: list[RoundRow] = []
    with Progress(TextColumn("[bold]round"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=console, disable=json_out) as bar:
        tid = bar.add_task("starting", total=rounds)

        def on_round(r: RoundRow) -> None:
            rows.append(r)
            eps = "" if r.epsilon is None else f"  ε={r.epsilon:.3f}"
            dec = f"  declined {r.declined}" if r.declined else ""
            bar.update(tid, completed=r.round, description=(
                f"accuracy {r.accuracy:.3f}  loss {r.loss:.3f}  nodes {r.nodes}{dec}{eps}"))

        if simulate:
            run_id = _simulate(settings, simulate, work, dp, epsilon, task, store, on_round,
                               ray_address=ray_address, ray_cpus=ray_cpus,
                               shares=data_shares or min(simulate, DEFAULT_SHARES))
            run = store.run(tag)
            if run is None or run.status != "finished":
                raise FlRunError(f"run {tag} did not finish: {run.error if run else 'no record'}")
        elif superlink:
            conn = SuperLinkConn(superlink, work / "cli", root_certificates)
            run_id = submit_run(conn, settings, work, signing_key=fleet_key(
                home or default_root()))
            run = follow_run(store, tag, conn, run_id, on_round)
        else:
            with EmbeddedFederation(work / "embedded", devices=devices, secure=not insecure,
                                    node_config=lambda _i: {
                                        **embedded_policy(dp, epsilon), "task": task}) as fed:
                bar.update(tid, description="submitting run")
                run_id = submit_run(fed.conn, settings, work, signing_key=fed.app_key)
                run = follow_run(store, tag, fed.conn, run_id, on_round)
    final = run.final or {}
    if parent is not None and final.get("package"):
        final["package"] = _as_next_version(Path(final["package"]), parent[:2])
    result = {
        "run": tag, "flower_run_id": run_id,
        "rounds": [{"round": r.round, "accuracy": r.accuracy, "loss": r.loss, "nodes": r.nodes,
                    "declined": r.declined, "declines": r.declines or {}, "failed": r.failed,
                    "epsilon": r.epsilon}
                   for r in store.rounds(tag) if r.round > 0],
        "final": {"accuracy": final.get("accuracy"), "epsilon": final.get("epsilon"),
                  "delta": final.get("delta")},
        "declines": declines_by_reason(store.rounds(tag)),
        "devices": final.get("devices", []),
        "device_accuracy": final.get("device_accuracy"),
        "package": final.get("package"),
        **({"parent": f"{parent[0]}@{parent[1]}"} if parent else {}),
        **(_fine_tuned(Path(final["package"])) if head_of and final.get("package") else {}),
    }
    if json_out:
        print_json(result)
        return
    f = result["final"]
    eps_txt = "no DP" if f["epsilon"] is None else f"ε={f['epsilon']:.3f} at δ={f['delta']:g}"
    console.print(f"[green]Flower run {run_id} finished[/] (edgefleet tag {tag}): accuracy "
                  f"{f['accuracy']:.4f}, {eps_txt}"
                  + ("; simulated" if simulate else f"; details: flwr log {run_id}"))
    if result["declines"]:
        console.print(f"[yellow]declined by devices[/]: {describe_declines(result['declines'])}")
    spread = result["device_accuracy"]
    if spread:
        console.print(f"accuracy per device ({spread['devices']} devices): min {spread['min']:.4f}"
                      f", median {spread['median']:.4f}, max {spread['max']:.4f}; worst: node "
                      f"{spread['worst']}")
    console.print(f"model package → {result['package']}"
                  + (f" (next version of {result['parent']})" if parent else ""))
    for line in fine_tuned_lines(result):
        console.print(line)


def fine_tuned_lines(result: dict[str, Any]) -> list[str]:
    """What a head run's summary says of the new version's variants (nothing for other
    runs): a TFLite variant that was not rebuilt is named, with the reason."""
    if "variants" not in result:
        return []
    lines = [f"variants: {', '.join(result['variants'])}"]
    if "tflite-int8" not in result["variants"]:
        lines.append(f"[yellow]TFLite not rebuilt[/]: {result['tflite'].get('reason')}; "
                     "this version ships ONNX variants only")
    return lines


def _fine_tuned(package: Path) -> dict[str, Any]:
    """Which variants a fine-tuned head's version ships, and what its lineage says of
    TFLite (``rebuilt``, or the ``reason`` it was not)."""
    from edgefleet.device.runtime.manifest import load_package

    m = load_package(package, verify=False)
    return {"variants": sorted(m.variants),
            "tflite": m.lineage.get("fine_tuned", {}).get("tflite") or {}}


def _simulate(settings: Any, devices: int, work: Path, dp: str, epsilon: float, task: str,
              store: Any, on_round: Callable[[Any], None], *, ray_address: str, ray_cpus: int,
              shares: int) -> str:
    """Run ``settings`` on Flower's simulation runtime, reporting rounds as they land.

    Virtual device *i* keeps its ledger in ``<work>/simulation/node-<i>`` across runs, as
    a device keeps its own: a fresh ``--work-dir`` is a fresh fleet.
    """
    import threading

    from edgefleet.server.fl.simulation import VirtualNodes, run_simulation

    nodes = VirtualNodes(root=str(work / "simulation"), shares=shares, task=task,
                         common=embedded_policy(dp, epsilon))
    done = threading.Event()

    def follow() -> None:
        seen = 0
        while True:
            stop = done.wait(0.5)
            for row in store.rounds(settings.tag):
                if row.round > seen:
                    seen = row.round
                    on_round(row)
            if stop:
                return

    poller = threading.Thread(target=follow, name="rounds", daemon=True)
    poller.start()
    try:
        run_simulation(settings, devices, nodes, num_cpus=ray_cpus, address=ray_address)
    finally:
        done.set()
        poller.join()
    run = store.run(settings.tag)
    return str(run.flower_run_id) if run is not None else ""


def _base(ref: str, registry: Path | None, home: Path | None, task: str,
          work: Path) -> tuple[str, str, Path]:
    """``(name, version, params.npz)`` of the registered model a run continues (newest if
    no version): its package is unpacked from the registry under ``work`` so the run
    starts from its weights."""
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.cli.registry_cmd import open_registry
    from edgefleet.server.registry.repository import parse_ref

    reg = open_registry(registry, fleet=home)
    try:
        if "@" in ref:
            name, version = parse_ref(ref)
            rec = reg.require(name, version)
        else:
            recs = [r for r in reg.list(ref) if not r.yanked]
            if not recs:
                raise UsageError(f"--base {ref}: no such model in {reg.home}")
            rec = recs[-1]
    finally:
        reg.close()
    if rec.task != task:
        raise UsageError(f"--base {rec.name}@{rec.version} is a {rec.task} model, not {task}")
    if rec.encrypted:
        raise UsageError(f"--base {rec.name}@{rec.version} is stored encrypted: pass its "
                         "package folder instead")
    from edgefleet.device.runtime.archive import extract_package
    from edgefleet.device.runtime.mlp import PARAMS_FILE

    dest = work / "base" / f"{rec.name}@{rec.version}"
    if not (dest / PARAMS_FILE).exists():
        shutil.rmtree(dest, ignore_errors=True)
        extract_package(reg.artifacts / rec.sha256, dest)
    if not (dest / PARAMS_FILE).exists():
        raise UsageError(f"--base {rec.name}@{rec.version} has no {PARAMS_FILE}: FL continues "
                         "only models with their fp32 weights")
    return rec.name, rec.version, dest / PARAMS_FILE


def _next_version(version: str) -> str:
    parts = [int(p) for p in version.split(".")] + [0, 0]
    return f"{parts[0]}.{parts[1] + 1}.0"


def _as_next_version(pkg: Path, parent: tuple[str, str]) -> str:
    """Rename the run's package to the next version of ``parent`` (lineage records it)."""
    from edgefleet.device.runtime.manifest import read_manifest, write_manifest

    m = read_manifest(pkg)
    name, version = parent
    write_manifest(pkg, m.model_copy(update={
        "name": name, "version": _next_version(version),
        "lineage": {**m.lineage, "parent": f"{name}@{version}"}}))
    return str(pkg)
