"""docs/midway.service, as systemd would run it: its ExecStartPre and ExecStart
command lines are taken from the file and run (with the configuration at a
temporary path), so a flag the unit names and midway lost fails here; the
start speaks sd_notify as the unit's ``Type=notify`` expects, and the unit's
``KillSignal`` drains to exit 0."""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import ROOT, free_port, threaded_echo

pytestmark = pytest.mark.timeout(120)

UNIT = ROOT / "docs" / "midway.service"
CONFIG_PATH = "/etc/midway/midway.toml"


def directives() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def commands(key: str) -> list[str]:
    """Every value of a directive systemd lets repeat (ExecReload, run in order)."""
    return [line.partition("=")[2].strip()
            for line in UNIT.read_text(encoding="utf-8").splitlines()
            if line.partition("=")[0].strip() == key and not line.startswith("#")]


def midway_argv(command: str, config: Path) -> list[str]:
    """The unit's ``/usr/bin/env python3 -m midway ...`` as this test runs it."""
    words = shlex.split(command)
    assert words[:4] == ["/usr/bin/env", "python3", "-m", "midway"], command
    assert CONFIG_PATH in words, command
    return [sys.executable, "-m", "midway",
            *[str(config) if w == CONFIG_PATH else w for w in words[4:]]]


def test_the_unit_runs_midway_as_it_says(tmp_path: Path) -> None:
    unit = directives()
    assert unit["Type"] == "notify"
    assert unit["KillSignal"] == "SIGTERM"
    assert commands("ExecReload")[-1] == "/bin/kill -HUP $MAINPID"
    config = tmp_path / "midway.toml"
    port = free_port()
    notify_path = str(tmp_path / "notify")
    with threaded_echo() as echo:
        config.write_text(f'[server]\ndrain_timeout_s = 5\n[proxy.web]\n'
                          f'listen = "127.0.0.1:{port}"\nupstreams = ["127.0.0.1:{echo}"]\n')
        check = subprocess.run(midway_argv(unit["ExecStartPre"], config), cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(30)
        log = (tmp_path / "stderr").open("w")
        proc = subprocess.Popen(midway_argv(unit["ExecStart"], config), cwd=ROOT, stderr=log,
                                env={"NOTIFY_SOCKET": notify_path, "PATH": "/usr/bin:/bin"})
        try:
            assert notify.recv(4096).startswith(b"READY=1")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
            proc.send_signal(signal.SIGHUP)  # ExecReload
            assert b"RELOADING=1" in notify.recv(4096)
            assert notify.recv(4096).startswith(b"READY=1")
            proc.send_signal(signal.Signals[unit["KillSignal"]])
            assert notify.recv(4096).startswith(b"STOPPING=1")
            assert proc.wait(30) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
            notify.close()
            log.close()


def test_systemctl_reload_fails_on_a_file_that_would_not_load(tmp_path: Path) -> None:
    """``systemctl reload midway`` runs the ExecReload lines in order and fails at
    the first that exits non-zero: a broken file fails the check before the
    SIGHUP (the operator sees the reload fail, and midway keeps running what it
    ran, as a refused reload always does); a good one passes it."""
    *checks, signal_line = commands("ExecReload")
    assert signal_line == "/bin/kill -HUP $MAINPID" and checks
    config = tmp_path / "midway.toml"
    good = f'[proxy.web]\nlisten = "127.0.0.1:{free_port()}"\nupstreams = "127.0.0.1:9"\n'

    def reload_checks() -> list[subprocess.CompletedProcess[str]]:
        return [subprocess.run(midway_argv(line, config), cwd=ROOT, capture_output=True,
                               text=True, timeout=60) for line in checks]

    config.write_text(good)
    assert all(done.returncode == 0 for done in reload_checks())
    config.write_text(good + "max_conections = 5\n")
    failed = reload_checks()[0]
    assert failed.returncode != 0
    assert "proxy.web.max_conections: unknown key" in failed.stderr
