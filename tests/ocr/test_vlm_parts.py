"""The pure parts of the VLM engines: request body, metrics, in-flight limit, engine choice, vllm argv."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from pathlib import Path

from daemon.engines.control import choose_default, image_dimensions
from daemon.engines.remote import Server, pick
from daemon.engines.vllm_command import (
    build_command,
    build_env,
    give_short_ipc_dir,
    ipc_base_too_long,
    log_reason,
    served_name_of,
)
from daemon.engines.vlm.chat_stream import api_root, error_message
from daemon.engines.vlm.converter import chat_body, data_url, unfence
from daemon.engines.vlm.inflight import SATURATED_POLLS, InFlight
from daemon.engines.vlm.prompts import load_prompt, prompt_names
from daemon.engines.vlm.server_metrics import parse_load
from shared.config import Config, VllmConfig, load_settings, parse_config

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="tiny"} 5.0
vllm:num_requests_running{engine="1",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:generation_tokens_total{engine="0",model_name="tiny"} 2600.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 12.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 3.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 1.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"} 0.0
"""


def test_metrics_are_summed_over_engines() -> None:
    load = parse_load(METRICS)
    assert (load.running, load.waiting, load.queue) == (8, 2, 10)
    assert load.kv_cache_pct == 25.0 and load.generation_tokens == 2600.0
    assert load.finished == {"stop": 12.0, "abort": 3.0} and not load.sleeping
    asleep = METRICS.replace('"awake"} 1.0', '"awake"} 0.0').replace('"weights_offloaded"} 0.0',
                                                                      '"weights_offloaded"} 1.0')
    assert parse_load(asleep).sleeping


