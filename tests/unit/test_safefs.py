"""appliance.safefs: opening without following another user's links, bounded reads, and
removing trees of any depth. Runs as root: a link "another user" planted is one chowned to a
scratch uid."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import safefs
from appliance.errors import AipbxError
from appliance.fsutil import locked

OTHER = (54321, 54322)  # a scratch uid/gid standing for postgres or _aipbx

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A test that would block (a fifo opened for reading) fails instead of hanging."""

    def boom(*_: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    os.chmod(victim, 0o644)
    return victim


def _unchanged(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert victim.read_text() == "root's\n"


def _foreign_link(target: Path | str, link: Path) -> None:
    link.symlink_to(target)
    os.lchown(link, *OTHER)


# --- operator-named files ------------------------------------------------------------------


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * 10)
    assert safefs.read_input(f, 10) == b"x" * 10
    with pytest.raises(safefs.TooLarge, match="larger than 9 bytes"):
        safefs.read_input(f, 9)


@needs_root
def test_root_links_are_followed_another_users_are_not(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "mine").symlink_to(victim)
    assert safefs.read_input(tmp_path / "mine", 100) == b"root's\n"
    _foreign_link(victim, tmp_path / "theirs")
    with pytest.raises(safefs.BadInput, match="owned by uid 54321"):
        safefs.read_input(tmp_path / "theirs", 100)
    # a directory on the way that is another user's link: refused too
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f")
    _foreign_link(tmp_path / "d", tmp_path / "via")
    with pytest.raises(safefs.BadInput, match="not followed"):
        safefs.read_input(tmp_path / "via" / "f", 100)
    _unchanged(victim)


def test_dot_dot_after_a_link_is_resolved_from_its_target(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").write_text("in a")
    (tmp_path / "l").symlink_to(tmp_path / "a" / "b")
    assert safefs.read_input(tmp_path / "l" / ".." / "x", 10) == b"in a"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "socket"])
def test_what_is_not_a_regular_file_is_refused_unread(tmp_path: Path, kind: str) -> None:
    p = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "device":
        p.symlink_to("/dev/zero")  # root's link: followed, then refused as a device
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
    with pytest.raises(safefs.BadInput, match="not a regular file"):
        safefs.read_input(p, 1 << 20)


def test_missing_and_a_file_used_as_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        safefs.open_input(tmp_path / "nope")
    (tmp_path / "f").write_text("")
    with pytest.raises(FileNotFoundError):
        safefs.open_input(tmp_path / "f" / "x")


def test_not_utf8_names_the_byte(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_bytes(b"ok\n\xff")
    with pytest.raises(safefs.BadInput, match="byte 3"):
        safefs.read_input_text(f, 100)


def test_a_weird_name_is_shown_on_one_line(tmp_path: Path) -> None:
    assert safefs.shown("a\nb") == "'a\\nb'"
    assert safefs.shown("/x/y.dump") == "/x/y.dump"


# --- inside a directory another user writes ---------------------------------------------------


@needs_root
def test_read_at_never_follows(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    d = tmp_path / "pg"
    d.mkdir()
    (d / "x").symlink_to(victim)  # even a root-owned link: the name is reached from the fd
    fd = os.open(d, safefs.DIR_FLAGS)
    try:
        with pytest.raises(safefs.Unsafe, match="symlink"):
            safefs.read_at("x", fd, 100, where="x")
    finally:
        os.close(fd)


@needs_root
def test_make_dirs_creates_through_fds_and_refuses_a_foreign_link(tmp_path: Path) -> None:
    fd = safefs.make_dirs(tmp_path / "a" / "b" / "c", mode=0o700, owner=OTHER)
    os.close(fd)
    st = (tmp_path / "a" / "b" / "c").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (OTHER[0], 0o700)
    assert (tmp_path / "a").stat().st_uid == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _foreign_link(elsewhere, tmp_path / "home")
    with pytest.raises(safefs.Unsafe, match="not followed"):
        safefs.make_dirs(tmp_path / "home" / "backups", mode=0o700, owner=OTHER)
    assert list(elsewhere.iterdir()) == []


# --- the lock ------------------------------------------------------------------------------


@needs_root
def test_a_lock_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    lock = tmp_path / ".lock"
    _foreign_link(victim, lock)
    with pytest.raises(AipbxError, match="symlink"), locked(lock, "backup", owner=OTHER):
        pass
    _unchanged(victim)
    lock.unlink()
    _foreign_link(tmp_path / "dangling", lock)  # O_CREAT would create the target
    with pytest.raises(AipbxError, match="symlink"), locked(lock, "backup", owner=OTHER):
        pass
    assert not (tmp_path / "dangling").exists()


@needs_root
def test_a_lock_planted_as_a_hard_link_is_refused(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    os.link(victim, tmp_path / ".lock")
    with pytest.raises(AipbxError, match="2 names"), locked(tmp_path / ".lock", "b", owner=OTHER):
        pass
    _unchanged(victim)


@needs_root
def test_a_lock_is_given_to_its_owner_through_its_fd(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with locked(lock, "backup", owner=OTHER):
        assert lock.stat().st_uid == OTHER[0]


def test_a_fifo_as_lock_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(AipbxError, match="not a regular file"), locked(tmp_path / ".lock", "b"):
        pass


# --- removing trees ----------------------------------------------------------------------------


def test_remove_tree_of_any_depth(tmp_path: Path) -> None:
    top = tmp_path / "doomed"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # deeper than Python's recursion limit, longer than PATH_MAX
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    safefs.remove_tree(top)
    assert not os.path.lexists(top)


def test_remove_tree_removes_links_not_their_targets(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("p")
    top = tmp_path / "doomed"
    (top / "sub" / ".rm1").mkdir(parents=True)  # a name remove_tree uses itself
    (top / ".rm1").write_text("x")
    (top / "sub" / "to-dir").symlink_to(keep)
    (top / "to-file").symlink_to(keep / "precious")
    safefs.remove_tree(top)
    assert not os.path.lexists(top)
    assert (keep / "precious").read_text() == "p"
    link = tmp_path / "link"
    link.symlink_to(keep)
    safefs.remove_tree(link)  # a link at the top: the link goes, not what it points to
    assert not os.path.lexists(link) and (keep / "precious").exists()
    safefs.remove_tree(tmp_path / "absent")


@needs_root
def test_the_acme_probe_goes_through_no_link_of_www_data(tmp_path: Path) -> None:
    from appliance import acme

    webroot = tmp_path / "aipbx-acme"
    webroot.mkdir()
    elsewhere = tmp_path / "cron.d"
    elsewhere.mkdir()
    _foreign_link(elsewhere, webroot / ".well-known")
    with pytest.raises(AipbxError, match="not followed"):
        acme.probe_webroot(webroot, 9, "pbx.aipbx.test", timeout=1)
    assert list(elsewhere.iterdir()) == []
