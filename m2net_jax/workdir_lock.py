"""One job per workdir: a lock file that names the job holding it and is released when it ends.

Two jobs writing one workdir interleave their checkpoints and results and corrupt both runs, so
a job holds ``<workdir>/.lock`` while it runs (process 0 of a multi-process job; the caller
decides which process locks). The file is JSON: host, pid, start time and command line, so the
second job's error can say whom it met and what to do.

How it stays correct, and why `fcntl.flock` decides liveness rather than the pid:

- The lock appears with its contents: they are written and fsync-ed to a private temporary file
  that is then hard-linked to ``.lock``. ``link`` fails atomically when the name exists (also on
  NFS), so exactly one job wins, and nobody ever reads a half-written lock.
- The holder keeps an exclusive `flock` on the file while it runs. The kernel drops a flock when
  its process ends, however it ends (exception, SIGKILL, OOM kill, a crash), so on the host that
  wrote the lock a free flock proves the holder is gone, and the lock is broken with a warning.
  A pid test (``kill(pid, 0)``) cannot prove that: pids are reused, and a requeued container
  job restarts with the same low pids, so a dead job's pid often names a live process (a
  refused restart) or the job itself.
- Across hosts flock depends on the file system (NFS emulates it with POSIX locks; Lustre only
  with ``-o flock``; some FUSE mounts keep it local), so a free flock on a lock written by another
  host proves nothing. Such a lock is never broken automatically; the error gives the command
  that removes it.
- Where the file system refuses flock (ENOLCK, EOPNOTSUPP), a lock from this host falls back to
  the pid test, with its weakness; where it refuses hard links, to an exclusive create.

A workdir given as a URL (``gs://...``) cannot hold a POSIX lock; it is used unlocked, with a
warning.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import uuid

from absl import logging

from m2net_jax.user_errors import UserError

LOCK_NAME = ".lock"
# flock is not available on this file system (the lock still excludes; liveness uses the pid).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# Hard links are not available (FUSE, SMB, ...): create the lock file exclusively instead.
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
# Each failed attempt means another job changed the lock in between; a few settle it.
_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """The job a lock file names.

    Attributes:
      host: hostname of the holder.
      pid: its process id on that host.
      since: when it took the lock, seconds since the epoch.
      command: its command line.
    """

    host: str
    pid: int
    since: float
    command: str

    def describe(self) -> str:
        """``pid 123 on host-a since 2026-12-04T10:00:00+00:00 (2 h 5 min ago), command: ...``."""
        started = datetime.datetime.fromtimestamp(self.since).astimezone()
        ago = _duration(time.time() - self.since)
        return (
            f"pid {self.pid} on {self.host} since {started.isoformat(timespec='seconds')} "
            f"({ago} ago), command: {self.command}"
        )


class WorkdirLockedError(UserError):
    """Another job holds the workdir, or a lock this host cannot check is in the way.

    Attributes:
      path: the lock file.
      holder: the job it names, or None when it cannot be read.
    """

    def __init__(self, message: str, *, path: str, holder: LockHolder | None):
        super().__init__(message)
        self.path = path
        self.holder = holder


def read_holder(path: str | os.PathLike) -> LockHolder | None:
    """The job a lock file names, or None when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


