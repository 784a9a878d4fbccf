"""Verified, resumable downloads of the archives listed in ``archives.yaml``.

d2l-data-hub style: a registry (data, not code) names every archive with its
URLs, size and checksum; :func:`fetch` puts a verified copy in a cache folder and
returns its path.

* Downloads go to ``<cache>/<filename>.part`` and resume with an HTTP ``Range``
  request when interrupted (in the same call, up to ``retries`` times, or on the
  next run of the same command). Only a complete file whose checksum matches is
  renamed to its final name.
* A file that does not match its recorded checksum is moved aside to
  ``<filename>.bad`` and :class:`ChecksumError` says what to do next.
* A verified file gets a ``<filename>.verified`` stamp (size, mtime, checksums);
  later runs trust the stamp instead of re-hashing gigabytes, and never
  download the file again.
* Archives whose download needs a login (Cityscapes) are never fetched: the user
  passes the folder holding them (``archives_dir``) and they are verified in place.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import yaml

from reclip_core.atomic_io import atomic_write_json, atomic_write_text
from reclip_core.datasets import safe_relative_id

__all__ = [
    "Archive",
    "ChecksumError",
    "DownloadError",
    "REGISTRY_PATH",
    "default_cache_dir",
    "load_registry",
    "dataset_archives",
    "file_checksums",
    "verify_file",
    "fetch",
]

REGISTRY_PATH = Path(__file__).with_name("archives.yaml")
HASH_ALGOS = ("md5", "sha1", "sha256")
CHUNK = 1 << 20
USER_AGENT = "reclip-data-prep/1.0 (+python urllib)"
from .pace import too_slow


class ChecksumError(ValueError):
    """A file does not match its recorded checksum (it has been moved aside)."""


class DownloadError(RuntimeError):
    """No URL of an archive could be downloaded completely."""


@dataclass(frozen=True)
class Archive:
    name: str
    filename: str
    urls: tuple = ()
    size: Optional[int] = None
    approx: str = ""
    checksums: Mapping[str, str] = field(default_factory=dict)
    login: bool = False
    login_url: str = ""
    source: str = ""

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "Archive":
        unknown = set(d) - {"filename", "urls", "size", "approx", "login", "login_url", "source", *HASH_ALGOS}
        if unknown:
            raise ValueError(f"archive {name!r}: unknown keys {sorted(unknown)} in the registry; "
                             f"allowed: filename, urls, size, approx, login, login_url, source, {', '.join(HASH_ALGOS)}.")
        sums = {a: str(d[a]).lower() for a in HASH_ALGOS if d.get(a)}
        return cls(name=name, filename=d.get("filename", name), urls=tuple(d.get("urls") or ()),
                   size=d.get("size"), approx=d.get("approx", ""), checksums=sums,
                   login=bool(d.get("login", False)), login_url=d.get("login_url", ""),
                   source=d.get("source", ""))


def load_registry(path: Optional[os.PathLike] = None) -> Dict[str, Archive]:
    """All archives of the registry file, by name; each filename must be a plain file name."""
    path = Path(path or REGISTRY_PATH)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = {name: Archive.from_dict(name, d) for name, d in (data.get("archives") or {}).items()}
    for name, arch in out.items():  # filenames are joined onto the cache and --archives folders
        safe_relative_id(arch.filename, f"the archive registry {path}, archive {name!r}, key 'filename',",
                         flat=True, fix="Fix that entry: the filename is the archive's plain file name.")
    return out


def dataset_archives(dataset: str, path: Optional[os.PathLike] = None) -> List[Archive]:
    """The archives one dataset needs, in the registry's order."""
    data = yaml.safe_load(Path(path or REGISTRY_PATH).read_text(encoding="utf-8"))
    table = data.get("datasets") or {}
    if dataset not in table:
        raise ValueError(f"no archives registered for dataset {dataset!r}; known: {sorted(table)}.")
    reg = load_registry(path)
    return [reg[n] for n in table[dataset]]


