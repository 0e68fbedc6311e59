"""What the training side needs of the supervised GPU engine (vLLM): the seam between the GPU allocator and
`ftctl deploy` on one side and the engine on the other.

daemon/engines/gpu_port.py implements :class:`GpuEngine` over the supervised ``vllm serve``; the daemon runs
without one (the CPU engine owns no GPU, so there is nothing to park and nothing to deploy into). Kept this
small on purpose: the allocator only needs to know where the engine sits and to park or wake it; deploy only
needs to load an adapter or swap the served model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from daemon.gpus.plan import EngineView
from daemon.jobs.base import Caller


class DeployError(Exception):
    """The engine refused a deploy; the message says why and what to do."""


class DeployForbidden(DeployError):
    """The name is another member's (names are namespaced by owner): the protocol's ``forbidden``."""


class GpuEngine(Protocol):
    def view(self, pids: bool = True) -> EngineView:
        """Where the engine sits now: its GPUs, state (running/sleeping/stopped/absent), whether it can
        sleep (vLLM's sleep mode; not on CPU), whether the scheduler parked it, and (``pids``) its processes'
        pids (a scan of /proc: asked for only when there are GPU processes to tell apart)."""
        ...

    async def park(self, how: Literal["sleep", "stop"], reason: str, gpus: tuple[int, ...] = ()) -> None:
        """Free the engine's GPUs for a job (sleep keeps the model in host memory; stop ends the server).
        Requests wait until :meth:`unpark`. ``gpus``: the ones the job needs; an engine of several servers
        parks only those on them (the others serve on), a single server parks whole."""
        ...

    async def unpark(self, reason: str) -> None:
        """Bring a parked engine back (wake, or start again)."""
        ...

    async def load_adapter(self, name: str, path: Path, caller: Caller) -> str:
        """Load a LoRA adapter at runtime as ``caller`` names it (a member's names are served under her own,
        ``alice/name``; the adapter is hers to replace or unload); returns a one-line message. Raises
        DeployError, DeployForbidden for a name that is another member's."""
        ...

    async def serve_model(self, path: Path) -> str:
        """Serve another model (a merged export) from now on: the engine restarts. Raises DeployError."""
        ...
