"""Set-up: the PyTorch CPU wheel index is probed once, and an unreachable one costs one line, not a retry storm."""

import functools
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torch_index(url: str) -> subprocess.CompletedProcess:
    # HAS_GPU= : behave as on a machine without an NVIDIA driver, whatever this one has
    return subprocess.run(["make", "--no-print-directory", "-s", "torch-index", "HAS_GPU=", f"TORCH_CPU_INDEX={url}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_unreachable_cpu_index_falls_back_to_the_default_index_with_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    result = torch_index(f"http://127.0.0.1:{port}/whl/cpu")
    assert time.perf_counter() - started < 10
    assert result.returncode == 0
    assert result.stdout.strip() == ""  # no index option: pip uses the default index only
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is unreachable" in lines[0] and "default index" in lines[0]


def test_reachable_cpu_index_is_used(tmp_path):
    (tmp_path / "whl" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "whl" / "cpu" / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
        result = torch_index(url)
    finally:
        server.shutdown()
    assert result.returncode == 0
    assert result.stdout.strip() == f"--extra-index-url {url}"
    assert result.stderr == ""
