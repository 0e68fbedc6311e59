"""Every file a job reads is one its submitter can read, proven by the kernel: clients hand open files over
(handover.sock, SCM_RIGHTS) and the daemon reads no path a client names. Members alice and bob, outsider
mallory, the daemon as root (it could read anything: each refusal below is its own)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.spool.spool import Spool
from shared.config import SpoolConfig
from shared.protocol import DatasetList, DatasetsReply
from tests.daemon_proc import wait_for
from tests.fixtures import pdfs
from tests.fixtures.tiny_dataset import write_dataset
from tests.trust.members import DEADLINE_S, Server, member_server

EXIT_USAGE, EXIT_NO_DAEMON = 2, 3


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with member_server() as s:
        yield s


@pytest.fixture(scope="module")
def bobs(server: Server) -> dict[str, Path]:
    """bob's private files (0600) in a folder everyone may enter, and a copy he submitted."""
    users = server.users
    folder = server.folder(users.bob, "bob")
    pdf = pdfs.numbered(folder / "salaries.pdf", 1)
    os.chown(pdf, users.bob.uid, users.bob.gid)
    pdf.chmod(0o600)
    dataset = write_dataset(folder / "ds", records=2, size=32)
    for path in [folder / "ds", *(folder / "ds").rglob("*")]:
        os.chown(path, users.bob.uid, users.bob.gid)
        path.chmod(0o700 if path.is_dir() else 0o600)
    return {"pdf": pdf, "sft": dataset["sft"], "image": next((folder / "ds" / "images").iterdir())}


def test_handover_sock_lies_beside_ctl_sock_with_its_mode_and_group(server: Server) -> None:
    for name in ("ctl.sock", "handover.sock"):
        st = os.stat(server.d.paths.runtime_dir / name)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, name
        assert st.st_gid == server.users.gid, name


def test_alice_cannot_convert_bobs_private_pdf_and_is_told_so_before_anything_is_sent(server: Server,
                                                                                   bobs: dict[str, Path]) -> None:
    before = server.job_ids()
    res = server.ftctl(server.users.alice, "submit", "ocr", str(bobs["pdf"]))
    assert res.returncode == EXIT_USAGE, (res.returncode, res.stderr)
    assert f"{server.users.alice.name} cannot read {bobs['pdf']} (permission denied)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert server.job_ids() == before
    digest = hashlib.sha256(bobs["pdf"].read_bytes()).hexdigest()
    assert not (server.d.paths.state_dir / "spool" / digest).exists()


def test_a_path_for_the_daemon_to_read_is_refused_whoever_sends_it(server: Server, bobs: dict[str, Path]) -> None:
    alice = server.users.alice
    before = server.job_ids()
    sent = server.request(alice, {"type": "submit", "kind": "ocr", "spec": {"file": str(bobs["pdf"])}})
    assert sent["code"] == "invalid_spec" and "reads only files handed over" in str(sent["message"])
    added = server.request(alice, {"type": "dataset_add", "name": "stolen", "file": str(bobs["sft"])})
    assert added["code"] == "invalid_spec" and "handed over" in str(added["message"])
    assert server.job_ids() == before
    assert server.d.client().call(DatasetList(), DatasetsReply).datasets == []


