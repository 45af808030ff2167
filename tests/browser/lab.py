"""JupyterLab on localhost driven by headless Chromium (Playwright), for tests/test_browser.py.

Chromium comes from Debian (`.ci/install-browser.sh`): Playwright's own browser
download does not work here, so we launch the system executable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# No background traffic: the test must not depend on (or wait for) the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# User settings for a fresh JupyterLab: no news/update toasts over the notebook,
# and every cell kept in the DOM (JupyterLab 4 windowing hides cells off screen).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def find_chromium() -> str | None:
    """Path of the system Chromium ($CHROMIUM overrides), or None."""
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def missing_reason() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if find_chromium() is None:
        return "no Chromium found (run .ci/install-browser.sh: Debian's chromium + chromium-driver)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (run .ci/install-browser.sh)"
    for mod in ("jupyterlab", "ipywidgets"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 with a random token over `root`; a context manager."""

    def __init__(self, root: Path, state_dir: Path, env: dict | None = None, start_timeout_s: float = 90.0):
        self.root, self.state_dir = Path(root), Path(state_dir)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.extra_env, self.start_timeout_s = env or {}, start_timeout_s
        self.log_path = self.state_dir / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def _env(self) -> dict:
        settings = self.state_dir / "lab-settings"
        for name, value in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = dict(os.environ)
        # MPLBACKEND=Agg (set by CI and conftest) would stop inline figures, which users do see.
        env.pop("MPLBACKEND", None)
        env.update(  # a fresh, isolated Jupyter: no user config, settings, workspaces or IPython profile
            JUPYTER_CONFIG_DIR=str(self.state_dir / "config"),
            IPYTHONDIR=str(self.state_dir / "ipython"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self.state_dir / "lab-workspaces"),
            JUPYTER_RUNTIME_DIR=str(self.state_dir / "runtime"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> JupyterLab:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=self._env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()  # the child holds its own handle
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}")
            try:
                self.api("GET", "api/status")
                # The lab page itself (templates, static assets) must be served too.
                with urllib.request.urlopen(self.url("lab"), timeout=5) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"JupyterLab not ready after {self.start_timeout_s:.0f} s; log: {self.log_path}\n{self.log_tail()}")

    def api(self, method: str, path: str, timeout: float = 10.0):
        """Call the REST API with the token; returns parsed JSON (None when empty)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def notebook_file(self, path: str) -> dict:
        """The saved notebook (nbformat JSON) as the server has it on disk."""
        return self.api("GET", f"api/contents/{path}?content=1")["content"]

    def shutdown_kernels(self) -> None:
        """Stop every kernel (frees the CPU between tests)."""
        for k in self.api("GET", "api/kernels"):
            try:
                self.api("DELETE", f"api/kernels/{k['id']}")
            except urllib.error.URLError:
                pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # a clean shutdown stops the kernels too
            self.api("POST", "api/shutdown", timeout=5)
            self.proc.wait(timeout=15)
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> JupyterLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_chromium(playwright, user_data_dir: Path, viewport=(1400, 1000)):
    """A persistent context on a fresh profile dir (Playwright refuses --user-data-dir in args)."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": viewport[0], "height": viewport[1]},
    )
