"""One train job over several Ray nodes: one Ray job per node (rank), seen by the train kind as one run.

Why torchrun per node and not LLaMA-Factory's ``USE_RAY``: with ``FORCE_TORCHRUN=1 NNODES NODE_RANK
MASTER_ADDR MASTER_PORT`` each node runs the same ``llamafactory-cli train job.yaml`` as a local multi-GPU job,
so the job's YAML, log, checkpoints, resume and graceful stop stay those of a local run, and the ftmllm
allocator chooses the nodes (its plan never over-commits a GPU and shows where each rank runs). ``USE_RAY``
puts the trainer inside Ray actors whose placement group asks for every GPU of the cluster and 10 CPUs per
GPU (upstream issue), bypassing that plan.

* Rank ``r`` is a Ray job pinned to the node the allocator chose for it (``ray.io/node-id``). Rank 0's node is
  MASTER_ADDR; the port is picked free on that node by rank 0's wrapper and handed to the others through
  a file in the job's shared directory (daemon/cluster/ray_jobs.py STOP_WRAPPER), since the daemon cannot
  know which port is free on another machine.
* Rank 0's output is the job's log (LLaMA-Factory logs on rank 0); rank r's goes to ``rank<r>.log`` beside it.
* The gang ends when its ranks have ended. A rank that fails, or whose node dies, stops the others: torch's
  collectives would otherwise wait for it until their timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from daemon.children.process import StopOutcome
from daemon.cluster.ray_jobs import RayRun


class RayGang:
    """The ranks of one multi-node job; shaped like :class:`RayRun` where the train kind uses it."""

    def __init__(self, ranks: Sequence[RayRun]) -> None:
        self.ranks = list(ranks)
        self._watch = asyncio.create_task(self._stop_all_when_one_fails(), name=f"gang-{ranks[0].submission_id}")

    @property
    def lead(self) -> RayRun:
        return self.ranks[0]

    @property
    def submission_id(self) -> str:
        return self.lead.submission_id

    @property
    def node_id(self) -> str:
        return self.lead.node_id

    @property
    def node_ids(self) -> list[str]:
        return [r.node_id for r in self.ranks]

    @property
    def status(self) -> str:
        """The first rank that did not succeed decides; SUCCEEDED only when every rank did."""
        for r in self.ranks:
            if r.status != "SUCCEEDED":
                return r.status
        return "SUCCEEDED"

    @property
    def message(self) -> str:
        return next((f"rank {n}: {r.message}" for n, r in enumerate(self.ranks) if r.message and
                     r.status in ("FAILED", "STOPPED")), self.lead.message)

    @property
    def exit_code(self) -> int | None:
        codes = [r.exit_code for r in self.ranks]
        return next((c for c in codes if c), codes[0])

    @property
    def returncode(self) -> int | None:
        codes = [r.returncode for r in self.ranks]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)

    @property
    def node_lost(self) -> bool:
        return any(r.node_lost for r in self.ranks)

    def alive(self) -> bool:
        return any(r.alive() for r in self.ranks)

    async def started(self) -> None:
        await asyncio.gather(*(r.started() for r in self.ranks))

    async def _stop_all_when_one_fails(self) -> None:
        waits = {asyncio.ensure_future(r.wait()): r for r in self.ranks}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(waits[t].status != "SUCCEEDED" for t in done) and pending:
                await asyncio.gather(*(waits[t].stop() for t in pending), return_exceptions=True)

    async def wait(self) -> int:
        await asyncio.gather(*(r.wait() for r in self.ranks))
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        rc = self.returncode
        assert rc is not None
        return rc

    async def stop(self, graceful_s: float = 0.0, term_s: float = 15.0, kill_s: float = 10.0) -> StopOutcome:
        """Every rank at once (each saves on its own node: the same step, as they run in lockstep)."""
        outcomes = await asyncio.gather(*(r.stop(graceful_s, term_s, kill_s) for r in self.ranks))
        lead = outcomes[0]
        how = "killed" if any(o.how == "killed" for o in outcomes) else lead.how
        return StopOutcome(how=how, returncode=self.returncode, seconds=max(o.seconds for o in outcomes))

    def signal_group(self, sig: object) -> None:
        for r in self.ranks:
            r.signal_group(sig)

    def close(self) -> None:
        self._watch.cancel()
        for r in self.ranks:
            r.close()