class WorkdirLock:
    """Context manager holding ``<workdir>/.lock`` for one job; see the module docstring.

    Usage (process 0 only in a multi-process job)::

      with WorkdirLock(workdir):
          train.train_and_evaluate(config, workdir)

    Args:
      workdir: the job's directory; created if missing.
      command: the command line recorded in the lock; default: this process's.

    Raises (on entering):
      WorkdirLockedError: a live job holds the workdir, or its lock cannot be checked from here;
        the message names that job and how to proceed.
      OSError: the workdir cannot be created or written.
    """

    def __init__(self, workdir: str | os.PathLike, *, command: str | None = None):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.command = command if command is not None else shlex.join(sys.orig_argv)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, breaking a stale one from this host; see the class docstring."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock.")
        if "://" in self.workdir:
            logging.warning(
                "Workdir %s is not a local path and cannot be locked: make sure no other job "
                "uses it.",
                self.workdir,
            )
            return
        os.makedirs(self.workdir, exist_ok=True)
        me = LockHolder(socket.gethostname(), os.getpid(), time.time(), self.command)
        payload = json.dumps(dataclasses.asdict(me), indent=1).encode()
        for _ in range(_ATTEMPTS):
            try:
                self._fd = _create(self.path, payload)
            except FileExistsError:
                self._break_if_stale(me.host)
                continue
            logging.info("Locked %s for this job (pid %d on %s).", self.path, me.pid, me.host)
            return
        raise WorkdirLockedError(
            f"{self.path} kept changing while this job tried to take it {_ATTEMPTS} times: "
            f"several jobs are starting on {self.workdir}. Run one job per --workdir.",
            path=self.path,
            holder=read_holder(self.path),
        )

    def release(self) -> None:
        """Removes the lock file and drops the flock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                # Unlink before closing: while the flock is held nobody else can break the lock.
                os.unlink(self.path)
            else:
                logging.warning(
                    "%s was removed or replaced while this job held it; leaving it as it is.",
                    self.path,
                )
        finally:
            os.close(fd)

    def _break_if_stale(self, host: str) -> None:
        """Removes the lock at `path` if its holder is gone; raises if it may be alive.

        Returns normally (for another attempt) also when the lock changed in between.
        """
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return  # Released meanwhile.
        try:
            state = _try_flock(fd)  # Ours until `fd` closes, when 'free'.
            if not _same_file(fd, self.path):
                return  # Replaced meanwhile.
            holder = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            if state == "held":
                raise self._locked(holder, alive=True)
            if holder is None or holder.host != host:
                raise self._locked(holder, alive=None)
            if state == "unsupported" and _pid_alive(holder.pid):
                raise self._locked(holder, alive=True)
            logging.warning(
                "Breaking the stale lock %s: %s, which no longer runs (%s).",
                self.path,
                holder.describe(),
                "its flock was free" if state == "free" else f"no process {holder.pid}",
            )
            os.unlink(self.path)
        finally:
            os.close(fd)

    def _locked(self, holder: LockHolder | None, *, alive: bool | None) -> WorkdirLockedError:
        remove = (
            f"If no job uses {self.workdir} any more, remove the lock and rerun: rm {self.path}"
        )
        if holder is None and alive:
            message = (
                f"Another job is using {self.workdir} (it holds {self.path}, which names no job "
                "yet). Wait for it to finish, or give this job another --workdir."
            )
        elif holder is None:
            message = f"{self.path} exists but does not say which job holds it. {remove}"
        elif alive:
            message = (
                f"Another job is using {self.workdir}: {holder.describe()}. Wait for it to "
                f"finish, stop it (kill {holder.pid} on {holder.host}; it resumes from its "
                "checkpoint when rerun), or give this job another --workdir."
            )
        else:
            message = (
                f"{self.workdir} is locked by another host's job: {holder.describe()}. This host "
                f"({socket.gethostname()}) cannot check whether it still runs. {remove}"
            )
        return WorkdirLockedError(message, path=self.path, holder=holder)


def _create(path: str, payload: bytes) -> int:
    """Creates the lock file at `path` holding `payload`, flocked; returns its descriptor.

    Raises:
      FileExistsError: `path` exists.
    """
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_locked(fd, payload)
            os.link(tmp, path)
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LINK:
                raise
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.unlink(tmp)
    # No hard links here: an exclusive create, whose contents appear a moment after the name.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_locked(fd, payload)
    except BaseException:
        os.unlink(path)
        os.close(fd)
        raise
    return fd


def _write_locked(fd: int, payload: bytes) -> None:
    # A file nobody else has opened yet: the flock is 'free' (now ours) or 'unsupported'.
    _try_flock(fd)
    os.write(fd, payload)
    os.fsync(fd)


def _try_flock(fd: int) -> str:
    """Exclusive non-blocking flock: 'free' (taken now), 'held' (by another) or 'unsupported'."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return "unsupported"
        raise
    return "free"


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd` (no one removed or replaced it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Exists, owned by another user.
    return True


def _parse(text: str) -> LockHolder | None:
    try:
        d = json.loads(text)
        return LockHolder(str(d["host"]), int(d["pid"]), float(d["since"]), str(d["command"]))
    except (ValueError, KeyError, TypeError):
        return None


def _duration(seconds: float) -> str:
    minutes = max(0, int(seconds)) // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days"


@contextlib.contextmanager
def job_lock(workdir: str | os.PathLike):
    """The workdir lock for a whole JAX job: process 0 holds it, every process learns the outcome.

    In a multi-process job the other processes wait for process 0's attempt, so that a refused
    job stops on every host instead of leaving the others waiting in their first collective.

    Raises:
      WorkdirLockedError: on every process, when process 0 could not take the lock.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLockedError as error:
            refusal = error
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
        if refusal is None and int(refused):
            refusal = WorkdirLockedError(
                f"Process 0 could not lock {os.path.join(os.fspath(workdir), LOCK_NAME)}; see its "
                "log for the job that holds it.",
                path=os.path.join(os.fspath(workdir), LOCK_NAME),
                holder=None,
            )
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
