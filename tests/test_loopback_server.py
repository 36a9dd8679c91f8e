"""The loopback ComfyUI server's HTTP client: a generous request timeout by default (a loaded machine stalls the
server for more than the old 10 s), configurable, and a request to a server that never answers fails with it."""

import socket
import time

import pytest

from implicit_negatives.comfyui.loopback_server import REQUEST_TIMEOUT_S, ComfyServer


def test_requests_wait_the_configured_timeout_then_fail(tmp_path):
    assert ComfyServer("unused", str(tmp_path)).request_timeout == REQUEST_TIMEOUT_S >= 60
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        server = ComfyServer("unused", str(tmp_path), request_timeout=0.5)
        server.url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            server.get("/system_stats")
        assert 0.4 < time.monotonic() - start < 10
        with pytest.raises(TimeoutError):
            server.post("/prompt", {})
