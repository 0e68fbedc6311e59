"""vLLM's Prometheus ``/metrics``, read into the few numbers the daemon steers by.

Samples look like ``vllm:num_requests_waiting{engine="0",model_name="m"} 3.0``; a server with several
engines (data parallel) has one sample per engine, so values are summed over labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ServerLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_pct: float = 0.0  # 0..100
    generation_tokens: float = 0.0  # counter since the server started
    finished: dict[str, float] = field(default_factory=dict)  # vllm:request_success_total by finished_reason
    sleeping: bool = False

    @property
    def queue(self) -> int:
        return self.running + self.waiting


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, value))
    return out


def parse_load(text: str) -> ServerLoad:
    running = waiting = 0.0
    kv: list[float] = []
    gen = 0.0
    finished: dict[str, float] = {}
    awake = asleep = 0.0
    for name, labels, value in parse_samples(text):
        if name == "vllm:num_requests_running":
            running += value
        elif name == "vllm:num_requests_waiting":
            waiting += value
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            kv.append(value)
        elif name == "vllm:generation_tokens_total":
            gen += value
        elif name == "vllm:request_success_total":
            reason = labels.get("finished_reason", "")
            finished[reason] = finished.get(reason, 0.0) + value
        elif name == "vllm:engine_sleep_state":
            if labels.get("sleep_state") == "awake":
                awake += value
            else:
                asleep += value
    return ServerLoad(running=int(running), waiting=int(waiting),
                      kv_cache_pct=100.0 * max(kv) if kv else 0.0, generation_tokens=gen,
                      finished=finished, sleeping=asleep > 0 and awake == 0)
