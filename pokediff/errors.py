"""Errors a user can cause and fix, and the one way every command line reports them.

Each CLI's ``__main__`` catches ``USER_ERRORS`` only and prints ``error: <message>`` (exit status 2); anything
else is a bug and keeps its traceback. Messages name the file, flag or value at fault.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


class PokediffError(Exception):
    """Base of the errors a user can fix (bad file, bad value, full disk...)."""


class CheckpointError(PokediffError, ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or made for another stage or run length."""


class OutputNotWritableError(PokediffError, OSError):
    """An output path that cannot be written (read-only folder, disk full, a file where a folder is needed)."""


class NoUsableWeightsError(PokediffError, RuntimeError):
    """A stage ended without weights worth keeping (every validation loss NaN/inf)."""


def _config_error():
    from pokediff.config import ConfigError  # a plain-YAML module: cheap to import

    return ConfigError


def user_errors() -> tuple[type[BaseException], ...]:
    """What a CLI turns into one ``error:`` line: pokediff's own errors, config errors, missing/existing files."""
    # FileExistsError: e.g. a new GAN run where an earlier run's checkpoints are
    return (PokediffError, _config_error(), FileNotFoundError, NotADirectoryError, FileExistsError)


def report_user_errors(main, *args, **kwargs):
    """Call ``main``; a user error becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except user_errors() as err:
        message = str(err)
    except OSError as err:  # a write that failed somewhere without its own check (disk full mid-run, ...)
        failure = write_failure(err.filename, err) if err.filename else None
        message = str(failure) if failure is not None else hub_error_message(err)  # or the hub said no
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def hub_error_message(err: BaseException) -> str | None:
    """One line for an error the Hugging Face Hub answered (a wrong token, a missing or private repo...), None
    for any other error. huggingface_hub's own messages run over several lines."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if not isinstance(err, HfHubHTTPError) or err.response is None:
        return None
    request, status = err.response.request, err.response.status_code
    said = "; ".join(dict.fromkeys(line.strip() for line in (err.server_message or "").splitlines() if line.strip()))
    line = f"the hub refused {request.method} {request.url} (HTTP {status}{': ' + said if said else ''})"
    if isinstance(err, RepositoryNotFoundError):
        return f"{line}: no such repo, or it is private and no valid token was sent (log in: hf auth login)"
    if status in (401, 403):
        return f"{line}: check the token (log in: hf auth login, or set HF_TOKEN)"
    return line


# ------------------------------------------------------------------------------------------- outputs
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EFBIG,
}


def write_failure(path, err: BaseException) -> OutputNotWritableError | None:
    """The ``OutputNotWritableError`` that ``err`` (raised while writing ``path``) stands for, or None if it is
    not a write failure. torch's zip writer reports a full disk as a RuntimeError from inline_container.cc."""
    if isinstance(err, OutputNotWritableError):
        return err
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        reason = os.strerror(err.errno).lower()
        where = err.filename or path
    elif isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "inline_container" in str(err)):
        reason = "the write failed (disk full?)"
        where = path
    elif type(err).__name__ == "SafetensorError" and "serializ" in str(err):
        # safetensors' Rust writer: "Error while serializing: I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(err))
        reason = os.strerror(int(code.group(1))).lower() if code else "the write failed"
        where = path
    else:
        return None
    free = _free_bytes(Path(path))
    space = f" ({free / 2**20:.0f} MiB free there)" if free is not None else ""
    return OutputNotWritableError(f"could not write {where}: {reason}{space}")


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_writable_file(path, flag: str) -> Path:
    """Fail before any work when ``path`` cannot be created: an existing folder, or a parent that is a file
    or not writable. Missing parent folders are fine (they are created later)."""
    raw = os.fspath(path)
    path = Path(raw).expanduser()  # Path() drops a trailing slash: look at the raw text for it
    if raw.endswith(("/", os.sep)) or path.is_dir():
        raise OutputNotWritableError(f"{flag} {path} is a folder; give a file path")
    _check_nearest_existing_folder(path, path.parents, flag)
    return path


def check_writable_folder(path, flag: str) -> Path:
    """Fail before any work when ``path`` cannot be (or become) a writable folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"{flag} {path} is an existing file; give a folder")
    _check_nearest_existing_folder(path, (path, *path.parents), flag)
    return path


def _check_nearest_existing_folder(path: Path, candidates, flag: str) -> None:
    """The first of ``candidates`` (``path`` or its parents, nearest first) that exists must be a folder we can
    write in: everything below it will be created there."""
    for folder in candidates:
        if folder.exists():
            if not folder.is_dir():
                raise OutputNotWritableError(f"{flag} {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputNotWritableError(f"{flag} {path}: cannot write in {folder} ({_why_not_writable(folder)})")
            return


# ---------------------------------------------------------------------------------------- checkpoints
def verify_checkpoint_files(folder) -> None:
    """Read every file of a checkpoint folder far enough to know it is whole (``fileio.check_file_whole``);
    ``CheckpointError`` names the first bad one."""
    from pokediff.fileio import check_file_whole

    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            check_file_whole(file)
        except Exception as err:  # noqa: BLE001 - any failure to read it means the file is damaged
            raise CheckpointError(f"checkpoint file {file} is damaged: {_short(err)}") from err


def newest_intact_checkpoint(checkpoints, check, where, flag: str = "--resume latest") -> Path:
    """The newest of ``checkpoints`` (oldest first) that ``check(path)`` accepts (it raises ``CheckpointError`` or
    ``FileNotFoundError`` for a damaged one). Passing over damaged ones logs one warning naming them and the one
    chosen; ``CheckpointError`` when none is intact (``where``: the folder, ``flag``: what asked, for the message)."""
    damaged = []
    for path in reversed(list(checkpoints)):
        try:
            check(path)
        except (CheckpointError, FileNotFoundError) as err:
            damaged.append(str(err))
            continue
        if damaged:
            logger.warning("resuming from %s, the newest intact checkpoint: %s", path, "; ".join(damaged))
        return Path(path)
    raise CheckpointError(f"{flag}: no intact checkpoint in {where}: " + "; ".join(damaged))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
