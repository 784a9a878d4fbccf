"""Safe extraction of tar and zip archives.

Every member is checked *before* anything is written: a member whose name is
absolute (``/etc/x``, ``C:\\x``, ``\\\\server\\x``), contains a ``..`` component,
or is a symbolic/hard link whose target lies outside the extraction root makes
the whole archive refused with :class:`UnsafeArchiveError` naming the member.
Device files and FIFOs are refused too. Nothing is extracted from a refused
archive. A member replaces (never writes into) a file left at its path, so
prepared images hard-linked to an earlier extraction keep their content.

Before anything is written, the members' total uncompressed size is checked against the free
space of the destination and against ``max_expansion`` times the archive's size (images barely
compress, so a far higher ratio is a decompression bomb): :class:`ArchiveTooLargeError`.

A completed extraction leaves a stamp (``.extracted-<archive name>.json``) in
the destination, so a rerun skips it, and an interrupted one is redone.
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, List, Optional

from reclip_core.atomic_io import atomic_write_json

__all__ = ["UnsafeArchiveError", "ArchiveTooLargeError", "check_member_name", "safe_extract", "list_members",
           "check_expanded_size", "MAX_EXPANSION"]

MAX_EXPANSION = 50.0  # uncompressed / archive size; benchmark archives (JPEG/PNG, JSON) stay below ~6
EXPANSION_ENV = "RECLIP_MAX_EXTRACT_RATIO"  # what `python -m data_prep --max-expansion R` sets


class UnsafeArchiveError(ValueError):
    """An archive member would be written (or point) outside the extraction root."""


class ArchiveTooLargeError(ValueError):
    """An archive would expand beyond the free disk space or the allowed expansion ratio."""


def check_expanded_size(archive: Path, dest: Path, total: int, max_expansion: Optional[float] = None) -> None:
    """Refuse, before writing anything, an archive whose members add up to more than the free space
    at ``dest`` or to more than ``max_expansion`` × its own size."""
    import shutil

    if max_expansion is None:
        raw = os.environ.get(EXPANSION_ENV, "").strip()
        max_expansion = float(raw) if raw else MAX_EXPANSION
    size = max(1, archive.stat().st_size)
    if total > max_expansion * size:
        raise ArchiveTooLargeError(
            f"{archive.name}: its members add up to {total / 2**20:,.1f} MiB uncompressed, {total / size:,.0f} times "
            f"the archive's {size / 2**20:,.2f} MiB (the limit is {max_expansion:g}x): likely a decompression bomb; "
            "nothing was written. If you trust the archive, raise the limit with --max-expansion R.")
    probe = dest
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if total > free:
        raise ArchiveTooLargeError(
            f"{archive.name}: extracting needs {total / 2**30:,.2f} GiB but {probe} has {free / 2**30:,.2f} GiB free; "
            "nothing was written. Free space, or pass another --root.")


def _norm(name: str) -> str:
    return name.replace("\\", "/")


def _is_absolute(name: str) -> bool:
    n = _norm(name)
    return n.startswith("/") or (len(n) >= 2 and n[1] == ":" and n[0].isalpha())


def check_member_name(archive: str, name: str) -> str:
    """Return the normalised relative path of ``name``; raise if it escapes the root."""
    if _is_absolute(name):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract this "
            "archive (nothing was written). Get the archive from a trusted source.")
    parts = PurePosixPath(_norm(name)).parts
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} contains '..' (path traversal); refusing to extract "
            "this archive (nothing was written). Get the archive from a trusted source.")
    return "/".join(p for p in parts if p not in ("", "."))


def _link_escapes(member_rel: str, target: str, hard: bool) -> bool:
    if _is_absolute(target):
        return True
    base = "" if hard else posixpath.dirname(member_rel)
    resolved = posixpath.normpath(posixpath.join(base, _norm(target)))
    return resolved == ".." or resolved.startswith("../") or resolved.startswith("/")


def _check_tar(archive: str, tf: tarfile.TarFile, keep: Callable[[str], bool]) -> List[tarfile.TarInfo]:
    members = []
    for m in tf.getmembers():
        rel = check_member_name(archive, m.name)
        if m.issym() or m.islnk():
            if _link_escapes(rel, m.linkname, hard=m.islnk()):
                raise UnsafeArchiveError(
                    f"{archive}: member {m.name!r} is a {'hard' if m.islnk() else 'symbolic'} "
                    f"link to {m.linkname!r}, outside the extraction root; refusing to extract "
                    "this archive (nothing was written).")
        elif m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a device file or FIFO; refusing to extract "
                "this archive (nothing was written).")
        if rel and keep(rel):
            members.append(m)
    return members


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_zip(archive: str, zf: zipfile.ZipFile, keep: Callable[[str], bool]) -> List[zipfile.ZipInfo]:
    members = []
    for info in zf.infolist():
        rel = check_member_name(archive, info.filename)
        if _zip_is_symlink(info):
            target = zf.read(info).decode("utf-8", "replace")
            if _link_escapes(rel, target, hard=False):
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} is a symbolic link to {target!r}, "
                    "outside the extraction root; refusing to extract this archive "
                    "(nothing was written).")
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a symbolic link; links in zip archives "
                "are not supported by the extractor (nothing was written).")
        if rel and keep(rel):
            members.append(info)
    return members


def list_members(path: os.PathLike) -> List[str]:
    """Member names of a tar or zip archive (after the safety checks)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [m.filename for m in _check_zip(path.name, zf, lambda r: True)]
    with tarfile.open(path) as tf:
        return [m.name for m in _check_tar(path.name, tf, lambda r: True)]


