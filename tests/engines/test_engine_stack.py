"""The engine stack the other tests stand on: real vLLM CPU and real LLaMA-Factory on the tiny model.

These start the real programs (no mocks): `vllm serve` from the cached vLLM venv and `llamafactory-cli` from
the cached LLaMA-Factory venv; the venvs are built by `make engines` (tests/engines/venvs.py).
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.engines import stack


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size = 8, (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        pos += 12 + length
    return size


def test_tiny_dataset_has_one_valid_png_and_image_tag_per_record(tmp_path: Path) -> None:
    ds = stack.build_tiny_dataset(tmp_path / "ds", records=5, size=56)
    info = json.loads((ds / "dataset_info.json").read_text())
    sft = json.loads((ds / info["tiny_sft"]["file_name"]).read_text())
    dpo = json.loads((ds / info["tiny_dpo"]["file_name"]).read_text())
    assert len(sft) == len(dpo) == 5
    assert info["tiny_dpo"]["ranking"] is True
    for rec in sft:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert rec["messages"][0]["content"].count("<image>") == len(rec["images"]) == 1
        assert _png_size((ds / rec["images"][0]).read_bytes()) == (56, 56)
    assert all(r["chosen"]["content"] != r["rejected"]["content"] for r in dpo)


def _chat(model: str, image: bytes, stream: bool, max_tokens: int) -> dict[str, Any]:
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Convert this page to Markdown."},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]}],
    }


def _stream_text(base_url: str, body: dict[str, Any]) -> list[str]:
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    deltas = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    deltas.append(choices[0]["delta"]["content"])
    return deltas


@pytest.mark.vllm
def test_vllm_streams_text_for_an_image_batches_requests_and_serves_a_runtime_lora(tmp_path: Path) -> None:
    model = stack.build_tiny_model(tmp_path / "model")
    lora = stack.build_tiny_lora(tmp_path / "lora")
    image = stack.build_tiny_dataset(tmp_path / "ds", records=1).joinpath("images/img_0.png").read_bytes()
    with stack.running_vllm(model, tmp_path / "vllm", lora=True) as server:
        base_deltas = _stream_text(server.base_url, _chat(str(model), image, True, 16))
        assert len(base_deltas) >= 8 and "".join(base_deltas).strip(), "the tiny model must stream visible text"

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(
                lambda _: stack.http_json(server.base_url + "/v1/chat/completions",
                                          _chat(str(model), image, False, 32), timeout=300),
                range(8)))
        assert [status for status, _ in replies] == [200] * 8
        assert all(body["usage"]["completion_tokens"] == 32 for _, body in replies)

        status, metrics = stack.http_json(server.base_url + "/metrics")
        assert status == 200 and "vllm:num_requests_running{" in metrics

        status, body = stack.http_json(server.base_url + "/v1/load_lora_adapter",
                                       {"lora_name": "tiny-lora", "lora_path": str(lora)})
        assert status == 200, body
        lora_deltas = _stream_text(server.base_url, _chat("tiny-lora", image, True, 16))
        assert "".join(lora_deltas) != "".join(base_deltas), "the random adapter must change the greedy reply"
    assert server.proc.returncode is not None


@pytest.mark.llamafactory
def test_llamafactory_lora_sft_logs_every_step_saves_checkpoints_and_export_merges(tmp_path: Path) -> None:
    model = stack.build_tiny_model(tmp_path / "model")
    dataset = stack.build_tiny_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    env = stack.llamafactory_env(tmp_path)
    cli = str(stack.llamafactory_cli())
    train_yaml = stack.write_yaml(tmp_path / "sft.yaml", stack.sft_config(model, dataset, out))
    with open(tmp_path / "train.log", "wb") as log:
        rc = subprocess.run([cli, "train", str(train_yaml)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=tmp_path, check=False, timeout=600).returncode
    assert rc == 0, (tmp_path / "train.log").read_text()[-3000:]
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == list(range(1, 11))
    assert (out / "checkpoint-5").is_dir() and (out / "checkpoint-10").is_dir()
    assert (out / "adapter_model.safetensors").is_file()

    export_yaml = stack.write_yaml(tmp_path / "export.yaml", {
        "model_name_or_path": str(model), "adapter_name_or_path": str(out), "template": "qwen2_vl",
        "finetuning_type": "lora", "export_dir": str(tmp_path / "merged"), "export_device": "cpu",
    })
    with open(tmp_path / "export.log", "wb") as log:
        rc = subprocess.run([cli, "export", str(export_yaml)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=tmp_path, check=False, timeout=600).returncode
    assert rc == 0, (tmp_path / "export.log").read_text()[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size > 100_000
