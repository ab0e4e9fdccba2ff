"""Putting a version in place at PATH: the writers' lock, the atomic swap, and recovery.

Writers of PATH hold ``PATH.lock`` for a whole build or append, so they run one after
another. A new version is written to ``PATH.incomplete-XXXX`` and swapped in with one atomic
rename (renameat2 RENAME_EXCHANGE), so a crash at any moment leaves the old or the new
datastore at PATH, never a half-written one. Where the exchange is missing (macOS, some
network file systems) the swap takes two renames with the old version at ``PATH.aside-XXXX``
between them; killed there, PATH is missing until the next writer or opener puts the old
version back (``tidy``). Debris of killed builds is removed the same way. Only directories
carrying the datastore's marker are ever replaced, and files in them the datastore did not
create are carried into the new version.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from retrodraft.retrieval.arrow_files import fsync
from retrodraft.retrieval.errors import DatastorePermissionError
from retrodraft.retrieval.layout import MARKER, OWN_FILES, read_marker

ASIDE = ".aside-"  # PATH.aside-XXXX: the old version during a fallback (non-atomic) swap

log = logging.getLogger(__name__)


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (flock, exclusive), waiting for another writer of ``path`` to finish."""
    lock = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:
        raise DatastorePermissionError(
            f"cannot write a datastore at {path}: no write permission on {e.filename or path.parent}; "
            "choose another --out, or run as a user who may write there"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process writing the datastore at %s (it holds %s)", path, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def tidy(path: Path) -> None:
    """Put back a datastore a killed fallback swap left aside, and delete killed builds' debris.

    Call holding ``writer_lock(path)``. Touches only directories beside ``path`` named by
    this module that carry their own evidence (a marker, a build lock nobody holds).
    """
    asides = [Path(d) for d in glob.glob(glob.escape(str(path)) + ASIDE + "*") if read_marker(Path(d))]
    if asides and not path.exists():
        # Killed between the fallback swap's two renames: the old version is complete, put it back.
        back = max(asides, key=lambda d: d.stat().st_mtime)
        os.rename(back, path)
        asides.remove(back)
        log.warning("restored the datastore at %s from %s (a swap was interrupted)", path, back)
    for d in asides:  # the swap finished: these are replaced versions
        shutil.rmtree(d, ignore_errors=True)
    remove_debris(path)


def tidy_if_idle(path: Path) -> None:
    """``tidy`` if no writer holds ``PATH.lock`` and this process may write beside ``path``; else nothing.

    Only for a datastore, or a missing path with a version left aside: opening anything else
    leaves no lock file beside it.
    """
    if read_marker(path) is None and not glob.glob(glob.escape(str(path)) + ASIDE + "*"):
        return
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return  # a reader without write access: housekeeping is for writers
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tidy(path)
    except (BlockingIOError, PermissionError):
        pass
    finally:
        os.close(fd)


def check_replaceable(path: Path) -> None:
    """FileExistsError unless nothing is at ``path``, or a datastore (its marker, any format
    version), or an empty directory: replacing those loses nothing of the user's."""
    if path.exists() and not (path.is_dir() and (read_marker(path) is not None or not any(path.iterdir()))):
        raise FileExistsError(
            f"{path} exists and is not a datastore (no valid {MARKER}); not replacing it: choose another "
            "--out (or, if it is a datastore of an older retrodraft, move it aside yourself)"
        )


def make_build_dir(path: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=path.name + ".incomplete-", dir=path.parent))
    except PermissionError:
        raise DatastorePermissionError(
            f"cannot write a datastore at {path}: no write permission on {path.parent}; choose another --out"
        ) from None


def carry_user_files(old: Path, new: Path) -> None:
    """Hard-link (copy where links fail) every entry of ``old`` the datastore did not create into ``new``."""
    for entry in os.scandir(old):
        if entry.name in OWN_FILES:
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_in(tmp: Path, path: Path) -> None:
    """Make ``tmp`` the datastore at ``path``; the replaced version, if any, ends up at ``tmp``."""
    fsync(tmp)
    if not path.exists():
        os.rename(tmp, path)
    elif not _exchange(tmp, path):
        # No atomic exchange on this system: PATH is missing between these two renames. The
        # old version waits aside under a name ``tidy`` knows: killed here, the next writer
        # or opener puts it back.
        aside = path.with_name(path.name + ASIDE + tmp.name.rsplit("-", 1)[-1])
        os.rename(path, aside)
        os.rename(tmp, path)
        os.rename(aside, tmp)
    fsync(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def remove_debris(path: Path) -> None:
    """Delete PATH.incomplete-* directories holding a build lock no process holds (killed builds)."""
    for d in glob.glob(glob.escape(str(path)) + ".incomplete-*"):
        try:
            fd = os.open(Path(d) / "build.lock", os.O_RDWR)
        except FileNotFoundError:
            continue  # a build that has not taken its lock yet, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d)
        except BlockingIOError:
            pass  # a live build
        finally:
            os.close(fd)