def _drop_old_file(out: Path) -> None:
    """Remove a file an earlier extraction left at ``out`` before a member is written there.

    Why: prepared images are hard links to the extracted files and extractors write into an
    existing file in place, so re-extracting (another archive, ``--force``) would silently
    change already prepared images, or write through a link left there. A new file is safe.
    """
    if out.is_symlink() or out.is_file():
        out.unlink()


def _stamp(dest: Path, archive: Path) -> Path:
    return dest / f".extracted-{archive.name}.json"


def safe_extract(path: os.PathLike, dest: os.PathLike, *, include: Optional[Callable[[str], bool]] = None,
                 progress: bool = True, force: bool = False, tag: str = "",
                 max_expansion: Optional[float] = None) -> Path:
    """Extract the tar or zip archive ``path`` into ``dest`` after checking every member.

    ``include(relative_name) -> bool`` selects members (default: all). Returns ``dest``.
    ``tag`` is stored in the completion stamp: a different tag (e.g. another member
    selection) makes a rerun extract again. ``max_expansion`` bounds the uncompressed size
    (default ``$RECLIP_MAX_EXTRACT_RATIO`` or :data:`MAX_EXPANSION` times the archive's size).
    """
    from tqdm.auto import tqdm

    path, dest = Path(path), Path(dest)
    keep = include or (lambda rel: True)
    st = path.stat()
    stamp = _stamp(dest, path)
    sig = {"archive": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "tag": tag}
    if not force and stamp.exists():
        try:
            if {k: v for k, v in json.loads(stamp.read_text()).items() if k in sig} == sig:
                return dest
        except ValueError:
            pass
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = _check_zip(path.name, zf, keep)
            check_expanded_size(path, root, sum(i.file_size for i in members), max_expansion)
            for info in tqdm(members, desc=f"extract {path.name}", unit="file", disable=not progress, leave=False):
                rel = check_member_name(path.name, info.filename)
                out = (root / rel).resolve()
                if root != out and root not in out.parents:  # defence in depth
                    raise UnsafeArchiveError(f"{path.name}: member {info.filename!r} resolves outside {root}")
                if not info.is_dir():
                    _drop_old_file(root / rel)
                zf.extract(info, root)
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            members = _check_tar(path.name, tf, keep)
            check_expanded_size(path, root, sum(m.size for m in members if m.isfile()), max_expansion)
            for m in tqdm(members, desc=f"extract {path.name}", unit="file", disable=not progress, leave=False):
                if m.isfile():
                    _drop_old_file(root / check_member_name(path.name, m.name))
                tf.extract(m, root, filter="data")
    else:
        raise ValueError(f"{path} is neither a tar nor a zip archive; delete it and download it again.")
    atomic_write_json(stamp, sig)
    return dest
