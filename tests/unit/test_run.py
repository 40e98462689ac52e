"""appliance.run: the one subprocess helper. The children here are `python3 -c` and
/bin/sh -c (tests may use a shell; the product may not) simulating exit codes, binary
output, timeouts, background processes and pipes."""

from __future__ import annotations

import os
import pwd
import stat
import sys
import time
from pathlib import Path

import pytest

from appliance.errors import CommandError
from appliance.run import PipelineError, run, run_as, run_bytes, run_pipe

PY = sys.executable
ALL_BYTES = bytes(range(256))


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, within: float = 5) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


# --- run() --------------------------------------------------------------------------------


def test_run_errors_keep_their_messages(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as e:
        run(["/nonexistent/tool"])
    assert (e.value.returncode, e.value.stderr) == (127, "/nonexistent/tool: not found")
    assert e.value.message == "/nonexistent/tool exited with 127: /nonexistent/tool: not found"
    with pytest.raises(CommandError) as e:
        run(py("import time; time.sleep(10)"), timeout=0.5, hint="h")
    assert (e.value.returncode, e.value.stderr, e.value.hint) == (-1, "timed out after 0.5s", "h")
    with pytest.raises(CommandError) as e:
        run([*py("import sys; print('pw=s3cret', file=sys.stderr); sys.exit(3)"), "s3cret"],
            secrets=["s3cret"])  # fmt: skip
    assert e.value.returncode == 3 and e.value.stderr.strip() == "pw=***"
    assert e.value.argv[-1] == "***"


def test_run_a_file_that_is_not_executable_is_126(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o644)
    with pytest.raises(CommandError) as e:
        run([str(tool)])
    assert e.value.returncode == 126 and e.value.stderr == f"{tool}: Permission denied"


# --- run_bytes() ------------------------------------------------------------------------


def test_run_bytes_captures_binary_output_exactly() -> None:
    proc = run_bytes(py(f"import sys; sys.stdout.buffer.write({ALL_BYTES!r} * 3)"))
    assert proc.stdout == ALL_BYTES * 3 and proc.returncode == 0


def test_run_bytes_stdin_is_a_file_opened_here(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(ALL_BYTES * 4096)  # 1 MiB, more than a pipe holds
    src.chmod(0o600)
    echo = py("import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())")
    assert run_bytes(echo, stdin=src).stdout == ALL_BYTES * 4096
    # Without one, /dev/null: the child never waits on (or reads) our stdin.
    assert run_bytes(echo).stdout == b""


def test_run_bytes_stdin_file_is_opened_by_the_caller_not_the_child(tmp_path: Path) -> None:
    """The pg tools run as postgres on a file only root may open."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    secret = tmp_path / "root-only.bin"
    secret.write_bytes(b"\x00only root\xff")
    secret.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    argv = ["runuser", "-u", nobody.pw_name, "--", "cat"]
    assert run_bytes(argv, stdin=secret).stdout == b"\x00only root\xff"
    with pytest.raises(CommandError):
        run_bytes([*argv, str(secret)])


def test_run_bytes_failure_raises_with_stderr_else_stdout() -> None:
    with pytest.raises(CommandError) as e:
        run_bytes(
            py("import sys; sys.stderr.buffer.write(b'bad \\xff\\nlast line\\n'); sys.exit(4)")
        )
    assert e.value.returncode == 4
    assert e.value.stderr == "bad \ufffd\nlast line\n"
    assert e.value.message.endswith("exited with 4: last line")
    with pytest.raises(CommandError) as e:
        run_bytes(py("print('only on stdout'); raise SystemExit(2)"))
    assert e.value.stderr.strip() == "only on stdout"
    proc = run_bytes(py("raise SystemExit(5)"), check=False)
    assert proc.returncode == 5


def test_run_bytes_not_found_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as e:
        run_bytes(["no-such-tool-anywhere"], stdin=None)
    assert (e.value.returncode, e.value.stderr) == (127, "no-such-tool-anywhere: not found")
    src = tmp_path / "in"
    src.write_bytes(b"x")
    t0 = time.monotonic()
    with pytest.raises(CommandError) as e:
        run_bytes(py("import time; time.sleep(30)"), stdin=src, timeout=0.5)
    assert (e.value.returncode, e.value.stderr) == (-1, "timed out after 0.5s")
    assert time.monotonic() - t0 < 10


def test_run_bytes_masks_secrets_in_argv_and_error() -> None:
    with pytest.raises(CommandError) as e:
        run_bytes([*py("import sys; sys.exit('token hunter2')"), "hunter2"], secrets=["hunter2"])
    assert "hunter2" not in e.value.stderr and "hunter2" not in " ".join(e.value.argv)


# --- run_as() ---------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="run_as drops privileges: needs root")
NOBODY = "nobody"


@needs_root
def test_run_as_runs_as_the_user_with_exactly_the_environment() -> None:
    pw = pwd.getpwnam(NOBODY)
    proc = run_as(
        ["/bin/sh", "-c", "id -u; id -g; id -G; umask; /usr/bin/env; echo err >&2; pwd"],
        user=NOBODY,
        env={"PATH": "/usr/bin:/bin", "ONLY": "this"},
        cwd="/",
        umask=0o027,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[:4] == [str(pw.pw_uid), str(pw.pw_gid), str(pw.pw_gid), "0027"]
    env = sorted(ln for ln in lines[4:] if "=" in ln and not ln.startswith("PWD="))
    assert env == ["ONLY=this", "PATH=/usr/bin:/bin"]
    assert lines[-2:] == ["err", "/"]  # stderr interleaved in the order written
    assert proc.stderr == ""


@needs_root
def test_run_as_failure_codes_and_masked_output() -> None:
    argv = ["/bin/sh", "-c", "echo 'using s3cret'; exit 7"]
    proc = run_as(argv, user=NOBODY, env={}, cwd="/", check=False, secrets=["s3cret"])
    assert proc.returncode == 7 and proc.stdout == "using s3cret\n"  # as run(): raw
    with pytest.raises(CommandError) as e:
        run_as(argv, user=NOBODY, env={}, cwd="/", secrets=["s3cret"])
    assert e.value.returncode == 7 and e.value.stderr == "using ***\n"
    with pytest.raises(CommandError) as e:
        run_as(["./no-such-migrate"], user=NOBODY, env={}, cwd="/")
    assert (e.value.returncode, e.value.stderr) == (127, "./no-such-migrate: not found")
    with pytest.raises(CommandError) as e:
        run_as(["true"], user="no-such-user-here", env={}, cwd="/")
    assert e.value.returncode == 126


@needs_root
def test_run_as_a_missing_working_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "release-gone"
    with pytest.raises(CommandError) as e:
        run_as(["/bin/true"], user=NOBODY, env={}, cwd=missing)
    assert (e.value.returncode, e.value.stderr) == (127, f"{missing}: not found")


@needs_root
def test_run_as_timeout_kills_its_whole_process_group() -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandError) as e:
        run_as(
            ["/bin/sh", "-c", "sleep 60 & echo $!; sleep 60"],
            user=NOBODY,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            timeout=1.0,
        )
    assert time.monotonic() - t0 < 10
    assert e.value.returncode == -1
    first, last = e.value.stderr.splitlines()[0], e.value.stderr.splitlines()[-1]
    assert last == "timed out after 1s"
    assert e.value.message.endswith("exited with -1: timed out after 1s")
    assert wait_gone(int(first)), "the background sleep survived the timeout"


@needs_root
def test_run_as_kills_what_it_left_running_after_a_normal_exit() -> None:
    t0 = time.monotonic()
    proc = run_as(
        ["/bin/sh", "-c", "sleep 60 & echo $!"],
        user=NOBODY,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    assert time.monotonic() - t0 < 10  # the background sleep holding stdout blocks nothing
    assert wait_gone(int(proc.stdout.strip()))


# --- run_pipe() ---------------------------------------------------------------------------

ECHO = py("import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())")


def keep(path: Path, then: str = "") -> list[str]:
    """A second that writes all its input to `path`, then runs `then`."""
    return py(
        f"import sys; open({str(path)!r}, 'wb').write(sys.stdin.buffer.read()); sys.stdout.flush()"
        + (f"; {then}" if then else "")
    )


def test_run_pipe_relays_head_everything_then_tail(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    data = ALL_BYTES * 40000  # 10 MiB: far more than a pipe holds, in both directions
    src.write_bytes(data)
    first, second = run_pipe(ECHO, ECHO, stdin=src, head=b"BEGIN;\n", tail=b"COMMIT;\n")
    assert second.stdout == b"BEGIN;\n" + data + b"COMMIT;\n"
    assert (first.returncode, second.returncode, first.stdout) == (0, 0, b"")


def test_run_pipe_without_stdin_reads_dev_null(tmp_path: Path) -> None:
    _, second = run_pipe(ECHO, ECHO, head=b"h", tail=b"t")
    assert second.stdout == b"ht"


def test_run_pipe_first_failing_gets_no_tail_and_is_reported(tmp_path: Path) -> None:
    got = tmp_path / "got"
    fail = py("import sys; sys.stdout.write('partial'); sys.exit('pg_restore: corrupt block')")
    with pytest.raises(PipelineError) as e:
        run_pipe(fail, keep(got), head=b"BEGIN;", tail=b"COMMIT;", hint="h")
    assert (e.value.stage, e.value.returncode, e.value.hint) == (0, 1, "h")
    assert e.value.stderr.strip() == "pg_restore: corrupt block"
    assert got.read_bytes() == b"BEGIN;partial"  # no COMMIT


def test_run_pipe_the_firsts_failure_is_not_hidden_by_the_seconds(tmp_path: Path) -> None:
    got = tmp_path / "got"
    fail = py("import sys; sys.stdout.write('x'); sys.exit('first: the cause')")
    second = keep(got, "sys.exit('second: a consequence')")
    with pytest.raises(PipelineError) as e:
        run_pipe(fail, second)
    assert e.value.stage == 0 and e.value.stderr.strip() == "first: the cause"


def test_run_pipe_second_stopping_kills_the_first_and_is_reported() -> None:
    endless = py("import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)")
    stop = py("import sys; sys.stdin.buffer.read(10); sys.exit('psql: ERROR: lock timeout')")
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as e:
        run_pipe(endless, stop, head=b"BEGIN;", tail=b"COMMIT;", timeout=30)
    assert time.monotonic() - t0 < 10
    assert (e.value.stage, e.value.returncode) == (1, 1)
    assert e.value.message.endswith("exited with 1: psql: ERROR: lock timeout")


def test_run_pipe_second_exiting_0_without_reading_everything_fails() -> None:
    endless = py("import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)")
    with pytest.raises(PipelineError) as e:
        run_pipe(endless, py("pass"), timeout=30)
    assert (e.value.stage, e.value.returncode) == (1, 0)
    assert "stopped reading its input" in e.value.message


def test_run_pipe_timeout_kills_both(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as e:
        run_pipe(py("import time; time.sleep(60)"), ECHO, timeout=0.5)
    assert (e.value.stage, e.value.returncode) == (0, -1)
    assert e.value.stderr == "timed out after 0.5s"
    # The first done, the second stuck (it does not read): the second is named.
    with pytest.raises(PipelineError) as e:
        run_pipe(py("print('x')"), py("import time; time.sleep(60)"), timeout=1)
    assert (e.value.stage, e.value.returncode) == (1, -1)
    assert time.monotonic() - t0 < 15


def test_run_pipe_not_found_names_the_stage_and_stops_the_first() -> None:
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as e:
        run_pipe(py("import time; time.sleep(60)"), ["no-such-psql"], timeout=60)
    assert (e.value.stage, e.value.returncode) == (1, 127)
    assert e.value.stderr == "no-such-psql: not found"
    assert time.monotonic() - t0 < 10
    with pytest.raises(PipelineError) as e:
        run_pipe(["no-such-pg_restore"], ECHO)
    assert (e.value.stage, e.value.returncode) == (0, 127)


def test_run_pipe_masks_secrets(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as e:
        run_pipe(ECHO, [*py("import sys; sys.exit('password=pw0rd')"), "pw0rd"], secrets=["pw0rd"])
    assert "pw0rd" not in e.value.stderr and "pw0rd" not in " ".join(e.value.argv)


def test_run_pipe_stdin_is_opened_here(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"abc")
    src.chmod(stat.S_IRUSR)
    _, second = run_pipe(ECHO, ECHO, stdin=src)
    assert second.stdout == b"abc"