def test_request_puts_the_prompt_before_the_image_and_keeps_daemon_fields() -> None:
    body = chat_body("tiny-lora", "Convert.", data_url(b"png"), temperature=0.3, max_tokens=99,
                     extra={"top_p": 0.8, "max_tokens": 5, "stream": False, "stop": ["x"]})
    content = body["messages"][0]["content"]
    assert [c["type"] for c in content] == ["text", "image_url"]
    assert content[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(b"png").decode()
    assert (body["model"], body["max_tokens"], body["temperature"], body["stream"]) == ("tiny-lora", 99, 0.3, True)
    assert body["top_p"] == 0.8 and body["stop"] == ["x"]


def test_markdown_fence_around_a_page_is_removed() -> None:
    assert unfence("```markdown\n# Title\n\ntext\n```") == "# Title\n\ntext"
    assert unfence("# Title\n```python\nx = 1\n```\n") == "# Title\n```python\nx = 1\n```\n"


def test_error_message_quotes_vllm() -> None:
    body = json.dumps({"error": {"message": "Input length (5106) exceeds model's maximum context length (2048).",
                                 "type": "BadRequestError", "code": 400}})
    assert error_message(body.encode()) == "Input length (5106) exceeds model's maximum context length (2048)."
    assert error_message(b'{"detail":"Not Found"}') == "Not Found"
    assert error_message(b"Success: LoRA adapter 'x' added") == "Success: LoRA adapter 'x' added"
    assert api_root("http://gpu2:8000/v1/") == "http://gpu2:8000"


async def test_in_flight_limit_backs_off_only_when_the_server_is_saturated_and_grows_back() -> None:
    pool = InFlight(64)
    # a burst: requests wait for their prefill while running still climbs: no back-off
    for running, waiting in [(6, 26), (14, 18), (25, 7)]:
        await pool.observe(running=running, waiting=waiting)
    assert pool.limit == 64
    # saturated: running stays at 16 while 30 wait, three polls in a row
    for _ in range(SATURATED_POLLS):
        await pool.observe(running=16, waiting=30)
    assert pool.limit == 25 + InFlight.reserve(25)  # the most seen running recently, plus a reserve
    held: list[asyncio.Event] = []

    async def request() -> None:
        async with pool.slot():
            ev = asyncio.Event()
            held.append(ev)
            await ev.wait()

    tasks = [asyncio.create_task(request()) for _ in range(40)]
    for _ in range(10):
        await asyncio.sleep(0)  # let them take the slots there are
    assert len(held) == pool.limit == 28
    await pool.observe(running=28, waiting=0)  # every slot busy and nothing waits at the server: grow
    for _ in range(10):
        await asyncio.sleep(0)
    assert pool.limit == 35 and len(held) == 35
    while not all(t.done() for t in tasks):
        for ev in held:
            ev.set()
        await asyncio.sleep(0)
    assert pool.active == 0


def test_remote_pick_prefers_the_shortest_queue_counting_our_own_requests() -> None:
    a, b = Server(root="http://a", up=True), Server(root="http://b", up=True)
    a.load = parse_load(METRICS)  # 10 queued there, none of them ours
    assert pick([a, b], 0.0) is b
    b.in_flight = 11  # we sent 11 to b since the last poll
    assert pick([a, b], 0.0) is a
    b.down_until = 10.0
    assert pick([a, b], 5.0) is a and pick([b], 5.0) is None
    a.models = {"tiny": "", "lora1": "tiny"}
    assert pick([a, b], 20.0, adapter="lora1") is a and pick([b], 20.0, adapter="lora1") is None


def test_vllm_argv_has_the_flags_from_the_config() -> None:
    cfg = parse_config('[vllm]\nmodel = "/m/Qwen2-VL-7B"\nquantization = "awq"\nextra_args = ["--enforce-eager"]\n'
                       'max_pixels = 802816\n', "t").vllm
    argv = build_command(cfg, "/opt/vllm/bin/vllm", "/tmp/ftvllm-x/vllm.sock", served_name_of(cfg), gpus=2)
    assert argv[:3] == ["/opt/vllm/bin/vllm", "serve", "/m/Qwen2-VL-7B"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[argv.index("--served-model-name") + 1] == "Qwen2-VL-7B"
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image":1,"video":0}'
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"min_pixels": 3136, "max_pixels": 802816}
    assert argv[argv.index("--quantization") + 1] == "awq" and "--enable-sleep-mode" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "64" and "--enable-lora" in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and argv[-1] == "--enforce-eager"
    # a Unix socket in the daemon's private directory, never a TCP port (issue 12: anyone could reach it)
    assert flags["--uds"] == "/tmp/ftvllm-x/vllm.sock" and "--port" not in argv and "--host" not in argv
    env = build_env(cfg, {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify"}, [3, 5])
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5" and "NOTIFY_SOCKET" not in env
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_SERVER_DEV_MODE"] == "1"
    quiet = build_command(VllmConfig(model="m", enable_lora=False, enable_sleep_mode=False), "vllm", "/s", "m", 1)
    assert "--enable-lora" not in quiet and "--enable-sleep-mode" not in quiet
    assert "--tensor-parallel-size" not in quiet
    # chunks of 8 tokens by default; 0 leaves the flag out; a flag of the user's own wins
    assert argv[argv.index("--stream-interval") + 1] == "8" and "--stream-interval" not in build_command(
        VllmConfig(model="m", stream_interval=0), "vllm", "/s", "m", 1)
    own = build_command(VllmConfig(model="m", extra_args=["--stream-interval=2"]), "vllm", "/s", "m", 1)
    assert "--stream-interval" not in own and own[-1] == "--stream-interval=2"


def test_a_deep_tmpdir_is_noticed_before_vllm_dies_of_it() -> None:
    # CI's tmp_path once pushed vLLM's <TMPDIR>/<uuid4> ipc path past sun_path's 107 bytes: vLLM died at start.
    deep = "/tmp/pytest-of-root/pytest-100/test_vllm_streams_text_for_an_0/vllm/tmp"
    assert ipc_base_too_long({"TMPDIR": deep}) and ipc_base_too_long({"TMP": deep})
    assert not ipc_base_too_long({"TMPDIR": "/var/tmp"}) and not ipc_base_too_long({})
    assert not ipc_base_too_long({"TMPDIR": deep, "VLLM_RPC_BASE_PATH": "/run/x"})  # the user's choice stands
    assert give_short_ipc_dir({"TMPDIR": "/var/tmp"}) is None
    env = {"TMPDIR": deep}
    made = give_short_ipc_dir(env)
    assert made is not None
    try:
        assert made.is_dir() and env["VLLM_RPC_BASE_PATH"] == str(made) and not ipc_base_too_long(env)
        assert not ipc_base_too_long({"TMPDIR": str(made)})
    finally:
        made.rmdir()


def test_log_reason_picks_the_error_line(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("INFO starting\nTraceback (most recent call last):\n  File \"x.py\", line 3\n"
                   "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                   "  Value error, Sleep mode is not supported on current platform. [type=value_error]\n")
    assert "Sleep mode is not supported" in log_reason(log)


def settings(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    return load_settings(cfg, tmp_path)


def test_auto_takes_vllm_only_with_gpus_a_model_and_an_executable(tmp_path: Path) -> None:
    s = settings(tmp_path, '[vllm]\nmodel = "/m"\n')
    engines = {"cpu": object(), "vllm": object()}
    name, why = choose_default(s, engines, [], "no GPUs found (NVML: Driver Not Loaded)", "/usr/bin/vllm")
    assert name == "cpu" and "Driver Not Loaded" in why
    name, why = choose_default(s, engines, [0, 1], "2 GPUs", None)
    assert name == "cpu" and "executable" in why
    name, why = choose_default(s, {"cpu": object()}, [0], "1 GPU", "/usr/bin/vllm")
    assert name == "cpu" and "vllm.model is empty" in why
    name, why = choose_default(s, engines, [0], "1 GPU", "/usr/bin/vllm")
    assert name == "vllm" and why.startswith("auto: 1 GPU(s)")
    explicit = settings(tmp_path, '[ocr]\nengine = "vllm"\n[vllm]\nmodel = "/m"\n')
    name, why = choose_default(explicit, engines, [], "no GPUs", None)
    assert name == "vllm" and "without GPUs" in why
    assert Config().ocr.engine == "auto"


def _png(width: int, height: int) -> bytes:
    raw = b"".join(b"\0" + b"\xff" * (width * 3) for _ in range(height))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat_data = zlib.compress(raw)
    idat = struct.pack(">I", len(idat_data)) + b"IDAT" + idat_data + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + b"\0\0\0\0IEND\xaeB`\x82"


def test_image_dimensions_from_png_and_jpeg_headers() -> None:
    assert image_dimensions(_png(37, 21)) == (37, 21)
    jpeg = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 480, 640) + b"\0" * 12)
    assert image_dimensions(jpeg) == (640, 480)
    assert image_dimensions(b"GIF89a") is None


def test_the_bundled_prompts_are_found_wherever_the_module_sits() -> None:
    # the move to daemon/engines/vlm/ once pointed the prompts directory one level above the checkout
    assert {"default", "zh"} <= set(prompt_names())
    assert load_prompt("default")
