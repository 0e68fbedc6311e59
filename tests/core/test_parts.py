"""Parts plug into the daemon one way (daemon/part.py): the daemon asks them, and refuses a double claim."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ctl.server import Handler
from daemon.daemon import Daemon
from daemon.jobs.base import Caller, JobKind
from daemon.jobs.selftest import SelftestKind
from daemon.part import Part, Shown
from shared.config import load_settings
from shared.protocol import EngineInfo, GpuInfo, Ping, Pong, Status

CALLER = Caller(user="alice", uid=1000)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(load_settings(None, tmp_path))
    try:
        yield d
    finally:
        d.router.close()
        d.events.close()
        d.ctx.term()
        d.store.close()


class Engines(Part):
    def shown(self) -> Shown:
        return Shown(engine=EngineInfo(kind="vllm", state="ready"))


class Gpus(Part):
    def shown(self) -> Shown:
        return Shown(gpus=[GpuInfo(index=0, name="H100")], gpu_note="1 GPUs")


class Quiet(Part):
    pass


def test_status_and_snapshots_show_what_the_parts_say(daemon: Daemon) -> None:
    assert daemon.on_status(Status(), CALLER).gpu_note == "no GPUs found"  # before any part says otherwise
    daemon.plug([Engines(), Gpus(), Quiet()], admission=None)
    status = daemon.on_status(Status(), CALLER)
    snap = daemon.snapshot()
    for shown in (status, snap):
        assert (shown.engine.kind, shown.engine.state) == ("vllm", "ready")
        assert [g.name for g in shown.gpus] == ["H100"] and shown.gpu_note == "1 GPUs"
    assert daemon.status_line().endswith("engine vllm ready")


def test_a_job_kind_or_request_claimed_twice_is_refused(daemon: Daemon) -> None:
    class Selftest(Part):
        def kinds(self) -> dict[str, JobKind]:
            return {"selftest": SelftestKind()}

    class Pinger(Part):
        def handlers(self) -> dict[type, Handler]:
            return {Ping: lambda _b, _c: Pong(ts=0.0)}

    with pytest.raises(RuntimeError, match="job kind selftest claimed by two parts"):
        daemon.plug([Selftest()], admission=None)
    with pytest.raises(RuntimeError, match="request Ping claimed by two parts"):
        daemon.plug([Pinger()], admission=None)
