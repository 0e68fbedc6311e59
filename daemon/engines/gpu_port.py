"""The supervised ``vllm serve`` as the GPU allocator and `ftctl deploy` see it
(:class:`daemon.gpus.engine_port.GpuEngine`): where it sits, park and wake, load an adapter, serve a model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from daemon.children.process import group_members
from daemon.engines.vllm_supervisor import AdapterRefused, EngineCommandError, VllmSupervisor
from daemon.gpus.engine_port import DeployError, DeployForbidden
from daemon.gpus.plan import EngineState, EngineView
from daemon.jobs.base import Caller


class SupervisedVllm:
    def __init__(self, supervisor: VllmSupervisor) -> None:
        self.sup = supervisor

    def view(self, pids: bool = True) -> EngineView:
        sup = self.sup
        state: EngineState = ("sleeping" if sup.state == "sleeping" else
                              "running" if sup.state in ("ready", "starting", "restarting") or sup.running else
                              "stopped")
        pid = sup.pid
        # vLLM's engine core is a child in the server's process group: its GPU memory is the engine's too
        members = tuple(group_members(pid)) if pid is not None and pids else ()
        return EngineView(gpus=tuple(sup.gpu_indices), state=state, can_sleep=sup.cfg.enable_sleep_mode,
                          parked=sup.parked, pids=members)

    async def park(self, how: Literal["sleep", "stop"], reason: str, gpus: tuple[int, ...] = ()) -> None:
        if how == "sleep":
            await self.sup.sleep()
        else:
            await self.sup.stop(f"stopped to free its GPU for training ({reason})", parked=True)

    async def unpark(self, reason: str) -> None:
        await self.sup.wake()

    async def load_adapter(self, name: str, path: Path, caller: Caller) -> str:
        try:
            return await self.sup.load_adapter(name, str(path), user=caller.user, admin=caller.is_admin)
        except AdapterRefused as exc:
            raise DeployForbidden(str(exc)) from None
        except EngineCommandError as exc:
            raise DeployError(str(exc)) from None

    async def serve_model(self, path: Path) -> str:
        """Restart vLLM on ``path`` under the same served name (clients and OCR jobs keep working)."""
        sup = self.sup
        old = sup.cfg.model
        await sup.serve(path)
        return (f"vLLM restarts serving {path} as '{sup.served_name}' (was {old}); until the next daemon start — "
                f"set vllm.model = \"{path}\" in the config to keep it")
