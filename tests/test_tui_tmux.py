"""Real-terminal smoke test: the workbench under tmux, driven with keys, checked on the captured pane."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tui.synthetic import synthetic_rows
from workbench.catalog import connect

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_for_pane(session: str, needle: str, timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    pane = ""
    while time.monotonic() < deadline:
        pane = tmux("capture-pane", "-p", "-t", session)
        if needle in pane:
            return pane
        time.sleep(0.25)
    raise AssertionError(f"{needle!r} never appeared on screen; last screen:\n{pane}")


def test_workbench_in_a_real_terminal(catalog_path, tmp_path):
    con = connect(catalog_path)
    synthetic_rows(con, 500)
    png_wide = con.execute("SELECT count(*) FROM images_view WHERE format = 'PNG' AND width > 1500").fetchone()[0]
    con.close()
    session = f"wb-{uuid.uuid4().hex[:8]}"
    command = f"sleep 1; cd {REPO} && {sys.executable} -m workbench.cli --catalog {catalog_path} ; echo EXITED $? ; sleep 30"
    # COLUMNS/LINES (set by some runners) would override the real terminal size.
    env_prefix = f"env -u COLUMNS -u LINES WORKBENCH_HOME={os.environ['WORKBENCH_HOME']} TERM=xterm-256color "
    tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "45", env_prefix + f"sh -c '{command}'")
    try:
        # A detached session may keep the server's default size; make it roomy before the app starts (sleep 1).
        tmux("set-option", "-t", session, "window-size", "manual")
        tmux("resize-window", "-t", session, "-x", "150", "-y", "45")
        # `workbench` with no command opens the browser on a catalog with images.
        pane = wait_for_pane(session, "rows 1–100 of 500")
        assert "/synthetic/img_000000.jpg" in pane and "F1" in pane.upper()

        # Type a SQL filter into the filter box.
        tmux("send-keys", "-t", session, "C-f")
        tmux("send-keys", "-t", session, "-l", "format = 'PNG' AND width > 1500")
        tmux("send-keys", "-t", session, "Enter")
        pane = wait_for_pane(session, "SQL filter")
        table_rows = [line.split("▊")[0] for line in pane.splitlines() if "/synthetic/" in line.split("▊")[0]]
        assert 0 < png_wide < 500 and f"of {png_wide} · SQL filter" in pane and table_rows, pane

        # F6: SQL console; F9 runs the example query, whose result table shows the formats.
        tmux("send-keys", "-t", session, "F6")
        wait_for_pane(session, "history")
        tmux("send-keys", "-t", session, "F9")
        pane = wait_for_pane(session, "3 rows")
        assert "WEBP" in pane and "mean_width" in pane

        # F1 lists bindings; Escape closes it.
        tmux("send-keys", "-t", session, "F1")
        pane = wait_for_pane(session, "workbench: keys")
        assert "Save the edited caption" in pane and "Next group" in pane
        tmux("send-keys", "-t", session, "Escape")

        # A CLI command while the TUI holds the catalog gets the holder's name, not a traceback.
        result = subprocess.run([sys.executable, "-m", "workbench.cli", "dedup", "--catalog", str(catalog_path)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 75 and "in use by process" in result.stderr and "Traceback" not in result.stderr

        tmux("send-keys", "-t", session, "C-q")
        pane = wait_for_pane(session, "EXITED 0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
