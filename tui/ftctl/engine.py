"""``ftctl engine status|start|stop|sleep|wake|adapters|load NAME PATH|unload NAME``: the OCR engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from shared.client import Client
from shared.protocol import EngineCommand, EngineInfo, EngineReply
from tui.ftctl.args import Subparsers
from tui.ftctl.output import EXIT_OK, emit_json, out, usage

ACTIONS = ("status", "start", "stop", "sleep", "wake", "adapters", "load", "unload")


def engine_lines(eng: EngineInfo) -> list[str]:
    lines = [f"engine:   {eng.kind} {eng.state}{' ' + eng.model if eng.model else ''}"]
    if eng.reason:
        lines.append(f"why:      {eng.reason}")
    if eng.kind != "cpu":
        lines.append(f"load:     {eng.running} running, {eng.waiting} waiting, KV cache {eng.kv_cache_pct:.0f}%, "
                     f"{eng.tokens_per_s:.0f} tokens/s, {eng.pages_per_s:.2f} pages/s")
        lines.append(f"adapters: {', '.join(eng.adapters) or 'none'}")
    if eng.gpus:
        lines.append(f"gpus:     {','.join(map(str, eng.gpus))}")
    if eng.error:
        lines.append(f"problem:  {eng.error}")
    return lines


def cmd_engine(args: argparse.Namespace, c: Client) -> int:
    path = ""
    if args.action == "load":
        if not (args.name and args.path):
            return usage("engine load needs a name and the adapter's directory: ftctl engine load NAME PATH")
        path = str(Path(args.path).expanduser().resolve())
    elif args.action == "unload" and not args.name:
        return usage("engine unload needs the adapter's name: ftctl engine unload NAME")
    # start/sleep/wake/load can take minutes on a big model (vLLM loads weights, LoRA loads from disk)
    timeout = max(args.timeout, 330.0) if args.action in ("sleep", "wake", "load", "unload", "stop") else None
    reply = c.call(EngineCommand(action=args.action, name=args.name or "", path=path), EngineReply, timeout=timeout)
    if args.json:
        emit_json(reply)
        return EXIT_OK
    if args.action == "status":
        for line in engine_lines(reply.engine):
            out.print(escape(line))
        if reply.message:
            out.print(escape(reply.message))
    else:
        out.print(escape(reply.message or f"engine {reply.engine.kind} {reply.engine.state}"))
    return EXIT_OK


def add_parser(commands: Subparsers) -> None:
    sp = commands.add_parser(
        "engine", help="the OCR engine: status, start/stop, sleep/wake, LoRA adapters",
        description="status: which engine serves and why, its load; start/stop/sleep/wake: the vLLM child "
        "(admins only: it is shared); adapters: the LoRA adapters loaded; load NAME PATH: load a LoRA adapter "
        "(a PEFT directory) into vLLM at runtime, so that `ftctl submit ocr --adapter NAME` can use it; "
        "unload NAME.")
    sp.set_defaults(fn=cmd_engine)
    sp.add_argument("action", choices=ACTIONS, help="what to do (see above)")
    sp.add_argument("name", nargs="?", help="the adapter's name (load, unload)")
    sp.add_argument("path", nargs="?", help="the adapter's directory (load)")
    sp.add_argument("--json", action="store_true")
