"""What the training side needs of the supervised GPU engine (vLLM): the seam between the GPU allocator and
`ftctl deploy` on one side and the engine on the other.

The engine part implements :class:`GpuEngine`; the daemon runs without one (the CPU engine owns no GPU,
so there is nothing to park and nothing to deploy into). Kept this small on purpose: the allocator only
needs to know where the engine sits and to park or wake it; deploy only needs to load an adapter or swap
the served model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from daemon.gpus.plan import EngineState, EngineView
from daemon.train.launch import group_members

if TYPE_CHECKING:
    from daemon.engines.vllm_supervisor import VllmSupervisor


class DeployError(Exception):
    """The engine refused a deploy; the message says why and what to do."""


class GpuEngine(Protocol):
    def view(self) -> EngineView:
        """Where the engine sits now: its GPUs, state (running/sleeping/stopped/absent), whether it can
        sleep (vLLM's sleep mode; not on CPU), whether the scheduler parked it, and its processes' pids."""
        ...

    async def park(self, how: Literal["sleep", "stop"], reason: str) -> None:
        """Free the engine's GPUs for a job (sleep keeps the model in host memory; stop ends the server).
        Requests wait until :meth:`unpark`."""
        ...

    async def unpark(self, reason: str) -> None:
        """Bring a parked engine back (wake, or start again)."""
        ...

    async def load_adapter(self, name: str, path: Path) -> str:
        """Load a LoRA adapter at runtime under ``name``; returns a one-line message. Raises DeployError."""
        ...

    async def serve_model(self, path: Path) -> str:
        """Serve another model (a merged export) from now on: the engine restarts. Raises DeployError."""
        ...


class SupervisedVllm:
    """:class:`GpuEngine` over the daemon's supervised ``vllm serve`` (daemon/engine_supervisor.py)."""

    def __init__(self, supervisor: VllmSupervisor) -> None:
        self.sup = supervisor

    def view(self) -> EngineView:
        sup = self.sup
        state: EngineState = ("sleeping" if sup.state == "sleeping" else
                              "running" if sup.state in ("ready", "starting", "restarting") or sup.running else
                              "stopped")
        pid = sup.pid
        # vLLM's engine core is a child in the server's process group: its GPU memory is the engine's too
        pids = tuple(group_members(pid)) if pid is not None else ()
        return EngineView(gpus=tuple(sup.gpu_indices), state=state, can_sleep=sup.cfg.enable_sleep_mode,
                          parked=sup.parked, pids=pids)

    async def park(self, how: Literal["sleep", "stop"], reason: str) -> None:
        if how == "sleep":
            await self.sup.sleep()
        else:
            await self.sup.stop(f"stopped to free its GPU for training ({reason})", parked=True)

    async def unpark(self, reason: str) -> None:
        await self.sup.wake()

    async def load_adapter(self, name: str, path: Path) -> str:
        from daemon.engines.vllm_supervisor import EngineCommandError

        try:
            return await self.sup.load_adapter(name, str(path))
        except EngineCommandError as exc:
            raise DeployError(str(exc)) from None

    async def serve_model(self, path: Path) -> str:
        """Restart vLLM on ``path`` under the same served name (clients and OCR jobs keep working)."""
        sup = self.sup
        old = sup.cfg.model
        sup.cfg = msgspec.structs.replace(sup.cfg, model=str(path), served_name=sup.served_name)
        await sup.stop(f"restarting to serve {path} instead of {old}")
        await sup.start()
        return (f"vLLM restarts serving {path} as '{sup.served_name}' (was {old}); until the next daemon start — "
                f"set vllm.model = \"{path}\" in the config to keep it")
