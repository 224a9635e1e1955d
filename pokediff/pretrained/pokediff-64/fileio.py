"""Atomic writes: a finished temporary file or folder replaces its destination in one rename.

Every save goes through ``swap_into_place``, which also gives what it puts in place the modes any new file
gets (``0o666 & ~umask``, folders ``0o777 & ~umask``; a replaced file keeps its own mode): temporary files and
folders are created private (``mkstemp``, ``mkdtemp``, and safetensors' own temporary file: safetensors#782),
and a model folder copied or shared with another account must stay readable. ``check_file_whole`` reads a
saved file back far enough to know it is whole.
"""

import json
import os
import shutil
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(src, dst=None) -> None:
    """Give ``src`` (a file, or a folder and everything in it) the modes a newly created one gets; a file about
    to replace the file ``dst`` takes ``dst``'s mode instead."""
    src = Path(src)
    mask = current_umask()
    if src.is_symlink():
        return
    if src.is_file():
        keep = dst is not None and Path(dst).is_file() and not Path(dst).is_symlink()
        os.chmod(src, (Path(dst).stat().st_mode & 0o7777) if keep else 0o666 & ~mask)
        return
    for folder, dirs, files in os.walk(src):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def swap_into_place(src, dst) -> Path:
    """Move the complete ``src`` onto ``dst`` (same filesystem), with the modes of a new file (``apply_default_modes``).

    A file is replaced in one ``os.replace``. An existing folder is first renamed aside and deleted after, so
    ``dst`` never holds a mix of old and new entries and a crash leaves either version whole.
    """
    src, dst = Path(src), Path(dst)
    apply_default_modes(src, dst)
    if dst.is_dir() and not dst.is_symlink():
        aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
        os.replace(dst, aside / dst.name)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
    return dst


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """``with atomic_write(dst) as tmp:`` write a file or a folder at ``tmp`` (a free name beside ``dst``).

    When the block ends, ``tmp`` replaces ``dst`` (``swap_into_place``); when it raises, ``tmp`` is deleted and
    ``dst`` is left as it was. The parent folder is created; ``tmp`` keeps ``dst``'s suffix for writers that
    pick a format by extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        swap_into_place(tmp, path)
    finally:
        _remove(tmp)


def write_text_atomic(path, text: str) -> Path:
    """``path.write_text(text)``, but a reader never sees half of it."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path, data: bytes) -> Path:
    """``path.write_bytes(data)``, but a reader never sees half of it."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def check_file_whole(path) -> None:
    """Read a saved file far enough to know it is whole: JSON parsed, a safetensors header checked against the file
    size, a torch zip archive CRC-checked (nothing is unpickled); other suffixes pass. Raises what the reader raises."""
    path = Path(path)
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
        if not zipfile.is_zipfile(path):
            raise ValueError("not a torch archive (truncated or overwritten)")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"damaged entry {bad}")
