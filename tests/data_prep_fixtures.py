"""Shared helpers for the data_prep tests (test_data_prep, test_faults, test_faults_cli): archives
built in memory or on disk, a dataset registry served by the loopback ``server`` fixture
(conftest.py), and the ``python -m data_prep`` entry point called in-process."""
from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import yaml


def write_tar(path, members):
    """members: list of (name, bytes) or (name, ('symlink'|'hardlink', target))."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            if isinstance(data, tuple):  # symlink entry
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777 << 16)
                zf.writestr(info, data[1])
            else:
                zf.writestr(zipfile.ZipInfo(name), data)
    return path


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def registry(tmp_path, server, name, archives):
    """Serve ``archives`` {filename: bytes} and write a registry for dataset ``name``."""
    reg = {"archives": {}, "datasets": {name: list(archives)}}
    for fn, data in archives.items():
        entry = {"filename": fn, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if server is not None:
            server.files[f"/{fn}"] = data
            entry["urls"] = [server.url(f"/{fn}")]
        else:
            entry.update(urls=[], login=True, login_url="https://example.invalid/login")
        reg["archives"][fn] = entry
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(reg))
    return path


def run_cli(*args):
    from data_prep.__main__ import main

    return main([*map(str, args), "--no-progress"])
