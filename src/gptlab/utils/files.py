"""Writing files so that a crash never leaves a half-written one where a whole one was.

Every file a run or an evaluation leaves behind (checkpoints, results.json, tokenizer.json,
reports, generated outputs) goes through `write_atomic`: the bytes go to a temporary file in
the target's own folder (so the final rename never crosses filesystems and never turns into
a copy), are fsynced, and replace the target in one rename. A reader sees the old file or
the new one, never a mix, even after a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from gptlab.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only if the block ends cleanly."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it "
                        f"or choose another path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (str is written as UTF-8) in one atomic step."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def save_atomic(path: str | Path, save: Callable[[BinaryIO], None]) -> None:
    """Atomic form of `save(file_object)`, e.g. `lambda f: torch.save(obj, f)`."""
    with atomic_open(path) as f:
        save(f)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
