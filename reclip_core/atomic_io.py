"""Atomic writes for every file the suite produces.

Why: a run can die at any moment (out of memory, pre-emption, Ctrl-C, a full
disk). Writing straight to ``results/table.csv`` or ``ckpt.safetensors`` can then
leave a truncated file that *looks* complete - a checkpoint that loads half its
weights, a table missing its last rows - and later steps would trust it. Here
every file is written to a temporary file in the **same folder** (so the final
rename never crosses a file system), flushed and fsync'ed (so its bytes are on
disk before it gets the real name), then moved over the target with
``os.replace`` (atomic on POSIX and Windows). Readers therefore see either the
old file or the complete new one, never a mix. If anything fails, the temporary
file is deleted and the previous file is left untouched.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_save_figure",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "StaleFileError",
    "move_aside",
]

_WRITE_MODES = {"w", "wb", "wt", "w+", "wb+", "w+b", "wt+", "w+t"}


def _new_file_mode(path: Path) -> int:
    """Permissions for the final file: keep the old file's, else 0o666 minus umask.

    ``mkstemp`` creates 0o600 files; without this every output would silently
    become private to the current user.
    """
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so the rename itself survives a power cut (POSIX only)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "wb",
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it atomically becomes ``path``.

    Yields a file object opened with ``mode`` (a write mode: ``"wb"``, ``"w"``...).
    When the ``with`` block finishes normally the file is flushed, fsync'ed and
    ``os.replace``d onto ``path``. On any exception (KeyboardInterrupt included)
    the temporary file is removed, ``path`` keeps its previous content (or stays
    absent) and the exception propagates. Parent folders are created.
    Text modes default to UTF-8.
    """
    if mode not in _WRITE_MODES:
        raise ValueError(
            f"atomic_open only supports truncating write modes {sorted(_WRITE_MODES)}, "
            f"got {mode!r}. To append, read the old content and write the whole file anew."
        )
    binary = "b" in mode
    if binary and (encoding is not None or newline is not None):
        raise ValueError("encoding/newline only apply to text modes; use mode='w' for text.")
    if not binary and encoding is None:
        encoding = "utf-8"
    target = Path(os.fspath(path))
    if target.is_dir():
        raise ValueError(f"{target} is a folder; pass the path of the file to write.")
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    final_mode = _new_file_mode(target)
    # Same folder as the target: os.replace must not cross file systems, and a
    # leftover ".<name>.*.tmp" after a hard crash is easy to recognise.
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # bytes on disk before the file gets its real name
        os.chmod(tmp, final_mode)
        os.replace(tmp, target)
    except BaseException as err:
        # Never leave a partial temp file behind; the old target is untouched
        # because it was never opened for writing.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if _disk_full(err):
            raise _disk_full_error(err, [target]) from err
        raise
    _fsync_dir(folder)


def _disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_full_error(err: OSError, targets: list) -> OSError:
    names = ", ".join(str(t) for t in targets)
    return OSError(err.errno, f"no space left on the device (or quota exceeded) while writing {names}: nothing was "
                              f"written; any previous version is unchanged and no partial file was left. Free space "
                              f"in {Path(targets[0]).parent} (or point the output elsewhere) and run the step again")


