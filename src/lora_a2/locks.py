"""Locks between lora-a2 processes: a grid cell's, ``cells/<cell>.lock``, held by the bench
worker that runs the cell, and a run folder's, ``<out>/.lock``, held by the process running in
it (:func:`folder_lock`).

A worker holds ``cells/<cell>.lock`` while it runs the cell, so several ``lora-a2 bench``
processes (terminals, machines sharing the folder) can work through one grid together: each
skips the cells another one holds. On POSIX the hold is an exclusive ``flock`` on the file,
which the kernel drops when the holder dies however it dies (SIGKILL, power loss), so a lock
nobody holds is free whatever the file says (a reused pid, an empty file from a worker killed
mid-write); the file names the holder's host and pid for people and ``--list``. A lock that
names another host is respected (``flock`` may not reach across a shared folder) until someone
deletes it. Without ``fcntl`` the file alone is the lock, and one left by a dead process of
this host is taken over.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


def take_lock(path: Path, other_hosts: bool = True) -> int | None:
    """Hold the lock file ``path``: the open descriptor (held until :func:`release_lock`), or
    None when a live worker holds it. ``other_hosts``: a file naming another host counts as
    held (a grid folder shared between machines, where ``flock`` may not reach); False trusts
    the ``flock`` alone (a run folder: a lock left by a container that was rescheduled under
    another host name must not block the folder for good)."""
    me = f"{socket.gethostname()} {os.getpid()}\n"
    if fcntl is None:
        return 0 if _take_lock_file(path, me) else None
    for _ in range(3):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process
            os.close(fd)
            return None
        try:  # its holder may have released (unlinked) it between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        if other_hosts and holder and holder[0] != socket.gethostname():
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        return fd
    return None


def release_lock(path: Path, fd: int) -> None:
    """Delete the lock file, then let go of it (in that order: nobody can hold a lock file that
    is about to vanish without seeing it vanish, :func:`take_lock`) — only if it is still the
    file this process holds (one deleted and made anew by someone else is theirs)."""
    if fcntl is None:
        path.unlink(missing_ok=True)
        return
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    os.close(fd)


def lock_held(path: Path, other_hosts: bool = True) -> bool:
    """Whether a live worker holds ``path`` (with ``other_hosts``, one of another host's always
    counts as live: :func:`take_lock`). Probes with a non-blocking ``flock`` it lets go at
    once."""
    try:
        text = path.read_bytes().decode(errors="replace")  # a damaged file is still a lock
    except OSError:
        return False
    if fcntl is None:
        return not _is_stale(path)
    holder = text.split()
    if other_hosts and holder and holder[0] != socket.gethostname():
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------- without fcntl (not POSIX)
def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path) -> bool:
    """The lock was left by a dead process of this host (False if unreadable or mid-write)."""
    try:
        host, pid = path.read_text().split()
        return host == socket.gethostname() and not _pid_alive(int(pid))
    except (OSError, ValueError):
        return False


def _take_lock_file(path: Path, me: str) -> bool:
    """Create the lock file ``path`` atomically; False when a live worker holds it."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _is_stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


#: a run folder's lock file, held by the process running in it (new run or ``--resume``)
RUN_LOCK = ".lock"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s run lock for the block; a one-line :class:`UserError` when another
    live process holds it. Two processes writing one run folder would interleave its metrics,
    checkpoints and privacy ledger (each rewriting the ledger from its own copy: attempts lost,
    ε under-charged)."""
    path = Path(folder) / RUN_LOCK
    fd = take_lock(path, other_hosts=False)
    if fd is None:
        raise UserError(f"'{folder}' is in use by another lora-a2 process (it holds "
                        f"{path}); wait for it to finish or stop it (if no process runs there, "
                        f"delete that file)")
    try:
        yield
    finally:
        release_lock(path, fd)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: what two
    processes must not interleave, e.g. two workers writing a grid's results.json from their own
    views of the finished cells (without ``fcntl``: no serialisation)."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
