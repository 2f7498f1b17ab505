"""``flower-supernode`` that checks the fleet's signature on every Flower app it runs.

``python -m edgefleet.device.fl.supernode --trusted-entities app-trust.yaml ...`` is
Flower's own SuperNode (same arguments) with one addition: when it fetches a run's FAB,
the signature record the submitter put in the run config
(:data:`~edgefleet.device.wire.app_trust.SIGNATURE_KEY`, see
:mod:`edgefleet.device.wire.app_trust` for why it travels there) becomes the FAB's
verification record. Flower's verification then runs unchanged: a FAB without a record,
signed by a key not in the trusted-entities file, or whose bytes differ from what was
signed is refused with an error reply, before anything of it is installed or imported.
The reason is logged here too (the SuperNode log), next to Flower's own line.

Without ``--trusted-entities`` nothing changes: Flower then runs every app, which the
agent never does once enrolled (the bundle carries the fleet's key).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from edgefleet.device.wire.app_trust import SIGNATURE_KEY, AppSignature

__all__ = ["install_signature_hook", "main"]

log = logging.getLogger("edgefleet.supernode")


def install_signature_hook() -> None:
    """Make the SuperNode take FAB verification records from the run config."""
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.fab import Fab

    real: Callable[..., Any] = sci._pull_and_store_message
    if getattr(real, "_edgefleet", False):
        return

    def pull(**kw: Any) -> Any:
        runs: dict[int, Any] = {}
        get_run, get_fab = kw["get_run"], kw["get_fab"]

        def get_run_seen(run_id: int) -> Any:
            runs[run_id] = run = get_run(run_id)
            return run

        def get_fab_with_record(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            run = runs.get(run_id)
            raw = run.override_config.get(SIGNATURE_KEY) if run is not None else None
            sig = AppSignature.decode(raw)
            trusted = kw.get("trusted_entities") or {}
            if sig is None:
                log.error("run %s: the Flower app carries no edgefleet signature "
                          "(run config %r %s); refusing it", run_id, SIGNATURE_KEY,
                          "missing" if not raw else "malformed")
            elif sig.key_id not in trusted:
                log.error("run %s: the Flower app is signed by %s, not a trusted key (%s); "
                          "refusing it", run_id, sig.key_id, ", ".join(sorted(trusted)))
            # Flower itself decides (and refuses anything not verified by a trusted key).
            verifications = {**fab.verifications, "valid_license": "Valid"}
            if sig is not None:
                verifications.update(sig.verification())
            return Fab(fab.hash_str, fab.content, verifications)

        return real(**{**kw, "get_run": get_run_seen, "get_fab": get_fab_with_record})

    pull._edgefleet = True  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode CLI with :func:`install_signature_hook` in place."""
    install_signature_hook()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if argv is not None:
        sys.argv = ["flower-supernode", *argv]
    else:
        sys.argv[0] = "flower-supernode"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flower_supernode()


if __name__ == "__main__":  # pragma: no cover - run as a program by the agent
    main()
