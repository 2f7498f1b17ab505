"""A throwaway PostgreSQL server (Debian's package) on a loopback port, for store tests.

PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` user and lives in its own temporary folder (pytest's is root-only).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from edgefleet.server.fleet.broker import free_port


def pg_bin() -> str | None:
    """The folder with initdb/pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    which = shutil.which("initdb")
    return os.path.dirname(which) if which else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster, yield its DSN, stop and delete it."""
    bindir = pg_bin()
    assert bindir, "PostgreSQL is not installed (scripts/install-system-deps.sh installs it)"
    root = tempfile.mkdtemp(prefix="edgefleet-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(root, "data")
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(f"{bindir}/initdb", "-D", data, "-U", "edgefleet", "--auth=trust", "-E", "UTF8",
            "--no-sync")
        run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60",
            "-o", f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off", "start")
        dsn = f"postgresql://edgefleet@127.0.0.1:{port}/postgres"
        yield dsn
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, check=False, timeout=60)
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)