def test_knowing_the_hash_of_bobs_file_gives_alice_nothing(server: Server, bobs: dict[str, Path]) -> None:
    users = server.users
    res = server.ftctl(users.bob, "submit", "ocr", str(bobs["pdf"]), "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    digest = job["spec"]["sha256"]  # shown to every member (ftctl jobs --json)
    assert digest == hashlib.sha256(bobs["pdf"].read_bytes()).hexdigest()
    before = server.job_ids()
    for body in ({"type": "submit", "kind": "ocr", "spec": {"spool": digest, "name": "mine.pdf"}},
                 {"type": "ask_spooled", "question": "what?", "spool": digest, "name": "x.pdf"},
                 {"type": "dataset_add_spooled", "name": "stolen", "records": digest, "records_name": "x.json"}):
        answer = server.request(users.alice, body)
        assert answer["ok"] is False, (body, answer)
        if body["type"] != "ask_spooled":  # ask says first that no vision engine serves
            assert f"was handed over by {users.alice.name}" in str(answer["message"]), answer
    assert server.job_ids() == before
    assert server.d.client().call(DatasetList(), DatasetsReply).datasets == []


def test_only_a_file_opened_for_reading_is_taken(server: Server, bobs: dict[str, Path]) -> None:
    alice = server.users.alice
    # O_PATH needs no read permission at all: the daemon must not read through it
    through_path = server.hand(alice, "path", bobs["pdf"])
    assert through_path["ok"] is False and "not opened for reading" in str(through_path["message"])
    mine = server.own(alice, server.folder(alice, "alice-w") / "notes.pdf", b"%PDF-1.4\n%%EOF\n", mode=0o600)
    write_only = server.hand(alice, "write", mine)
    assert write_only["ok"] is False and "not opened for reading" in str(write_only["message"])
    for how, target in (("pipe", mine), ("dir", mine.parent)):
        answer = server.hand(alice, how, target)
        assert answer["ok"] is False and "not a regular file" in str(answer["message"]), answer
    good = server.hand(alice, "file", mine)
    assert good["ok"] is True and good["sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    spool = server.d.paths.state_dir / "spool"
    entry = spool / str(good["sha256"])
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700 and stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert (spool / f"{good['sha256']}.uids").read_text().split() == [str(alice.uid)]


def test_dataset_add_reads_records_and_images_with_the_members_own_rights(server: Server,
                                                                          bobs: dict[str, Path]) -> None:
    users = server.users
    res = server.ftctl(users.alice, "dataset", "add", "stolen", str(bobs["sft"]))
    assert res.returncode == EXIT_USAGE and f"{users.alice.name} cannot read {bobs['sft']}" in res.stderr
    # alice's own records naming one of bob's private images
    folder = server.folder(users.alice, "alice-ds")
    records = json.loads(bobs["sft"].read_text())[:1]
    records[0]["images"] = [str(bobs["image"])]
    mine = server.own(users.alice, folder / "mine.json", json.dumps(records).encode(), mode=0o644)
    res = server.ftctl(users.alice, "dataset", "add", "mine", str(mine))
    assert res.returncode == EXIT_USAGE, res.stderr
    assert f"record 0: images[0] {users.alice.name} cannot read {bobs['image']}" in res.stderr
    assert server.d.client().call(DatasetList(), DatasetsReply).datasets == []
    # bob adds his own: the registered records name the daemon's copies, not bob's folder
    res = server.ftctl(users.bob, "dataset", "add", "bobs", str(bobs["sft"]), timeout=DEADLINE_S)
    assert res.returncode == 0, res.stderr
    datasets = server.d.paths.state_dir / "datasets"
    registered = json.loads((datasets / "bobs.json").read_text())
    kept = [Path(p) for r in registered for p in r["images"]]
    assert kept and all(p.parent == datasets / "media" and p.is_file() for p in kept)
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in kept} == {p.name.split(".")[0] for p in kept}


def test_an_outsider_cannot_hand_anything_over(server: Server, bobs: dict[str, Path]) -> None:
    mallory = server.users.mallory
    mine = server.own(mallory, server.folder(mallory, "mallory") / "m.pdf", b"%PDF-1.4\n% mallory's\n%%EOF\n")
    res = server.ftctl(mallory, "submit", "ocr", str(mine))
    assert res.returncode == EXIT_NO_DAEMON, res.stderr
    assert "not allowed to connect" in res.stderr and server.users.group in res.stderr
    # defence in depth: a socket opened up by mistake still takes nothing from her
    sock, run = server.d.paths.handover_socket, server.d.paths.runtime_dir
    run.chmod(0o755)
    sock.chmod(0o666)
    try:
        answer = server.hand(mallory, "file", mine)
    finally:
        sock.chmod(0o660)
        run.chmod(0o750)
    assert answer["ok"] is False and "without taking" in str(answer["message"])
    wait_for(lambda: f"handover: refused {mallory.name}" in server.d.log_text(), DEADLINE_S, "the refusal logged")
    assert not (server.d.paths.state_dir / "spool" / hashlib.sha256(mine.read_bytes()).hexdigest()).exists()


def test_spool_entries_no_job_needs_go_after_keep_hours(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", SpoolConfig(keep_hours=1.0, min_free_gib=0.0))
    spool.prepare()
    entries = {}
    for name in ("held", "old", "fresh"):
        src = tmp_path / name
        src.write_bytes(name.encode() * 1000)
        fd = os.open(src, os.O_RDONLY)
        try:
            entries[name] = spool.put(fd, os.getuid())
        finally:
            os.close(fd)
    stale_temp = spool.root / ".in.deadbeef"
    stale_temp.write_bytes(b"half a copy a crash left")
    two_hours_ago = time.time() - 7200
    for path in (entries["held"].path, entries["old"].path, stale_temp):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert spool.collect(held={entries["held"].sha256}) == 1
    left = sorted(p.name for p in spool.root.iterdir())
    assert left == sorted(f"{entries[n].sha256}{suffix}" for n in ("held", "fresh") for suffix in ("", ".uids"))
    assert spool.lookup(entries["fresh"].sha256, os.getuid()) == entries["fresh"].path

