"""``selftest``: a job that exercises the daemon without any engine.

It emits ``steps`` progress updates at ``rate`` per second (durable events, stored) and optionally
``deltas`` text deltas per step (stream events), then succeeds, or fails if ``fail`` is set. It resumes
at the step it reached. Used by `ftctl submit selftest`, the benches and the protocol tests: a way to
check a daemon end to end on a box with no GPU and no model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from daemon.jobs.base import Caller, JobContext, JobFailed, Resources, SpecError
from shared.protocol import JobInfo, TextDelta

TICK_S = 0.005


class SelftestSpec(msgspec.Struct, forbid_unknown_fields=True):
    steps: int = 10
    rate: float = 10.0  # steps per second; 0 = as fast as possible
    deltas: int = 0  # text deltas per step
    fail: bool = False
    hold: bool = False  # stay running after the last step until canceled (for cancel/kill tests)
    resume: bool = True  # continue by itself after a daemon restart, or stay interrupted


class SelftestKind:
    kind = "selftest"

    def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        try:
            parsed = msgspec.convert(spec, SelftestSpec)
        except msgspec.ValidationError as exc:
            raise SpecError(f"selftest spec: {exc}; keys are steps, rate, deltas, fail, hold, resume") from None
        if parsed.steps < 0 or parsed.rate < 0:
            raise SpecError("selftest spec: steps and rate must be >= 0")
        return f"selftest {parsed.steps} steps", msgspec.to_builtins(parsed)

    def resources(self, job: JobInfo) -> Resources:
        return Resources(lane="selftest")

    def resumable(self, job: JobInfo) -> bool:
        return bool(job.spec.get("resume", True))

    async def run(self, ctx: JobContext) -> str:
        spec = msgspec.convert(ctx.job.spec, SelftestSpec)
        start = int(ctx.job.progress.done) if ctx.resumed else 0
        if start:
            ctx.note(f"resuming at step {start + 1} of {spec.steps}")
        ctx.reset_rate(start)
        t0 = last_yield = time.monotonic()
        for step in range(start + 1, spec.steps + 1):
            for i in range(spec.deltas):
                ctx.stream(TextDelta(key=f"{ctx.job.id}:1", text=f"tok{i} ", job_id=ctx.job.id, page_no=1))
            ctx.progress(step, spec.steps, "steps", note=f"step {step} of {spec.steps}")
            # pace against the start time in ticks of at least TICK_S: the steps of one tick share a loop
            # turn (and the store's group commit), as a real burst of page or loss events would
            now = time.monotonic()
            ahead = t0 + (step - start) / spec.rate - now if spec.rate > 0 else 0.0
            if ahead > TICK_S:
                await asyncio.sleep(ahead)
                last_yield = time.monotonic()
            elif now - last_yield > TICK_S:  # behind schedule: still let the loop breathe every tick
                await asyncio.sleep(0)
                last_yield = time.monotonic()
        if spec.fail:
            raise JobFailed("selftest asked to fail (spec fail=true); submit without --set fail=true")
        if spec.hold:
            await asyncio.Event().wait()
        return f"succeeded: {spec.steps} steps"
