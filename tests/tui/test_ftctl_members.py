"""Whose jobs the queue commands touch (issue 16), with real Unix users running the real ftctl as themselves:
``cancel --mine`` cancels only the caller's jobs; ``rm``, ``clean`` and ``cancel`` follow the owner-or-admin
rule."""

from __future__ import annotations

import json

from shared.protocol import JobDetail, ShowJob
from tests.daemon_proc import wait_for
from tests.systemd.unix_users import Account
from tests.trust.members import DEADLINE_S, Server, member_server


def held_job(server: Server, who: Account) -> int:
    answer = server.request(who, {"type": "submit", "kind": "selftest",
                                  "spec": {"steps": 1, "rate": 0, "hold": True}})
    assert answer["ok"], answer
    job_id = int(answer["reply"]["job"]["id"])  # type: ignore[index]
    wait_for(lambda: state(server, job_id) == "running", DEADLINE_S, f"job {job_id} running")
    return job_id


def state(server: Server, job_id: int) -> str:
    return server.d.client().call(ShowJob(job_id=job_id), JobDetail).job.state


def test_cancel_mine_and_removal_touch_only_the_callers_jobs() -> None:
    with member_server() as server:
        alice, bob = server.users.alice, server.users.bob
        alices = [held_job(server, alice), held_job(server, alice)]
        bobs = held_job(server, bob)

        r = server.ftctl(bob, "cancel", str(alices[0]))
        assert r.returncode == 4 and alice.name in r.stderr
        assert state(server, alices[0]) == "running"

        r = server.ftctl(alice, "cancel", "--mine", "-y", "--json")
        assert r.returncode == 0, r.stderr
        assert sorted(x["id"] for x in json.loads(r.stdout)) == alices
        for job_id in alices:
            wait_for(lambda j=job_id: state(server, j) == "canceled", DEADLINE_S, f"job {job_id} canceled")
        assert state(server, bobs) == "running"

        # bob may not remove alice's jobs either; his clean-up leaves hers alone
        r = server.ftctl(bob, "rm", str(alices[0]))
        assert r.returncode == 4 and alice.name in r.stderr
        r = server.ftctl(bob, "cancel", "--mine", "-y")
        assert r.returncode == 0
        wait_for(lambda: state(server, bobs) == "canceled", DEADLINE_S, "bob's job canceled")
        r = server.ftctl(bob, "clean", "--older-than", "0", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["job_ids"] == [bobs]
        assert server.job_ids() == alices
        r = server.ftctl(alice, "rm", *map(str, alices), "-y")
        assert r.returncode == 0, r.stderr
        assert server.job_ids() == []
