"""The hot folder reads only what the dropped file's owner could have handed over: it follows no link, the
job belongs to the file's owner, and a file someone else could have put there for its owner is refused
with the reason. The inbox is the system one (sticky, setgid, group-writable); the daemon runs as root."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.protocol import JobList, ListJobs
from tests.daemon_proc import wait_for
from tests.fixtures import pdfs
from tests.systemd.unix_users import Account
from tests.trust.members import DEADLINE_S, Server, member_server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with member_server() as s:
        yield s


def pdf_bytes(server: Server, words: int) -> bytes:
    tmp = pdfs.numbered(server.home / f"tmp-{words}.pdf", words)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def as_user(server: Server, who: Account, code: str, *args: str) -> None:
    res = server.run(who, ["-c", code, *args])
    assert res.returncode == 0, res.stderr


def ended(server: Server, name: str) -> Path | None:
    """Where a dropped file ended: done/… or failed/… (the entry itself, a link too), else None."""
    for where in (server.d.paths.done, server.d.paths.failed):
        for p in where.rglob(name):
            return p
    return None


def jobs_named(server: Server, name: str) -> list[str]:
    return [j.owner for j in server.d.client().call(ListJobs(all=True), JobList).jobs if j.name == name]


def test_the_job_of_a_dropped_file_belongs_to_its_owner(server: Server) -> None:
    alice = server.users.alice
    mine = server.own(alice, server.folder(alice, "alice-own") / "mine.pdf", pdf_bytes(server, 1), mode=0o640)
    as_user(server, alice, "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])", str(mine),
            str(server.d.paths.inbox / "mine.pdf"))
    where = wait_for(lambda: ended(server, "mine.pdf"), DEADLINE_S, "mine.pdf to be converted")
    assert server.d.paths.done in where.parents  # type: ignore[union-attr]
    assert jobs_named(server, "mine.pdf") == [alice.name]


def test_a_symlink_in_the_inbox_goes_to_failed_with_the_reason_and_nothing_is_read(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    secret = server.own(bob, server.folder(bob, "bob-link") / "secret.pdf", pdf_bytes(server, 2))
    before = secret.read_bytes()
    as_user(server, alice, "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(secret),
            str(server.d.paths.inbox / "link.pdf"))
    where = wait_for(lambda: ended(server, "link.pdf"), DEADLINE_S, "the link to be moved")
    assert isinstance(where, Path) and server.d.paths.failed in where.parents and where.is_symlink()
    reason = where.with_name("link.pdf.error.txt").read_text()
    assert "is a symbolic link" in reason and "What to do" in reason
    assert jobs_named(server, "link.pdf") == []
    assert not list(server.d.paths.outbox.rglob("link.*"))
    assert secret.read_bytes() == before
    assert not (server.d.paths.state_dir / "spool" / hashlib.sha256(before).hexdigest()).exists()


def test_a_hard_link_to_another_users_file_is_refused(server: Server) -> None:
    bob = server.users.bob
    secret = server.own(bob, server.folder(bob, "bob-hard") / "secret.pdf", pdf_bytes(server, 3))
    # as alice could where fs.protected_hardlinks is 0 (or the file is writable for her)
    os.link(secret, server.d.paths.inbox / "linked.pdf")
    where = wait_for(lambda: ended(server, "linked.pdf"), DEADLINE_S, "the hard link to be moved")
    assert isinstance(where, Path) and server.d.paths.failed in where.parents
    assert "has 2 hard links" in where.with_name("linked.pdf.error.txt").read_text()
    assert jobs_named(server, "linked.pdf") == []


def test_a_private_file_moved_in_by_someone_else_is_refused(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    shared = server.folder(alice, "shared-rw", mode=0o777)  # a folder anyone may write, no sticky bit
    secret = server.own(bob, shared / "payslip.pdf", pdf_bytes(server, 4), mode=0o600)
    # alice cannot read it, but may move it: renaming needs rights on the folders only
    as_user(server, alice, "import os, sys; os.rename(sys.argv[1], sys.argv[2])", str(secret),
            str(server.d.paths.inbox / "payslip.pdf"))
    where = wait_for(lambda: ended(server, "payslip.pdf"), DEADLINE_S, "the moved file to be refused")
    assert isinstance(where, Path) and server.d.paths.failed in where.parents
    reason = where.with_name("payslip.pdf.error.txt").read_text()
    assert f"is private to {bob.name}" in reason and "moved in" in reason and "cp" in reason
    assert jobs_named(server, "payslip.pdf") == []
    assert stat.S_IMODE(where.stat().st_mode) == 0o600 and where.stat().st_uid == bob.uid  # still bob's only


def test_a_file_of_a_user_outside_the_group_is_refused(server: Server) -> None:
    mallory = server.users.mallory
    dropped = server.own(mallory, server.d.paths.inbox / "outsider.pdf", pdf_bytes(server, 5), mode=0o644)
    assert dropped.exists()
    where = wait_for(lambda: ended(server, "outsider.pdf"), DEADLINE_S, "the outsider's file to be refused")
    assert isinstance(where, Path) and server.d.paths.failed in where.parents
    assert f"belongs to {mallory.name}, who may not use ftmllm" in where.with_name("outsider.pdf.error.txt").read_text()
    assert jobs_named(server, "outsider.pdf") == []


def test_a_linked_subfolder_is_neither_converted_nor_emptied(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    folder = server.folder(bob, "bob-dir", mode=0o755)
    secret = server.own(bob, folder / "inside.pdf", pdf_bytes(server, 6), mode=0o644)
    as_user(server, alice, "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(folder),
            str(server.d.paths.inbox / "elsewhere"))
    os.makedirs(server.d.paths.inbox / "real", exist_ok=True)
    after = server.own(alice, server.d.paths.inbox / "real" / "after.pdf", pdf_bytes(server, 7), mode=0o640)
    assert after.exists()
    # the inbox was re-scanned several times (rescan_s = 1) while after.pdf, dropped after the link, converted
    wait_for(lambda: ended(server, "after.pdf"), DEADLINE_S, "a file in a real subfolder to be converted")
    assert secret.exists() and jobs_named(server, "inside.pdf") == []
    assert not (server.d.paths.outbox / "elsewhere").exists()
