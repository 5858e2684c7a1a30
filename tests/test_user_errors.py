"""m2net_jax.user_errors: user-facing errors print one line and exit 2; bugs keep tracebacks."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from m2net_jax import user_errors
from m2net_jax.user_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    ("code", "what", "fix"),
    [
        (errno.ENOSPC, "The disk holding /w/ckpt is full", "rerun the same command"),
        (errno.EDQUOT, "The disk quota for /w/ckpt is used up", "rerun the same command"),
        (errno.EROFS, "/w/ckpt is on a read-only file system", "writable directory"),
        (errno.EACCES, "Permission denied for /w/ckpt", "directory you own"),
    ],
)
def test_disk_errors_become_one_line_naming_the_path_and_the_fix(code, what, fix):
    message = user_errors.user_message(OSError(code, os.strerror(code), "/w/ckpt"))
    assert message.startswith(f"{what}: ") and fix in message
    assert "\n" not in message


def test_disk_error_without_a_filename_still_says_what_to_do():
    message = user_errors.user_message(OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith("The disk holding a file of this job is full: free space")


def test_other_os_errors_are_internal():
    assert user_errors.user_message(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None
    assert user_errors.user_message(OSError(errno.EIO, "I/O error", "/x")) is None


def test_disk_full_is_found_behind_a_librarys_wrapping_exception():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/ckpt/tmp")
        except OSError as cause:
            raise RuntimeError("Async save failed") from cause
    except RuntimeError as wrapped:
        assert user_errors.user_message(wrapped).startswith("The disk holding /w/ckpt/tmp")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/ckpt/tmp")
        except OSError:
            raise RuntimeError("unrelated") from None
    except RuntimeError as suppressed:
        assert user_errors.user_message(suppressed) is None


def test_user_error_prints_its_own_message():
    assert user_errors.user_message(UserError("Run X first.")) == "Run X first."


def test_internal_error_is_reraised_unchanged():
    bug = ZeroDivisionError("bug")

    def fail():
        raise bug

    with pytest.raises(ZeroDivisionError) as info:
        user_errors.run_reporting_user_errors(fail)
    assert info.value is bug


def test_return_value_and_arguments_pass_through():
    wrapped = user_errors.reporting_user_errors(lambda a, *, b: a + b)
    assert wrapped(1, b=2) == 3


def test_user_error_exits_2_with_its_message_on_stderr(capsys):
    def fail():
        raise UserError("Run X first.")

    with pytest.raises(SystemExit) as info:
        user_errors.run_reporting_user_errors(fail)
    assert info.value.code == user_errors.EXIT_STATUS == 2
    assert capsys.readouterr().err == "Error: Run X first.\n"


def _run_absl_main(body: str) -> subprocess.CompletedProcess:
    """Runs `body` as an absl main wrapped with `reporting_user_errors` in a real process."""
    script = textwrap.dedent(
        """
        import errno
        from absl import app
        from m2net_jax import user_errors

        @user_errors.reporting_user_errors
        def main(argv):
        {body}

        app.run(main)
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    return _run_python("-c", script)


def _run_python(*args: str) -> subprocess.CompletedProcess:
    """This interpreter on `args`, with the checkout importable; output captured."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
        check=False,
    )


@pytest.mark.parametrize(
    ("code", "first_words"),
    [
        (errno.ENOSPC, "The disk holding /w/ckpt is full"),
        (errno.EROFS, "/w/ckpt is on a read-only file system"),
        (errno.EACCES, "Permission denied for /w/ckpt"),
    ],
)
def test_absl_main_with_a_disk_error_prints_one_line_and_exits_2(code, first_words):
    proc = _run_absl_main(f"raise OSError({code}, 'strerror', '/w/ckpt')")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {first_words}: ")
    assert "Traceback" not in proc.stderr


def test_absl_main_with_an_internal_error_keeps_its_traceback():
    proc = _run_absl_main("raise KeyError('bug')")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'bug'" in proc.stderr


def _run_main(*flags: str) -> subprocess.CompletedProcess:
    return _run_python("-m", "m2net_jax.main", *flags)


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("--config.data.datset=x", "datset", '"dataset"'),
        ("--config.dta.dataset=x", "dta", '"data"'),
        ("--config.stages.policy.learning_rat=0.1", "learning_rat", '"learning_rate"'),
    ],
)
def test_an_override_of_a_key_the_config_lacks_is_one_line_with_the_suggestion(
    tmp_path, override, key, suggestion
):
    config = os.path.join(REPO, "m2net_jax", "configs", "r47.py") + ":smoke"
    proc = _run_main(f"--config={config}", override, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"Error: {override}: the config has no key {key!r}.")
    assert f"Did you mean {suggestion}" in errors[0]
    assert not (tmp_path / "w").exists()  # refused before any work


def test_a_value_of_the_wrong_type_keeps_absls_flag_error():
    config = os.path.join(REPO, "m2net_jax", "configs", "r47.py") + ":smoke"
    proc = _run_main(f"--config={config}", "--config.data.image_size=abc", "--workdir=/tmp/w")
    assert proc.returncode == 1
    assert "FATAL Flags parsing error: flag --config.data.image_size=abc" in proc.stderr
    assert "Traceback" not in proc.stderr
