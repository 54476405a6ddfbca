"""Writing files so that nothing is half-written, lost or left behind.

A write goes to a hidden sibling of its destination, `.NAME.tmp-<pid>-<random>`, that is moved into place when it is
complete. A writer that is killed leaves that sibling; the next write to the same place removes the ones whose writer
is gone (its pid no longer runs on this machine, or - for names without a pid, or a pid taken by another process - the
sibling is older than STALE_SECONDS) and says so. Temporary directories are created private (0700) by the standard
library; what is moved into place gets the modes of the user's umask, like any other file the user creates.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_SECONDS = 24 * 3600  # no write of vtcompile runs this long: an older temporary sibling is a killed write's
_NO_PID_STALE_SECONDS = 3600  # names written before the pid was part of them
_TMP = re.compile(r"\.(tmp|old)-(?:(\d+)-)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` that killed writes left behind (module docstring); returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    prefix = f".{out.name}."
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = _TMP.match(p.name[len(prefix) - 1:])
        if m is None:
            continue
        try:
            age = time.time() - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        pid = int(m.group(2)) if m.group(2) else None
        if pid == os.getpid():
            continue
        stale = age > STALE_SECONDS or (not _alive(pid) if pid is not None else age > _NO_PID_STALE_SECONDS)
        if not stale:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        who = f"pid {pid}, no longer running" if pid is not None and age <= STALE_SECONDS else \
            f"{age / 3600:.0f} h old"
        log.warning("removed %s, left behind by an earlier write to %s that was killed (%s)", p, out, who)
        removed.append(p)
    return removed


def temp_dir(out: Path) -> Path:
    """A new temporary directory beside `out` (stale ones from killed writes removed first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))


def temp_path(out: Path) -> Path:
    """A fresh temporary file name beside `out` (stale ones from killed writes removed first); not created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"


def old_dir(out: Path) -> Path:
    """A temporary directory beside `out` to move a replaced `out` into before removing it."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=Path(out).parent))


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes a new file or directory gets under the
    user's umask: temporary directories and some writers (safetensors) create them private."""
    mask = umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def replace_file(tmp: Path, out: Path) -> None:
    """Move a complete temporary file into place, with the umask's modes."""
    apply_umask(tmp)
    os.replace(tmp, out)
