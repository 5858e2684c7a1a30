"""m2net_jax.workdir_lock: one job per workdir, a crashed job's lock broken, others' kept."""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from m2net_jax import user_errors, workdir_lock
from m2net_jax.workdir_lock import LockHolder, WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
        check=False,
    )


def write_lock(workdir, *, host: str, pid: int, text: str | None = None) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, workdir_lock.LOCK_NAME)
    holder = dict(host=host, pid=pid, since=time.time() - 3600, command="python -m old.job")
    with open(path, "w") as f:
        f.write(json.dumps(holder) if text is None else text)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_this_job_while_held_and_is_removed_after(tmp_path):
    workdir = tmp_path / "new" / "w"
    with WorkdirLock(workdir, command="python -m m2net_jax.main --workdir=w") as lock:
        assert lock.held
        holder = workdir_lock.read_holder(lock.path)
        assert holder.host == socket.gethostname() and holder.pid == os.getpid()
        assert holder.command == "python -m m2net_jax.main --workdir=w"
        assert abs(holder.since - time.time()) < 600
    assert not lock.held
    assert os.listdir(workdir) == []  # No lock and no temporary file left.


def test_lock_is_released_when_the_job_raises(tmp_path):
    with pytest.raises(ZeroDivisionError), WorkdirLock(tmp_path) as lock:
        raise ZeroDivisionError
    assert not os.path.exists(lock.path)
    with WorkdirLock(tmp_path):
        pass


def test_second_job_in_another_process_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path, command="python -m m2net_jax.main --workdir=first") as lock:
        proc = run_python(
            """
            import sys
            from m2net_jax.workdir_lock import WorkdirLock, WorkdirLockedError
            try:
                WorkdirLock(sys.argv[1]).acquire()
            except WorkdirLockedError as e:
                print(e)
                sys.exit(3)
            """,
            str(tmp_path),
        )
        assert proc.returncode == 3, proc.stderr
        message = proc.stdout
        assert message.startswith(f"Another job is using {tmp_path}: ")
        assert f"pid {os.getpid()} on {socket.gethostname()} since " in message
        assert "command: python -m m2net_jax.main --workdir=first" in message
        assert "another --workdir" in message
        assert workdir_lock.read_holder(lock.path).pid == os.getpid()  # Untouched.


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(WorkdirLockedError, match="Another job is using"):
        WorkdirLock(tmp_path).acquire()


def test_lock_of_a_killed_job_is_broken_with_a_warning(tmp_path, caplog):
    proc = run_python(
        """
        import os, signal, sys
        from m2net_jax.workdir_lock import WorkdirLock
        WorkdirLock(sys.argv[1], command="killed job").acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(tmp_path),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stale = workdir_lock.read_holder(tmp_path / workdir_lock.LOCK_NAME)
    assert stale.command == "killed job"
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        assert workdir_lock.read_holder(lock.path).pid == os.getpid()
    assert f"Breaking the stale lock {lock.path}: pid {stale.pid} on" in caplog.text


def test_stale_lock_file_of_a_dead_pid_on_this_host_is_broken(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, host=socket.gethostname(), pid=pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        assert workdir_lock.read_holder(lock.path).pid == os.getpid()
    assert f"pid {pid} on {socket.gethostname()}" in caplog.text


def test_lock_of_another_host_is_kept_with_the_command_that_removes_it(tmp_path):
    path = write_lock(tmp_path, host="other-host", pid=os.getpid())
    with pytest.raises(WorkdirLockedError) as info:
        WorkdirLock(tmp_path).acquire()
    message = str(info.value)
    assert f"pid {os.getpid()} on other-host since " in message
    assert "command: python -m old.job" in message
    assert f"This host ({socket.gethostname()}) cannot check whether it still runs" in message
    assert message.endswith(f"rm {path}")
    assert info.value.holder == workdir_lock.read_holder(path)  # Kept.
    assert user_errors.user_message(info.value) == message  # Printed without a traceback.


def test_unreadable_lock_is_kept_with_the_command_that_removes_it(tmp_path):
    path = write_lock(tmp_path, host="", pid=0, text="not json")
    with pytest.raises(WorkdirLockedError, match="does not say which job holds it") as info:
        WorkdirLock(tmp_path).acquire()
    assert str(info.value).endswith(f"rm {path}") and info.value.holder is None


@pytest.fixture
def no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", flock)


@pytest.mark.usefixtures("no_flock")
def test_without_flock_a_live_pid_on_this_host_keeps_its_lock(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid())
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getppid()} on"):
        WorkdirLock(tmp_path).acquire()


@pytest.mark.usefixtures("no_flock")
def test_without_flock_a_dead_pids_lock_is_broken_and_locking_still_excludes(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError, match="Another job is using"):
            WorkdirLock(tmp_path).acquire()


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src, dst)

    monkeypatch.setattr(workdir_lock.os, "link", link)
    with WorkdirLock(tmp_path, command="no links") as lock:
        assert workdir_lock.read_holder(lock.path).command == "no links"
        with pytest.raises(WorkdirLockedError, match="Another job is using"):
            WorkdirLock(tmp_path).acquire()
    assert os.listdir(tmp_path) == []


def test_removed_lock_is_released_without_error(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as lock:
        os.unlink(lock.path)
    assert "was removed or replaced while this job held it" in caplog.text


def test_url_workdir_is_used_unlocked_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING), WorkdirLock("gs://bucket/w") as lock:
        assert not lock.held
    assert "cannot be locked" in caplog.text


def test_holder_description_says_since_when():
    holder = LockHolder("h", 7, time.time() - 2 * 3600 - 5 * 60, "cmd")
    assert "(2 h 5 min ago)" in holder.describe()
