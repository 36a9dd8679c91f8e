"""Start a real ComfyUI server (main.py) on loopback with the pack installed, for frontend/API tests.

The server gets its own base directory (``--base-directory``), so the ComfyUI tree is never
modified: ``custom_nodes/`` holds a link to this repository, ``models/`` links to the tiny
fixtures. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from .headless import PACK_ROOT as REPO_ROOT

# Seconds one HTTP request may take: generous, since a server on a loaded machine (2 cores, other test runs) can
# stall for well over 10 s while it loads models or builds /object_info; a healthy one answers in milliseconds.
REQUEST_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_path: str, base_dir: str, request_timeout: float = REQUEST_TIMEOUT_S):
        self.comfyui_path = comfyui_path
        self.base_dir = base_dir
        self.request_timeout = request_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "server.log")
        self.process = None

    def start(self, timeout: float = 120.0):
        for sub in ("custom_nodes", "models/checkpoints", "models/embeddings", "input", "output", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        link = os.path.join(self.base_dir, "custom_nodes", "implicit-negatives")
        if not os.path.exists(link):
            os.symlink(REPO_ROOT, link)
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", self.base_dir,
                   "--database-url", "sqlite:///:memory:"]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited early:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=max(1.0, min(self.request_timeout, deadline - time.time())))
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI server did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def get(self, path: str, timeout: float | None = None):
        """GET ``path`` as JSON; ``timeout`` seconds (default ``request_timeout``) before an OSError."""
        with urllib.request.urlopen(self.url + path, timeout=timeout or self.request_timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
            body = response.read()
            return json.loads(body) if body else {}

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-3000:]}")
