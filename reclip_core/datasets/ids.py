"""The one check every id read from a file passes before it becomes a path.

Ids come from split lists, JSON annotations, registries, hub rows and presets; each is joined
onto a folder that is then read, linked, overwritten or cleaned, so a bad one is refused here.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Optional


_DEFAULT_FIX = "Fix or replace that file (take it from a trusted source) and run the same command again."


def _unsafe_reason(text: object, flat: bool) -> Optional[str]:
    """Why ``text`` cannot be used as a relative id, or None when it can."""
    if not isinstance(text, str):
        return f"which is a {type(text).__name__}, not a text"
    if not text.strip():
        return "which is empty"
    if "\x00" in text:
        return "which holds a NUL character"
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        return "which holds a control character"
    if "\\" in text:
        return "which holds a backslash (a Windows path separator)"
    if len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha():
        return "which starts with a drive letter"
    if text.startswith("/"):
        return "which is an absolute path"
    if flat and "/" in text:
        return "which holds a '/' where a single file name is expected"
    parts = text.split("/")
    if ".." in parts:
        return "which has a '..' component (path traversal)"
    if "" in parts or "." in parts:
        return "which has an empty or '.' component"
    return None


def safe_relative_id(text: object, what: str, *, root: Optional[os.PathLike] = None, suffix: str = "",
                     flat: bool = False, fix: str = _DEFAULT_FIX) -> str:
    """Return ``text`` if it is safe to join onto a folder; raise ``ValueError`` otherwise.

    Why: ids read from split lists, annotation JSON, registries or hub rows are joined onto
    folders that are then read, linked, overwritten or cleaned. One line like ``../../x`` would
    make a preparation delete and replace a file outside its root, so such input is refused
    before any path is built from it, with a message naming ``what`` (the file and line or
    entry) and ``fix`` (what to do next).

    Refused: non-text, empty, NUL or control characters, backslashes, drive letters, absolute
    paths, ``..``, empty or ``.`` components, any ``/`` when ``flat``; and, when ``root`` is
    given, an id whose ``root / (text + suffix)`` resolves outside ``root`` (a symbolic link on
    the way). ``frankfurt/frankfurt_000000_000294`` is a valid (non-flat) id.
    """
    reason = _unsafe_reason(text, flat)
    if reason is None and root is not None:
        base = Path(root).resolve()
        target = (base / f"{text}{suffix}").resolve()
        if base not in target.parents:
            reason = f"which resolves to {target}, outside {base} (through a symbolic link)"
    if reason is not None:
        raise ValueError(f"{what} holds {text!r}, {reason}: ids must be relative names inside "
                         f"the dataset. {fix}")
    return text
