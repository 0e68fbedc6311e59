"""The daemon writes only inside its own tree, never over another member's output, with the unit's umask;
fingerprints are its own; a PDF password is never shown, stored in the spec or taken from the command line.
Members alice and bob, the daemon as root with UMask 0027 (tests/trust/members.py)."""

from __future__ import annotations

import grp
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from shared.protocol import (
    TERMINAL_STATES,
    DatasetList,
    DatasetsReply,
    Done,
    JobChanged,
    JobDetail,
    PauseQueue,
    ResumeQueue,
    ShowJob,
)
from tests.daemon_proc import wait_for
from tests.fixtures import pdfs
from tests.trust.members import DEADLINE_S, Server, member_server

EXIT_USAGE = 2
SECRET = "correct horse battery staple"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with member_server() as s:
        yield s


def pdf_of(server: Server, who_folder: Path, name: str, pages: int, owner_uid: int, owner_gid: int) -> Path:
    path = pdfs.numbered(who_folder / name, pages)
    os.chown(path, owner_uid, owner_gid)
    path.chmod(0o640)
    return path


def finished(server: Server, job_id: int) -> JobDetail:
    c = server.d.client()
    return wait_for(lambda: (d := c.call(ShowJob(job_id=job_id), JobDetail)).job.state in TERMINAL_STATES and d,
                    DEADLINE_S, f"job {job_id} to end")  # type: ignore[return-value]


