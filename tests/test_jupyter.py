"""The way users open the suite: a real Jupyter server, its contents API and a kernel it starts."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_bias_analysis.ipynb", "02_reference_and_positional_encoding.ipynb", "03_rectification.ipynb",
             "04_decoder_training.ipynb", "05_benchmark_tables.ipynb"]


def test_gpu_workflow_parses_and_runs_the_paper_profile():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "reproduce-gpu.yml").read_text())
    job = wf["jobs"]["reproduce"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    commands = " ".join(step.get("run", "") for step in job["steps"])
    assert "make reproduce PROFILE=paper" in commands and "DEVICE=cuda" in commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET", body=None):
    req = urllib.request.Request(f"{base}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def jupyter_server(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, RECLIP_RESULTS=str(tmp_path / "results"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.port_retries=0", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _execute(ws, code: str, timeout: float = 600) -> dict:
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                                   "session": uuid.uuid4().hex, "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False, "store_history": False,
                                    "user_expressions": {}, "allow_stdin": False}}))
    # The reply comes on the shell channel and the printed text on iopub; the protocol orders
    # neither against the other, so wait for both the reply and iopub's "idle" (which follows
    # every output of the request) before reading stdout.
    deadline, outputs, reply, idle = time.time() + timeout, [], None, False
    while time.time() < deadline and (reply is None or not idle):
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            outputs.append(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
        elif msg["msg_type"] == "execute_reply":
            reply = msg["content"]
    if reply is None or not idle:
        raise TimeoutError(code[:80])
    return {"status": reply["status"], "content": reply, "stdout": "".join(outputs)}


def test_server_lists_notebooks_and_runs_one_through_its_kernel(jupyter_server, tmp_path):
    import websocket  # websocket-client, a dependency of jupyter_server

    base, token = jupyter_server
    # /api/status answers before every server extension (e.g. jupytext's contents manager) is
    # ready; give the contents API a moment instead of failing on its first 400.
    for attempt in range(60):
        try:
            listing = _api(base, token, "/api/contents/notebooks")
            break
        except urllib.error.HTTPError as err:
            if attempt == 59:
                raise AssertionError(f"contents API kept failing: {err.code} {err.read()[:300]!r}") from err
            time.sleep(1)
    names = {item["name"] for item in listing["content"]}
    assert set(NOTEBOOKS) <= names
    with pytest.raises(urllib.error.HTTPError):  # token auth is on
        urllib.request.urlopen(f"{base}/api/contents/notebooks", timeout=10)

    notebook = _api(base, token, "/api/contents/notebooks/02_reference_and_positional_encoding.ipynb")["content"]
    kernel = _api(base, token, "/api/kernels", "POST", {"name": "python3"})
    ws = websocket.create_connection(f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/api/kernels/{kernel['id']}/channels",
                                     header=[f"Authorization: token {token}"], timeout=600)
    try:
        assert _execute(ws, f"import os; os.chdir({str(ROOT / 'notebooks')!r})")["status"] == "ok"
        for cell in notebook["cells"]:
            if cell["cell_type"] != "code":
                continue
            reply = _execute(ws, cell["source"])
            assert reply["status"] == "ok", reply["content"]
        check = _execute(ws, "print(model.num_trainable_parameters(), lab.results)")
    finally:
        ws.close()
        _api(base, token, f"/api/kernels/{kernel['id']}", "DELETE")
    count, results = check["stdout"].split()
    assert int(count) > 0 and results.startswith(str(tmp_path))  # outputs went to RECLIP_RESULTS
    assert (Path(results) / "02_positional_embedding.png").is_file()
