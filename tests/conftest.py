"""Shared fixtures: CLIP models with random weights (no downloads in tests); fixtures used by more
than one test module (``existing``, ``disk_full``, ``server``). Shared plain helpers live in the
``*_fixtures.py`` modules; test modules never import from one another."""
from __future__ import annotations

import errno
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from reclip_core import atomic_io

from .atomic_io_fixtures import OLD
from .write_faults import fdopen_failing

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vit_b16():
    """OpenAI-architecture ViT-B/16 (QuickGELU) with seeded random weights."""
    import reclip_core

    torch.manual_seed(0)
    return reclip_core.load_clip("ViT-B-16-quickgelu", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip():
    """A small custom open_clip architecture (patch 8, context 16, D=48) from a config file."""
    import reclip_core

    torch.manual_seed(0)
    return reclip_core.load_clip(str(FIXTURES / "tiny_clip.json"), pretrained=None, device="cpu")


# --------------------------------------------------------------------------------------------
# atomic writes: a file with previous content, and a disk that fills up (test_atomic_io, test_faults*)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(OLD)
    return path


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(name_part)``: every later write to a temporary file whose name contains
    ``name_part`` writes half its bytes, then fails with ENOSPC (as a full disk does)."""

    def no_space(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    def arm(name_part: str) -> None:
        monkeypatch.setattr(atomic_io.os, "fdopen", fdopen_failing(os.fdopen, name_part, no_space))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to find which file is being written")
    return arm


# --------------------------------------------------------------------------------------------
# a loopback HTTP server with Range support and a "drop the connection mid-way" mode
# (test_data_prep, test_faults*)
# --------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rng = self.headers.get("Range")
        start = 0
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.path in srv.drop_once:
            srv.drop_once.discard(self.path)
            cut = len(body) // 2
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection dies mid-body
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.drop_once, srv.honour_range = {}, [], set(), True
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    yield srv
    srv.shutdown()
    srv.server_close()


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_notebooks`` read what the executed notebooks wrote: run them last."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebooks") is not None)
