"""One command run as a Ray job (Ray Jobs: ``JobSubmissionClient``), seen by the daemon like a local child.

* Start: ``submit_job`` with the command as the entrypoint and the GPUs as ``entrypoint_num_gpus``; Ray starts
  it on a node that has them (the node sets CUDA_VISIBLE_DEVICES). The submission id is the ftmllm job id
  (``<id>.<attempt>.<n>`` for a later run of the same job, since Ray never reuses one; see train.py).
* Its output streams (``tail_job_logs``) into the job's log; its state is polled (``get_job_info``).
* Stop: Ray's ``stop_job`` sends SIGTERM to the entrypoint and to every process under it, waits
  ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s unless the job's env says otherwise; read by the job's supervisor, which
  runs with the job's env_vars) and then sends SIGKILL. LLaMA-Factory does not save on SIGTERM: it saves on
  SIGABRT in LlamaBoard mode (daemon/train/launch.py). So the entrypoint is :data:`STOP_WRAPPER`: it ignores
  SIGTERM for itself and, by inheritance, for the trainer, and turns the SIGTERM it gets into SIGABRT for the
  processes under it that catch SIGABRT; the job's wait time is the config's graceful_stop_s.
* A job whose node dies ends FAILED without an exit code (its supervisor actor died with the node): that is
  :attr:`RayRun.node_lost`, not the trainer's failure. Where the node's machine lives on (only its raylet
  died), the wrapper sees the raylet or its parent, Ray's supervisor, go and kills the trainer: the job runs
  again elsewhere from its checkpoint, and two trainers must never write one job's folder. A supervisor that
  exits takes the process it started with it, not that process's children: so that process only waits, and the
  one that watches and holds the trainer is its child.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.children.process import StopHow, StopOutcome

POLL_S = 0.5
LOG_CATCH_UP_S = 10.0  # how long a job's end waits for the rest of its log
# what a wrapper exits with when it stopped its work because its node left the cluster (EX_TEMPFAIL)
NODE_LEFT_EXIT = 75
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its id as this label

# The start of every Ray job's wrapper (this module's and daemon/cluster/replicas.py's), stdlib only: the node
# needs nothing of ftmllm.
NODE_GUARD = r"""
import os, signal, subprocess, sys, threading, time
watched = []  # (pid, start time): the process Ray started, Ray's supervisor (its parent), the raylet (its)
def guarded():
    # When Ray's supervisor exits (it may, soon after its raylet is gone) the process it started is killed with
    # it, and that process's children are not: so that process only waits (deaf to Ray's SIGTERM, which reaches
    # every process under it), and its child, the guard, runs the work and watches the node (seen here: a
    # trainer orphaned that way ran to its end on a node that had left). Watched from before the work starts.
    supervisor = os.getppid()
    raylet = stat(supervisor)[0]
    watched.extend((pid, stat(pid)[1]) for pid in (os.getpid(), supervisor, raylet) if pid)
    guard = os.fork()
    if guard:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _, status = os.waitpid(guard, 0)
        rc = os.waitstatus_to_exitcode(status)
        sys.exit(128 - rc if rc < 0 else rc)
