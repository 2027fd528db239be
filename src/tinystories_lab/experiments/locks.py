"""File locks that say who holds them: the queue's, and the ones a run holds while it trains.

They are `flock` locks, so the OS drops them when every process holding one has exited (kill -9 and
reboots included): a lock is never left behind by a dead process. A file system without working flock
(some Lustre and NFS mounts) is refused in one line; `TINYSTORIES_LAB_LOCK_DIR=<local folder>` then puts
every lock there instead, named after the path it stands for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from tinystories_lab.errors import UserError

LOCK_DIR_ENV = "TINYSTORIES_LAB_LOCK_DIR"
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # flock unsupported by the file system


def lock_path(path: Path | str) -> Path:
    """Where the lock standing for `path` lives: `path` itself, or under $TINYSTORIES_LAB_LOCK_DIR."""
    folder = os.environ.get(LOCK_DIR_ENV)
    if not folder or Path(path).absolute().parent == Path(folder).absolute():
        return Path(path)
    return Path(folder) / str(Path(path).absolute()).strip(os.sep).replace(os.sep, "%")


def lock_files(folder: Path, pattern: str = "*.lock") -> list[Path]:
    """The lock files of a folder (a run's), wherever `lock_path` puts them."""
    where = lock_path(Path(folder) / pattern)
    return list(where.parent.glob(where.name))


def _flock(fd: int, path: Path, flags: int) -> None:
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        os.close(fd)
        raise UserError(
            f"Cannot lock {path}: its file system does not support file locks ({e.strerror}); set "
            f"{LOCK_DIR_ENV}=<a local folder, e.g. /tmp/tinystories-locks> to keep locks there."
        ) from None


class Lock:
    """An exclusive lock on `path`; its holder writes "pid P on HOST since TIME" into the file.

    `shared`: a file every user of the machine may lock (mode 0666 whatever the umask)."""

    def __init__(self, path: Path | str, shared: bool = False) -> None:
        self.path = lock_path(path)
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 if self.shared else 0o644)
        except OSError as e:
            raise UserError(
                f"Cannot create the lock file {self.path}: {e.strerror}; check that folder's permissions."
            ) from None
        if self.shared:
            try:
                os.fchmod(fd, 0o666)
            except PermissionError:  # another user's file: already shared when they made it
                pass
        try:
            _flock(fd, self.path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        since = datetime.now().astimezone()
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {since:%Y-%m-%d %H:%M:%S}"
        self.fd = fd
        try:  # best effort: on a full disk the lock still works, without its note
            os.pwrite(fd, holder.encode(), 0)
            os.ftruncate(fd, len(holder.encode()))
        except OSError:
            pass
        return True

    def wait(self, what: str, timeout: float = 120, notice_after: float = 5) -> None:
        """Take the lock, waiting: after `notice_after` s say who holds it, after `timeout` s give up."""
        start = time.monotonic()
        noticed = False
        while not self.acquire():
            waited = time.monotonic() - start
            if waited > timeout:
                raise UserError(
                    f"Gave up waiting for {what} after {timeout:.0f} s: {self.path} is held by "
                    f"{self.holder()}. "
                    "If that process is stopped (Ctrl-Z), resume it (`fg`, or `kill -CONT <pid>`) or end it."
                )
            if waited > notice_after and not noticed:
                print(f"Waiting for {what}: held by {self.holder()} ...", flush=True)
                noticed = True
            time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing our copy; a child that inherited it keeps the lock
            self.fd = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, with a note when that process is stopped."""
        try:
            text = self.path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"
        parts = text.split()
        if (
            len(parts) > 3
            and parts[0] == "pid"
            and parts[3] == socket.gethostname()
            and _is_stopped(parts[1])
        ):
            text += " (stopped)"
        return text

    def is_held(self) -> bool:
        """Whether some process holds the lock now (probing neither creates nor changes the file)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            _flock(fd, self.path, fcntl.LOCK_EX | fcntl.LOCK_NB)  # closes fd when locks are unsupported
        except BlockingIOError:
            os.close(fd)
            return True
        os.close(fd)
        return False

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(Lock):
    """A lock in a run folder: `runner.lock` (the runner, passed on to the training it starts) or
    `rank-N.lock` (each training process, `tinystories_lab.pretrain`)."""

    def __init__(self, out_dir: Path, name: str = "runner") -> None:
        super().__init__(Path(out_dir) / f"{name}.lock")
        self.out_dir = Path(out_dir)

    def acquire(self) -> bool:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"Cannot create the run folder {self.path.parent}: {e.strerror}.") from None
        return super().acquire()


def run_is_alive(out_dir: Path) -> bool:
    """Whether any process of a run (its runner or a training rank) still holds a lock in its folder."""
    return any(Lock(p).is_held() for p in lock_files(out_dir))


def run_processes(out_dir: Path) -> dict[int, Path]:
    """The live processes of a run on this host, each with the lock it holds: pids read from the held locks
    and kept only if that process really has the lock file open (a pid may have been reused since)."""
    found = {}
    for path in sorted(Path(out_dir).glob("*.lock")):
        parts = Lock(path).holder().split()
        if Lock(path).is_held() and len(parts) > 1 and parts[0] == "pid" and parts[1].isdigit():
            if holds_file(int(parts[1]), path):
                found[int(parts[1])] = path
    return found


def holds_file(pid: int, path: Path) -> bool:
    """Whether process `pid` (of this host) has `path` open: proof that the pid is still the process that
    took a lock in it, and not a later process given the same pid."""
    target = str(Path(path).resolve())
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def _is_stopped(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False