def test_out_dir_is_written_by_ftctl_with_the_users_own_rights(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    folder = server.folder(alice, "alice-out")
    pdf = pdf_of(server, folder, "letter.pdf", 2, alice.uid, alice.gid)
    res = server.ftctl(alice, "submit", "ocr", str(pdf), "--out-dir", str(folder / "out"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "succeeded"
    for name in ("letter.md", "letter.json"):
        assert (folder / "out" / name).stat().st_uid == alice.uid, name
    assert pdfs.page_word(2) in (folder / "out" / "letter.md").read_text()
    # a folder she may not write: refused before anything is submitted, and nothing lands there
    before = server.job_ids()
    registry = server.d.client().call(DatasetList(), DatasetsReply).datasets
    bobs = server.folder(bob, "bob-out")
    for target in (server.d.paths.state_dir / "datasets", bobs):
        res = server.ftctl(alice, "submit", "ocr", str(pdf), "--force", "--out-dir", str(target))
        assert res.returncode == EXIT_USAGE and f"--out-dir {target}" in res.stderr, res.stderr
    assert server.job_ids() == before and list(bobs.iterdir()) == []
    assert server.d.client().call(DatasetList(), DatasetsReply).datasets == registry


def test_names_and_folders_from_members_never_lead_out_of_the_outbox(server: Server) -> None:
    alice = server.users.alice
    pdf = pdf_of(server, server.folder(alice, "alice-names"), "doc.pdf", 1, alice.uid, alice.gid)
    handed = server.hand(alice, "file", pdf)
    assert handed["ok"] is True, handed
    for key, value in (("rel_dir", "../../state"), ("out_dir", str(server.d.paths.state_dir)),
                       ("sha256", "0" * 64), ("source", "hotfolder"), ("file", str(pdf))):
        answer = server.request(alice, {"type": "submit", "kind": "ocr",
                                        "spec": {"spool": handed["sha256"], "name": "doc.pdf", key: value}})
        assert answer["code"] == "invalid_spec" and f"'{key}'" in str(answer["message"]), answer
    state_before = sorted(p.name for p in server.d.paths.state_dir.iterdir())
    names = ["../../state/ftmllm.sqlite.pdf", "/etc/passwd.pdf", "a\x00b/../c.pdf", "dataset_info.pdf",
             "n" * 600 + ".pdf", "..", ".hidden.pdf", "sub/dir/x.pdf"]
    ids = []
    for name in names:
        answer = server.request(alice, {"type": "submit", "kind": "ocr",
                                        "spec": {"spool": handed["sha256"], "name": name, "force": True}})
        assert answer["ok"] is True, (name, answer)
        ids.append(answer["reply"]["job"]["id"])  # type: ignore[index]
    outbox = server.d.paths.outbox
    for name, job_id in zip(names, ids, strict=True):
        job = finished(server, job_id).job
        assert job.state == "succeeded", (name, job.error)
        md = Path(job.artifacts["markdown"])
        assert md.parent == outbox and md.is_file() and len(md.name.encode()) <= 255, (name, md)
        assert "/" not in job.spec["name"] and "\x00" not in job.spec["name"] and not job.spec["name"].startswith(".")
    assert sorted(p.name for p in server.d.paths.state_dir.iterdir()) == state_before
    assert not Path("/etc/passwd.md").exists()
    assert not any(p.is_dir() for p in outbox.iterdir() if p.name in ("sub", "state", ".."))


def test_a_link_planted_in_the_outbox_is_not_followed(server: Server) -> None:
    alice = server.users.alice
    target = server.folder(alice, "alice-target")
    (server.d.paths.outbox / "planted").symlink_to(target)  # as a member could where the outbox is hers
    (server.d.paths.inbox / "planted").mkdir()
    dropped = server.d.paths.inbox / "planted" / "x.pdf"
    pdfs.numbered(dropped, 6)  # page counts differ across this module: no two documents share content
    os.chown(dropped, alice.uid, alice.gid)
    where = wait_for(lambda: next(server.d.paths.failed.rglob("x.pdf"), None), DEADLINE_S, "x.pdf to fail")
    assert isinstance(where, Path)
    assert "symbolic link" in where.with_name("x.pdf.error.txt").read_text()
    assert list(target.iterdir()) == []


def test_another_members_output_is_never_replaced_and_outputs_keep_the_umask(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    bobs = pdf_of(server, server.folder(bob, "bob-report"), "report.pdf", 4, bob.uid, bob.gid)
    res = server.ftctl(bob, "submit", "ocr", str(bobs), "--wait", "--json")
    assert res.returncode == 0, res.stderr
    bob_md = Path(json.loads(res.stdout)["artifacts"]["markdown"])
    assert bob_md == server.d.paths.outbox / "report.md"
    before = bob_md.read_bytes()
    alices = pdf_of(server, server.folder(alice, "alice-report"), "report.pdf", 5, alice.uid, alice.gid)
    res = server.ftctl(alice, "submit", "ocr", str(alices), "--wait", "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert Path(job["artifacts"]["markdown"]).name == f"report.job{job['id']}.md"
    assert bob_md.read_bytes() == before
    for path in (bob_md, Path(job["artifacts"]["sidecar"])):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, (path, oct(st.st_mode))  # UMask 0027, no chmod 0644
        assert grp.getgrgid(st.st_gid).gr_name == server.users.group  # readable by members through the group


def test_a_forced_copy_does_not_take_over_the_fingerprint_of_the_first_conversion(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    doc = pdf_of(server, server.folder(bob, "bob-doc"), "doc.pdf", 3, bob.uid, bob.gid)
    first = server.ftctl(bob, "submit", "ocr", str(doc), "--wait", "--json")
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["id"]
    copy = server.own(alice, server.folder(alice, "alice-doc") / "copy.pdf", doc.read_bytes(), mode=0o600)
    forced = server.ftctl(alice, "submit", "ocr", str(copy), "--force", "--wait", "--json")
    assert forced.returncode == 0, forced.stderr
    again = server.ftctl(bob, "submit", "ocr", str(doc))
    assert again.returncode == EXIT_USAGE and f"already converted by job {first_id}" in again.stderr, again.stderr


def test_the_store_and_the_state_dir_are_the_daemons_only_whatever_the_umask(server: Server) -> None:
    state = server.d.paths.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = list(state.glob("ftmllm.sqlite*"))
    assert {p.name for p in files} >= {"ftmllm.sqlite", "ftmllm.sqlite-wal", "ftmllm.sqlite-shm"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    res = server.run(server.users.alice, ["-c", "import os, sys; os.listdir(sys.argv[1])", str(state)])
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_a_pdf_password_is_never_shown_stored_or_taken_from_the_command_line(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    locked = pdfs.encrypted(server.folder(alice, "alice-locked") / "locked.pdf", password=SECRET)
    os.chown(locked, alice.uid, alice.gid)
    before = server.job_ids()
    res = server.ftctl(alice, "submit", "ocr", str(locked), "--password", SECRET)
    assert res.returncode == EXIT_USAGE and "--password takes no value" in res.stderr
    assert server.job_ids() == before
    c = server.d.client()
    seen: list[bytes] = []
    events = c.events(("job.",))
    next(events)  # subscribed before the submit
    c.call(PauseQueue(), Done)
    try:
        res = server.ftctl(alice, "submit", "ocr", str(locked), "--password-file", "-", "--json", stdin=SECRET + "\n")
        assert res.returncode == 0, res.stderr
        job_id = json.loads(res.stdout)["id"]
        assert json.loads(res.stdout)["spec"]["password"] == "set"
        secret_file = server.d.paths.state_dir / "jobs" / str(job_id) / "password"
        assert secret_file.read_text() == SECRET and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        shown = server.ftctl(bob, "show", str(job_id))
        listed = server.ftctl(bob, "jobs", "--all", "--json")
        assert '"password": "set"' in shown.stdout and SECRET not in shown.stdout + listed.stdout
    finally:
        c.call(ResumeQueue(), Done)

    def collect() -> None:
        for ev in events:
            seen.append(msgspec.json.encode(ev))
            if isinstance(ev.body, JobChanged) and ev.body.job.id == job_id and ev.body.job.state in TERMINAL_STATES:
                return

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    reader.join(DEADLINE_S)
    job = finished(server, job_id).job
    assert job.state == "succeeded", job.error
    assert pdfs.ENCRYPTED_TEXT in Path(job.artifacts["markdown"]).read_text()
    assert not secret_file.exists()  # gone with the job
    assert seen and not any(SECRET.encode() in e for e in seen)
    job_log = server.d.paths.state_dir / "jobs" / str(job_id) / "job.log"
    for path in [*server.d.paths.state_dir.glob("ftmllm.sqlite*"), server.d.log_path, job_log]:
        assert SECRET.encode() not in path.read_bytes(), path
