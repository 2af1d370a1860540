"""Writing files atomically: a reader, or a run resumed after a crash, finds the old file or the new one
whole, never a file cut short.

A leaf module (it imports nothing from ddpm), so that every other module, config.py included, may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; when the block ends without an error, rename it to `path`.

        with atomic_write(run / "config.yaml") as tmp:
            tmp.write_text(text)

    The temporary file is `.tmp-<pid>-<name>` in `path`'s folder (created if missing): the same file system,
    so that the rename (os.replace) is atomic, and one name per process, so that two processes writing the
    same file never write into each other's. On an error in the block or the rename, the temporary file is
    removed, `path` is left as it was, and the error re-raised; an OSError is re-raised as one naming `path`
    ("[Errno 28] cannot write PATH: No space left on device", the same errno and so the same subclass). A
    crash (SIGKILL, power loss) leaves at most the hidden temporary file beside `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary file is left behind by Ctrl-C
        with suppress(OSError):  # e.g. the folder is a file: the error that says so is the one to raise
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise
