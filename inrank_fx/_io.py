"""Writing files so that a failure or Ctrl-C never leaves a half-written one behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_destination(path: str | os.PathLike) -> Path:
    """The destination as a Path, after checking its folder exists and is writable."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    return path


@contextlib.contextmanager
def atomic_destination(path: Path) -> Iterator[Path]:
    """Yield a path in a private temp folder beside `path` with the same file name; on success
    every file written there is moved into place (data files before the main file), on failure
    the temp folder is removed and nothing is left behind."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp_dir / path.name
        written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a private temp folder beside the folder `out`; on success it replaces `out` (an
    earlier folder there is moved aside, then removed) with ordinary permissions, on failure it
    is removed and `out` is left as it was."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
