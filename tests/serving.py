"""A real ``ct-transfer serve`` process on a loopback port, its memory read from /proc, and the
hostile uploads of issue #22. Shared by tests/test_serve.py, tests/test_fuzz.py and
bench/serve_memory.py (the bench reports what the tests assert)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(run_dirs, *, log_path: Path, args=(), env: dict | None = None, src: Path | None = None,
                  start_timeout: float = 240):
    """``python -m ct_transfer.cli serve`` on a free port; yields ``{"url", "proc", "log"}``."""
    port = free_port()
    src = Path(src or ROOT / "src")
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "ct_transfer.cli", "serve", *[x for r in run_dirs for x in ("--run", str(r))],
           "--port", str(port), *map(str, args)]
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    try:
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {Path(log_path).read_text()[-2000:]}")
            time.sleep(0.25)
        yield {"url": url, "proc": proc, "log": Path(log_path), "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def memory_mb(pid: int) -> dict:
    """Resident memory of a process from /proc/PID/status: now (``rss``) and its peak (``peak``), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def reset_peak(pid: int) -> bool:
    """Start a new peak (VmHWM := VmRSS) by writing 5 to /proc/PID/clear_refs (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def post(url: str, files, timeout: float = 300, **form) -> httpx.Response:
    """multipart POST /api/predict; ``files``: (name, bytes) pairs."""
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(url + "/api/predict", files=parts, data=form, timeout=timeout)


# -- hostile uploads (issue #22) ------------------------------------------------------------------


def zero_png(side: int = 6300) -> bytes:
    """An all-zero grey PNG, ``side`` x ``side`` px: 38 KB for 6300 (39.7 M px, under the per-image
    limit) that decodes to 119 MB of RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def zero_zip(mb: int = 400, name: str = "zeros.dcm") -> bytes:
    """A zip of one member of ``mb`` MB of zeros (about 0.4 MB compressed for 400)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf, \
            zf.open(name, "w", force_zip64=True) as fh:
        block = bytes(2**20)
        for _ in range(mb):
            fh.write(block)
    return buf.getvalue()


# docs/serve.md states it: with the default limits, a server's resident memory never rises more than
# this above what it holds once its runs are loaded and it has answered one request
MEMORY_BOUND_MB = 1024