def atomic_write_files(files: Mapping[Any, Any]) -> list:
    """Write several files as one unit: ``{path: bytes | str}`` (str is written as UTF-8, verbatim).

    Every file is first written to its own temporary file (fsync'ed) next to its target; only when
    all of them are on disk are they renamed over their targets. A failure while writing (a full
    disk, an interrupt) removes every temporary file and leaves *all* targets as they were, so a set
    of outputs (a table's CSV and Markdown, an evaluation's JSON and CSVs) is never half new and
    half old. Returns the paths.
    """
    items = []
    for path, data in files.items():
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"atomic_write_files needs bytes or str for {path}, got {type(data).__name__}.")
        target = Path(os.fspath(path))
        if target.is_dir():
            raise ValueError(f"{target} is a folder; pass the path of the file to write.")
        items.append((target, data))
    temps: list = []
    try:
        for target, data in items:
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = _new_file_mode(target)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            temps.append((Path(tmp_name), target, mode))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, mode)
    except BaseException as err:
        for tmp, _, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if _disk_full(err):
            raise _disk_full_error(err, [t for t, _ in items]) from err
        raise
    for tmp, target, _ in temps:  # renames need no space: all data is already on disk
        os.replace(tmp, target)
    for folder in {target.parent for _, target, _ in temps}:
        _fsync_dir(folder)
    return [target for target, _ in items]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(
            f"atomic_write_bytes needs bytes, got {type(data).__name__}; "
            "use atomic_write_text for str."
        )
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, verbatim (no newline translation)."""
    if not isinstance(text, str):
        raise ValueError(
            f"atomic_write_text needs str, got {type(text).__name__}; "
            "use atomic_write_bytes for bytes."
        )
    with atomic_open(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2, UTF-8, trailing newline) atomically.

    The object is serialised before anything is opened, so an unserialisable
    value raises without touching the disk. Extra keyword arguments go to
    ``json.dumps``.
    """
    json_kwargs.setdefault("sort_keys", True)
    json_kwargs.setdefault("indent", 2)
    json_kwargs.setdefault("ensure_ascii", False)
    text = json.dumps(obj, **json_kwargs) + "\n"
    return atomic_write_text(path, text)


def atomic_write_csv(path: str | os.PathLike[str], dataframe: Any, index: bool = False, **csv_kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV (no index by default) atomically.

    The CSV is rendered in memory first, so a failing ``to_csv`` never opens
    the target. Extra keyword arguments go to ``DataFrame.to_csv``.
    """
    if not hasattr(dataframe, "to_csv"):
        raise ValueError(f"atomic_write_csv needs a pandas DataFrame, got {type(dataframe).__name__}.")
    buf = io.StringIO()
    dataframe.to_csv(buf, index=index, **csv_kwargs)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_figure(fig: Any, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format comes from the suffix (or ``format=``)."""
    target = Path(path)
    fmt = savefig_kwargs.pop("format", None) or target.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(
            f"cannot tell the figure format of {target}: give the path a suffix "
            "(.png, .pdf, .svg) or pass format=..."
        )
    # Render to memory first: the temp file's own name ends in .tmp, and a
    # failing savefig then never creates a file at all.
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    return atomic_write_bytes(target, buf.getvalue())


def atomic_save_safetensors(
    tensors: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a ``{name: torch.Tensor}`` dict as safetensors atomically.

    Tensors are moved to CPU and made contiguous; ``metadata`` must map str to str.
    """
    from safetensors.torch import save  # local import: keeps this module light

    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(
                f"safetensors metadata must map str to str; offending entries: {bad}. "
                "Serialise other values first, e.g. json.dumps(value)."
            )
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = save(cpu, metadata=dict(metadata) if metadata is not None else None)
    return atomic_write_bytes(path, data)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], **save_kwargs: Any) -> Path:
    """``torch.save(obj)`` atomically (streams into the temp file; no full copy in memory)."""
    import torch  # lazy: 1.6 s to import; data preparation and the CLI's messages write files without it

    class _Recording:  # torch's writer swallows a failed write and fails later with "unexpected pos"
        def __init__(self, fh: Any) -> None:
            self.fh, self.error = fh, None

        def write(self, data: Any) -> int:
            try:
                return self.fh.write(data)
            except OSError as err:
                self.error = self.error or err
                raise

        def flush(self) -> None:
            self.fh.flush()

    with atomic_open(path, "wb") as fh:
        rec = _Recording(fh)
        try:
            torch.save(obj, rec, **save_kwargs)
        except RuntimeError:
            if rec.error is not None:  # the real cause (e.g. ENOSPC): atomic_open reports a full disk
                raise rec.error from None
            raise
    return Path(path)


class StaleFileError(ValueError):
    """A derived file or folder (hypotheses, a training run) was made from other settings or other
    CLIP weights, so it cannot be resumed or reused. ``path`` is what would have to go."""

    def __init__(self, path: str | os.PathLike[str], message: str):
        super().__init__(message)
        self.path = Path(path)


def move_aside(path: str | os.PathLike[str]) -> Path:
    """Rename ``path`` (file or folder) to ``<name>.stale-<UTC time>`` beside it and return the new
    path: a stale result is set aside for comparison, never deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.stale-{stamp}")
    n = 1
    while target.exists():  # two in the same second
        target = path.with_name(f"{path.name}.stale-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target