def default_cache_dir() -> Path:
    """``$RECLIP_DOWNLOAD_CACHE`` or ``~/.cache/reclip/downloads``."""
    env = os.environ.get("RECLIP_DOWNLOAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "reclip" / "downloads"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bar(total, initial, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def file_checksums(path: os.PathLike, algos: Iterable[str] = ("sha256",), progress: bool = False) -> Dict[str, str]:
    """Hex digests of ``path`` for every algorithm in ``algos``, in one pass."""
    algos = list(dict.fromkeys(algos))
    hashers = {a: hashlib.new(a) for a in algos}
    path = Path(path)
    with open(path, "rb") as fh, _bar(path.stat().st_size, 0, f"verify {path.name}", progress) as bar:
        while True:
            buf = fh.read(CHUNK)
            if not buf:
                break
            for h in hashers.values():
                h.update(buf)
            bar.update(len(buf))
    return {a: h.hexdigest() for a, h in hashers.items()}


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_ok(path: Path, expected: Mapping[str, str]) -> bool:
    stamp = _stamp_path(path)
    try:
        d = json.loads(stamp.read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    if d.get("size") != st.st_size or d.get("mtime_ns") != st.st_mtime_ns:
        return False
    sums = d.get("checksums") or {}
    return all(sums.get(a) == v for a, v in expected.items())


def _write_stamp(path: Path, sums: Mapping[str, str]) -> None:
    st = path.stat()
    atomic_write_json(_stamp_path(path), {"file": path.name, "size": st.st_size,
                                          "mtime_ns": st.st_mtime_ns, "checksums": dict(sums)})


def _move_aside(path: Path) -> Path:
    bad = path.with_name(path.name + ".bad")
    if bad.exists():
        bad.unlink()
    os.replace(path, bad)
    for extra in (_stamp_path(path),):
        if extra.exists():
            extra.unlink()
    return bad


def _expected_sums(archive: Archive, path: Path, allow_unpinned: bool) -> Dict[str, str]:
    """Recorded checksums, else the trust-on-first-use pin, else {} (first use)."""
    if archive.checksums:
        return dict(archive.checksums)
    pin = _pin_path(path)
    if pin.exists():
        return {"sha256": pin.read_text(encoding="utf-8").split()[0].lower()}
    if not allow_unpinned:
        raise ChecksumError(
            f"{archive.filename}: no checksum is recorded in {REGISTRY_PATH.name} and "
            "--require-checksum was given. Add an md5/sha1/sha256 for it to the registry "
            "(from a trusted source), or run without --require-checksum to pin the first "
            "download (trust on first use).")
    return {}


def verify_file(archive: Archive, path: os.PathLike, *, progress: bool = True,
                allow_unpinned: bool = True) -> Dict[str, str]:
    """Check ``path`` against ``archive``'s recorded checksum(s); returns the digests.

    On a mismatch the file is moved to ``<name>.bad`` and :class:`ChecksumError`
    explains what to do. A file with a valid ``.verified`` stamp is not re-hashed.
    """
    path = Path(path)
    expected = _expected_sums(archive, path, allow_unpinned)
    if expected and _stamp_ok(path, expected):
        return expected
    if archive.size is not None and path.stat().st_size != archive.size:
        got = path.stat().st_size
        bad = _move_aside(path)
        raise ChecksumError(_mismatch_message(archive, bad, "size", str(archive.size), str(got)))
    algos = list(expected) or ["sha256"]
    if "sha256" not in algos:
        algos.append("sha256")
    sums = file_checksums(path, algos, progress=progress)
    for algo, want in expected.items():
        if sums[algo] != want:
            bad = _move_aside(path)
            raise ChecksumError(_mismatch_message(archive, bad, algo, want, sums[algo]))
    if not expected:  # trust on first use
        atomic_write_text(_pin_path(path), f"{sums['sha256']}  {archive.filename}\n")
        warnings.warn(
            f"{archive.filename}: no checksum is recorded for this archive; pinned its sha256 "
            f"{sums['sha256']} in {_pin_path(path)} (trust on first use). Later runs are checked "
            "against it. Compare it with a trusted copy if you can.", stacklevel=2)
    _write_stamp(path, sums)
    return sums


def _mismatch_message(archive: Archive, bad: Path, what: str, want: str, got: str) -> str:
    where = (f"download it again from {archive.login_url} (login required) into the folder given "
             "by --archives" if archive.login else
             f"run the same command again to download it afresh (URLs tried in order: "
             f"{', '.join(archive.urls) or 'none'})")
    return (f"{archive.filename} does not match its recorded {what}: expected {want}, got {got}. "
            f"The file was moved aside to {bad} (kept for inspection). What to do: delete {bad} "
            f"and {where}. If it fails again the server is handing out a different file: fetch "
            "it from another mirror by hand, check its checksum, and pass its folder with "
            "--archives DIR.")


def _remote_total(resp, offset: int) -> Optional[int]:
    cr = resp.headers.get("Content-Range")
    if cr and "/" in cr:
        tail = cr.rsplit("/", 1)[1].strip()
        if tail.isdigit():
            return int(tail)
    cl = resp.headers.get("Content-Length")
    if cl and cl.isdigit():
        return int(cl) + (offset if resp.status == 206 else 0)
    return None


class DownloadTooSlow(DownloadError):
    """The server sends too slowly for the download ever to finish in reasonable time."""


def _download_once(url: str, part: Path, expected_size: Optional[int], progress: bool,
                   timeout: float, desc: str) -> None:
    """One HTTP request, appending to ``part`` from its current size. Raises on a short read, and
    when the server is too slow (:func:`data_prep.pace.too_slow`; at most one socket ``timeout``
    past the limit)."""
    started = time.monotonic()
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None:
        if offset == expected_size:
            return
        if offset > expected_size:
            part.unlink()
            offset = 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part file is complete
            return
        raise
    with resp:
        if offset and resp.status == 206:
            cr = resp.headers.get("Content-Range", "")
            start = cr.split()[1].split("-")[0] if cr.startswith("bytes ") else ""
            if start != str(offset):
                raise DownloadError(f"{url}: server answered Range bytes={offset}- with {cr!r}")
            mode = "ab"
        else:  # 200: the server ignored the Range header; start over
            offset = 0
            mode = "wb"
        total = _remote_total(resp, offset)
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url} serves {total} bytes but the registry records "
                                f"{expected_size}: wrong file or moved URL.")
        with open(part, mode) as fh, _bar(total, offset, desc, progress) as bar:
            got = 0
            while True:  # read1: whatever has arrived, so a trickle cannot block one read forever
                buf = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
                if not buf:
                    break
                fh.write(buf)
                got += len(buf)
                bar.update(len(buf))
                why = too_slow(url, started, got)
                if why:
                    raise DownloadTooSlow(why)
    got = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if want is not None and got < want:
        raise http.client.IncompleteRead(b"", want - got)


