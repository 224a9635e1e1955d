"""Atomic writes: a finished temporary file or folder replaces its destination in one rename."""

import os
import shutil
import tempfile
from pathlib import Path


def swap_into_place(src, dst) -> Path:
    """Move the complete ``src`` onto ``dst`` (same filesystem).

    A file is replaced in one ``os.replace``. An existing folder is first renamed aside and deleted after, so
    ``dst`` never holds a mix of old and new entries and a crash leaves either version whole.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
        os.replace(dst, aside / dst.name)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
    return dst
