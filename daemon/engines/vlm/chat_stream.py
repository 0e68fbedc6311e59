"""Requests to an OpenAI-compatible server (vLLM): one streamed chat completion, with its failures sorted,
and the token count of a prompt (:func:`tokenized_length`).

:func:`stream_chat` yields :class:`Piece` items (text as it arrives, then the finish reason and token
count) and raises one of two things:

* :class:`ServerGone`: the server could not be reached or the stream broke off (the process died, a
  restart, a proxy dropped the connection). Nothing is wrong with the request; it can be sent again once the
  server is back.
* :class:`Rejected`: the server answered with an error about this request (HTTP 4xx, vLLM's message quoted
  verbatim). Sending it again would give the same answer.

Closing the generator early (``aclose()``, or leaving the ``async for``) closes the HTTP stream; vLLM sees
the disconnect and aborts the request (counted as ``finished_reason="abort"`` in its metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)


class ServerGone(Exception):
    """The server went away during the request, or could not be reached."""


class Rejected(Exception):
    """The server refused this request; ``message`` is its own words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Piece:
    text: str = ""
    finish: str | None = None  # stop | length | abort | repetition | error, on the last piece
    completion_tokens: int | None = None  # from the usage chunk, when the server sends one


def api_root(url: str) -> str:
    """``http://host:8000/v1/`` → ``http://host:8000``: where /health, /metrics and /v1/… live."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(raw: bytes | str) -> str:
    """vLLM's error text from an error body ({"error": {"message": …}}, or {"detail": …}, or plain text)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:2000] or "(empty answer)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
        if body.get("message"):
            return str(body["message"])
    return text.strip()[:2000]


async def stream_chat(client: httpx.AsyncClient, root: str, body: dict[str, Any], api_key: str = "",
                      ) -> AsyncGenerator[Piece, None]:
    """POST /v1/chat/completions with ``stream: true`` and yield what comes back."""
    finish: str | None = None
    tokens: int | None = None
    done = False
    try:
        async with client.stream("POST", f"{root}/v1/chat/completions", json=body,
                                 headers=headers(api_key)) as resp:
            if resp.status_code >= 400:
                raw = await resp.aread()
                message = error_message(raw)
                if resp.status_code >= 500 or resp.status_code in (408, 429):
                    raise ServerGone(f"HTTP {resp.status_code}: {message}")
                raise Rejected(resp.status_code, message)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if "error" in chunk:
                    # vLLM reports a failure after the 200 header as a data line
                    err = chunk["error"]
                    msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    code = err.get("code", 500) if isinstance(err, dict) else 500
                    if isinstance(code, int) and 400 <= code < 500:
                        raise Rejected(code, msg)
                    raise ServerGone(f"the server failed during the request: {msg}")
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    tokens = int(usage["completion_tokens"])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    reason = choice.get("finish_reason")
                    if reason:
                        finish = str(reason)
                    if text:
                        yield Piece(text=text)
    except httpx.TransportError as exc:
        # connect refused, reset, a stream cut off mid-chunk, a read timeout on a hung server
        raise ServerGone(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    if finish is None:
        raise ServerGone("the stream ended before the answer was finished" + ("" if done else " (no [DONE])"))
    yield Piece(finish=finish, completion_tokens=tokens)


async def tokenized_length(client: httpx.AsyncClient, root: str, model: str, prompt: str,
                           api_key: str = "") -> int | None:
    """Tokens of the prompt after the chat template (vLLM's /tokenize), or None if the server cannot say."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "add_generation_prompt": True}
    try:
        resp = await client.post(f"{root}/tokenize", json=body, headers=headers(api_key), timeout=30.0)
        if resp.status_code == 200:
            return int(resp.json()["count"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    log.info("could not count the prompt's tokens at %s; the budget keeps its upper bound", root)
    return None