_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


def fetch(archive: Archive, cache_dir: Optional[os.PathLike] = None, *,
          archives_dir: Optional[os.PathLike] = None, progress: bool = True,
          retries: int = 3, timeout: float = 60.0, retry_wait: float = 2.0,
          allow_unpinned: bool = True) -> Path:
    """Return the path of a verified copy of ``archive``; download it if needed.

    Order: a file in ``archives_dir`` (verified in place, never copied), then the
    cached ``<cache_dir>/<filename>`` (not re-downloaded once verified), else a
    resumable download from each URL in turn.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if archives_dir is not None:
        given = Path(archives_dir) / archive.filename
        if given.is_file():
            verify_file(archive, given, progress=progress, allow_unpinned=allow_unpinned)
            return given
    target = cache / archive.filename
    if target.is_file():
        verify_file(archive, target, progress=progress, allow_unpinned=allow_unpinned)
        return target
    if archive.login or not archive.urls:
        where = f" in {Path(archives_dir)}" if archives_dir is not None else ""
        raise FileNotFoundError(
            f"{archive.filename} ({archive.approx or 'size unknown'}) cannot be downloaded "
            f"anonymously and was not found{where}. What to do: log in at "
            f"{archive.login_url or 'the dataset site'}, download {archive.filename} yourself "
            "(see docs/datasets.md), put it in a folder and pass that folder with --archives DIR.")
    cache.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    free = shutil.disk_usage(cache).free
    if archive.size is not None and free < archive.size - (part.stat().st_size if part.exists() else 0):
        raise OSError(f"not enough free space in {cache} for {archive.filename}: need "
                      f"{archive.size / 1e9:.1f} GB, have {free / 1e9:.1f} GB. Free some space or "
                      "pass another --cache-dir.")
    errors = []
    for url in archive.urls:
        for attempt in range(retries + 1):
            try:
                _download_once(url, part, archive.size, progress, timeout, archive.filename)
                break
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
                if e.code in (403, 404, 410):
                    break  # this URL will not work; try the next one
            except DownloadError as e:
                errors.append(str(e))
                break
            except _TRANSIENT as e:
                have = part.stat().st_size if part.exists() else 0
                errors.append(f"{url}: {type(e).__name__}: {e} (have {have} bytes)")
                if attempt < retries:
                    _say(f"[data_prep] {archive.filename}: connection lost at {have} bytes, "
                         f"resuming (attempt {attempt + 2}/{retries + 1})")
                    time.sleep(retry_wait)
        else:
            continue
        if part.exists() and (archive.size is None or part.stat().st_size == archive.size):
            os.replace(part, target)
            verify_file(archive, target, progress=progress, allow_unpinned=allow_unpinned)
            return target
    have = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"could not download {archive.filename}. Tried:\n  " + "\n  ".join(errors) +
        (f"\nThe partial file {part} ({have} bytes) is kept: run the same command again to "
         "resume where it stopped." if have else "") +
        f"\nOr download it by hand from {archive.urls[0]} and pass its folder with --archives DIR.")
