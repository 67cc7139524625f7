"""Writing files safely: whole or not at all, with the permissions the umask gives; telling a full disk apart."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask, read without setting it (os.umask can only swap it, which is unsafe with threads)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022  # no /proc: the common default


def written_whole(path: Path, write: Callable[[Path], object], *, mode: int | None = None, sync: bool = False) -> None:
    """`write(tmp)` a temporary file beside `path` (a hidden name of its own, ending in .tmp: a writer that goes by
    the suffix must be told the format), then rename it over `path`: a full disk, a crash or Ctrl+C never leaves a
    cut-off file under the final name, nor the temporary one. `mode`: the file's permissions (default: what the umask
    gives a new file); `sync`: on disk before it takes the name."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # named before it exists: Ctrl+C at any point
    try:  # finds it named here, so the file is removed
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        write(tmp)
        if sync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(error: BaseException | None) -> bool:
    """Whether an error (OSError, DuckDB's, safetensors') is a full disk or quota, here or in what caused it."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
