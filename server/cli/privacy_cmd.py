"""``edgefleet privacy``: what the device-level DP guarantee is worth, measured.

``audit`` runs the one-run canary audit (:mod:`edgefleet.server.privacy.audit`) on
simulated devices of a built-in task and prints the empirical ε lower bound next to the
accounted ε. ``epsilon`` prints what both accountants say for a DP-SGD schedule.
"""

from __future__ import annotations

import typer

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["app"]

app = typer.Typer(help="Differential privacy: accounted ε and an empirical audit.",
                  no_args_is_help=True)


@app.command()
def audit(
    task: str = typer.Option("digits", "--task", help="Built-in task (digits, vibration)."),
    dp: str = typer.Option("sample", "--dp", help="sample (DP-SGD on the device) or off."),
    epsilon: float = typer.Option(3.0, "--epsilon", min=0.01, help="Target ε of the run."),
    delta: float = typer.Option(1e-5, "--delta", min=1e-12, max=0.1, help="δ."),
    canaries: int = typer.Option(200, "--canaries", min=10,
                                 help="Canary records, each planted with probability 1/2."),
    devices: int = typer.Option(3, "--devices", min=1, help="Simulated devices (canaries "
                                "go to the first)."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
    local_steps: int = typer.Option(40, "--local-steps", min=1, help="DP-SGD steps per round."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Expected batch size."),
    lr: float = typer.Option(0.2, "--lr", min=1e-6, help="Learning rate."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.9999,
                                     help="Confidence of the empirical lower bound."),
    seed: int = typer.Option(0, "--seed", help="Seed of the canaries and their inclusion."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Plant canaries in one device, train one federated run, and bound ε from below.

    The accounted ε is an upper bound (the device's ledger); the audit's ε is a lower
    bound at the stated confidence (Steinke, Nasr and Jagielski 2023). With DP off the
    audit finds a large ε; with DP on it must stay at or below the accounted one.

    Example: edgefleet privacy audit --task digits --dp sample --epsilon 3 --json
    """
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.privacy.audit import run_audit

    if dp not in ("sample", "off"):
        raise UsageError(f"--dp must be sample or off, not {dp!r}")
    res = run_audit(task=task, dp=dp, epsilon=epsilon, delta=delta, canaries=canaries,
                    devices=devices, rounds=rounds, local_steps=local_steps,
                    batch_size=batch_size, lr=lr, confidence=confidence, seed=seed)
    if json_out:
        print_json(res.to_dict())
        return
    acc = "—" if res.accounted_epsilon is None else f"{res.accounted_epsilon:.2f}"
    console.print(f"{res.task}, DP {res.dp}: accounted ε {acc} ({res.accountant}, "
                  f"δ={res.delta:g}); empirical ε ≥ {res.empirical_epsilon:.2f} at "
                  f"{res.confidence:.0%} confidence ({res.correct}/{res.guesses} canary "
                  f"guesses right, {res.canaries} canaries); test accuracy {res.accuracy:.3f}")


@app.command("epsilon")
def epsilon_cmd(
    q: float = typer.Option(..., "--q", min=1e-9, max=1.0, help="Poisson sampling rate."),
    sigma: float = typer.Option(..., "--sigma", min=1e-6, help="Noise multiplier."),
    steps: int = typer.Option(..., "--steps", min=0, help="DP-SGD steps."),
    delta: float = typer.Option(1e-5, "--delta", min=1e-12, max=0.1, help="δ."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """ε of Poisson-subsampled Gaussian steps under both accountants (upper bounds)."""
    from edgefleet.device.privacy.accounting import (
        DEFAULT_ACCOUNTANT,
        PLD_DISCRETIZATION,
        DpEvent,
        epsilon_for,
    )

    ev = [DpEvent(q, sigma, steps)]
    out = {"q": q, "sigma": sigma, "steps": steps, "delta": delta,
           "rdp": epsilon_for(ev, delta, "rdp"), "pld": epsilon_for(ev, delta, "pld"),
           "pld_discretization": PLD_DISCRETIZATION, "default": DEFAULT_ACCOUNTANT}
    if json_out:
        print_json(out)
        return
    console.print(f"ε at δ={delta:g}: PLD {out['pld']:.3f} (pessimistic, grid "
                  f"{PLD_DISCRETIZATION:g}), RDP {out['rdp']:.3f}; default {DEFAULT_ACCOUNTANT}")