def stat(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        # parent pid; start time, or None once it is a zombie (dead, not yet reaped by its own parent)
        return int(fields[1]), None if fields[0] == 'Z' else fields[19]
    except (OSError, IndexError, ValueError):
        return None, None
def watch_node(child, stop_here, what):
    # one of the watched gone: the node left the cluster and the job runs again elsewhere; what it ran must not
    # go on here (a trainer would write into the same shared folder; a replica would hold its GPU). A supervisor
    # outlives its killed raylet for as long as it likes.
    while child.poll() is None:
        if any(stat(pid)[1] != started for pid, started in watched):
            print(f'ftmllm: the Ray node this job ran on left the cluster: stopping {what} here', flush=True)
            stop_here()
            return
        time.sleep(0.5)
""" + f"NODE_LEFT_EXIT = {NODE_LEFT_EXIT}\n"

# Run as `python -c STOP_WRAPPER argv...` on the node.
STOP_WRAPPER = NODE_GUARD + r"""
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: Ray's SIGTERM reaches the trainer too
# LLaMA-Factory runs `torchrun` by name: the one of its own venv, whatever the node's PATH
os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', os.defpath)
port_file = os.environ.get('FTMLLM_PORT_FILE')
if port_file:  # a multi-node job: rank 0 picks a free port on its node and tells the others (shared_dir)
    if os.environ.get('NODE_RANK') == '0':
        import socket
        with socket.socket() as s:
            s.bind(('', 0))
            port = str(s.getsockname()[1])
        with open(port_file + '.tmp', 'w') as f:
            f.write(port)
        os.replace(port_file + '.tmp', port_file)
    else:
        deadline = time.monotonic() + float(os.environ.get('FTMLLM_PORT_WAIT_S', '600'))
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                sys.exit('ftmllm: rank 0 did not start within FTMLLM_PORT_WAIT_S; see its log')
            time.sleep(0.2)
        with open(port_file) as f:
            port = f.read().strip()
    os.environ['MASTER_PORT'] = port
    print(f"ftmllm: node rank {os.environ.get('NODE_RANK')} of {os.environ.get('NNODES')}, master "
          f"{os.environ.get('MASTER_ADDR')}:{port}", flush=True)
guarded()
child = subprocess.Popen(sys.argv[1:])
def under(root):
    kids = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    kids.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out
def catches_abort(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            mask = next(int(l.split()[1], 16) for l in f if l.startswith('SigCgt:'))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(mask & (1 << (signal.SIGABRT - 1)))
def stop(_sig, _frame):
    print('ftmllm: stop asked: SIGABRT to the trainer, which stops at its next step and saves', flush=True)
    for pid in under(child.pid):
        if catches_abort(pid):
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
signal.signal(signal.SIGTERM, stop)
def node_left():
    left.append(True)
    for pid in reversed(under(child.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
left = []
threading.Thread(target=watch_node, args=(child, node_left, 'the trainer'), daemon=True).start()
rc = child.wait()
if left:
    sys.exit(NODE_LEFT_EXIT)
sys.exit(128 - rc if rc < 0 else rc)
"""


def entrypoint(python: str, argv: Sequence[str]) -> str:
    """The shell command Ray runs: ``argv`` under :data:`STOP_WRAPPER`."""
    return shlex.join([python, "-c", STOP_WRAPPER, *argv])


def python_beside(cli: str) -> str:
    """The interpreter of the venv that holds ``cli`` (LLaMA-Factory's), which the node runs the wrapper with."""
    beside = Path(cli).parent / "python"
    return str(beside) if beside.exists() else "python3"


@dataclass
class RayRun:
    """A submitted Ray job, shaped like daemon.children.process.ChildProcess where the train kinds use it:
    ``returncode``, ``wait()``, ``stop()``, ``alive()``."""

    client: Any  # ray.job_submission.JobSubmissionClient
    submission_id: str
    log_path: Path
    status: str = "PENDING"
    message: str = ""
    node_id: str = ""
    exit_code: int | None = None
    _done: asyncio.Event | None = None
    _tasks: tuple[asyncio.Task[None], ...] = ()
    _logged: int = 0  # characters of the job's log written to log_path
    _caught_up: asyncio.Task[None] | None = None

    @classmethod
    async def submit(cls, client: Any, *, submission_id: str, command: str, gpus: int, env: Mapping[str, str],
                     log_path: Path, cwd: Path | None = None, node_id: str | None = None) -> RayRun:
        """``node_id``: run it on that node (the one whose GPUs the allocator chose), else where Ray likes."""
        runtime_env: dict[str, Any] = {"env_vars": dict(env)}
        if cwd is not None:
            # exec: the wrapper's parent is Ray's job supervisor itself, whose end the wrapper watches
            command = f"cd {shlex.quote(str(cwd))} && exec {command}"
        await asyncio.to_thread(client.submit_job, entrypoint=command, submission_id=submission_id,
                                runtime_env=runtime_env, entrypoint_num_gpus=gpus or None, entrypoint_num_cpus=1,
                                entrypoint_label_selector={NODE_ID_LABEL: node_id} if node_id else None)
        run = cls(client=client, submission_id=submission_id, log_path=log_path, _done=asyncio.Event())
        log_path.parent.mkdir(parents=True, exist_ok=True)
        run._tasks = (asyncio.create_task(run._watch(), name=f"ray-{submission_id}"),
                      asyncio.create_task(run._stream_log(), name=f"ray-log-{submission_id}"))
        return run

    @property
    def terminal(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")

    @property
    def returncode(self) -> int | None:
        """None while it runs; the entrypoint's exit status after, 0 for a stop that ended cleanly, and 1 when
        Ray gives none (the job failed before or around its command: the node died, the env failed)."""
        if not self.terminal:
            return None
        if self.exit_code is not None:
            return self.exit_code
        return 0 if self.status in ("SUCCEEDED", "STOPPED") else 1

    @property
    def node_lost(self) -> bool:
        """Ended FAILED with no exit code after it had started (its node, or its supervisor, died), or with the
        wrapper's :data:`NODE_LEFT_EXIT` (the node's raylet died and the wrapper stopped the trainer)."""
        return self.status == "FAILED" and bool(self.node_id) and self.exit_code in (None, NODE_LEFT_EXIT)

    def alive(self) -> bool:
        return not self.terminal

    async def _watch(self) -> None:
        assert self._done is not None
        try:
            while True:
                try:
                    info = await asyncio.to_thread(self.client.get_job_info, self.submission_id)
                except Exception as exc:  # the head restarting: keep asking, the job may well still run
                    self.message = f"Ray does not answer: {exc}"
                    await asyncio.sleep(POLL_S * 4)
                    continue
                self.status = str(getattr(info.status, "value", info.status))
                self.message = info.message or ""
                self.node_id = info.driver_node_id or self.node_id
                self.exit_code = info.driver_exit_code
                if self.terminal:
                    return
                await asyncio.sleep(POLL_S)
        finally:
            self._done.set()

    async def _stream_log(self) -> None:
        with contextlib.suppress(Exception):  # a lost log stream must not end the job; its state decides
            async for chunk in self.client.tail_job_logs(self.submission_id):
                self._append_log(chunk)

    def _append_log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(text)
        self._logged += len(text)

    async def _catch_up_log(self) -> None:
        """Ray's log stream can end short of the log (seen under load: a canceled trainer's last steps and its
        save were missing although Ray had them): the whole log, asked once at the end, fills in the rest."""
        with contextlib.suppress(Exception):  # its node, or the head, gone: what was streamed stays
            full = await asyncio.wait_for(asyncio.to_thread(self.client.get_job_logs, self.submission_id),
                                          LOG_CATCH_UP_S)
            if len(full) > self._logged:
                self._append_log(full[self._logged:])

    async def started(self) -> None:
        """Until Ray runs the command (or the job ended before): PENDING may last while Ray waits for GPUs."""
        assert self._done is not None
        while self.status == "PENDING" and not self._done.is_set():
            await asyncio.sleep(POLL_S / 5)

    async def wait(self) -> int:
        assert self._done is not None
        await self._done.wait()
        # the last lines: the log stream ends by itself once Ray has them all, and what it missed is asked for
        await asyncio.wait({self._tasks[1]}, timeout=LOG_CATCH_UP_S)
        self._tasks[1].cancel()
        if self._caught_up is None:  # once, however many wait (a gang waits on each rank twice)
            self._caught_up = asyncio.create_task(self._catch_up_log(), name=f"ray-log-end-{self.submission_id}")
        await asyncio.shield(self._caught_up)
        rc = self.returncode
        assert rc is not None
        return rc

    async def stop(self, graceful_s: float = 0.0, term_s: float = 15.0, kill_s: float = 10.0) -> StopOutcome:
        """``stop_job``: the wrapper turns it into a graceful stop; Ray kills what is left after the job's
        RAY_JOB_STOP_WAIT_TIME_S (see the module docstring). ``term_s``/``kill_s``: extra time for Ray's own
        steps before giving up on waiting."""
        t0 = time.monotonic()
        if self.terminal:
            return StopOutcome(how="already_exited", returncode=self.returncode, seconds=0.0)
        await asyncio.to_thread(self.client.stop_job, self.submission_id)
        assert self._done is not None
        try:
            await asyncio.wait_for(self._done.wait(), graceful_s + term_s + kill_s)
        except TimeoutError:
            pass
        seconds = time.monotonic() - t0
        # Ray sends SIGKILL after the job's RAY_JOB_STOP_WAIT_TIME_S (int(graceful_s), see train.py); ended
        # before that, the trainer stopped by itself
        how: StopHow = "graceful" if seconds < max(1, int(graceful_s)) else "killed"
        return StopOutcome(how=how, returncode=self.returncode, seconds=seconds)

    def signal_group(self, _sig: object) -> None:
        """Cancelled while stopping: ask Ray once more (its stop is idempotent); nothing here to wait for."""
        with contextlib.suppress(Exception):
            self.client.stop_job(self.submission_id)

    def close(self) -> None:
        for task in (*self._tasks, *([self._caught_up] if self._caught_up else [])):
            task.cancel()
