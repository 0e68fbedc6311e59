"""Turn the log of a failed LLaMA-Factory run into one line a person can act on.

Known failures get a sentence with the fix (CUDA out of memory names the physical GPU, the step and the
knob to turn, with its current value); anything else gives the last line of the traceback that caused it,
not the wrappers around it (torchrun's ChildFailedError, the launcher's CalledProcessError).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers' TrainingArguments default, used when the spec does not set it
_HF_DEFAULT_BATCH = 8
_LOW_DISK_BYTES = 256 * 1024 * 1024

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RANK_RE = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
_EXC_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure)\w*|[A-Za-z_][\w.]*\.[A-Z]\w+)"
                          r"(?::\s?(.*))?$")
_TQDM_RE = re.compile(r"(\d+)/(\d+) \[")
_WRAPPERS = ("ChildFailedError", "CalledProcessError")


@dataclass(frozen=True)
class Failure:
    kind: str  # oom | host_oom | dataset | unknown_keys | template | tokenizer | nccl | disk_full | killed | error
    message: str


def read_log_tail(path: Path, max_bytes: int = 512 * 1024) -> str:
    """The end of a (possibly huge) log; a traceback is always near the end."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def disk_free(path: Path) -> int | None:
    """Free bytes for unprivileged writers on the file system holding ``path`` (or its nearest parent)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def clean_lines(text: str) -> list[str]:
    """Log lines without colour codes, tqdm carriage-return frames and torchrun's ``[rankN]:`` prefixes."""
    out = []
    for raw in _ANSI_RE.sub("", text).replace("\r\n", "\n").split("\n"):
        line = raw.split("\r")[-1] if "\r" in raw else raw  # a tqdm bar redraws with \r: keep the last frame
        out.append(_RANK_RE.sub("", line).rstrip())
    return out


def explain_failure(
    log_text: str,
    *,
    params: Mapping[str, Any] | None = None,
    gpus: Sequence[int] = (),
    last_step: int | None = None,
    returncode: int | None = None,
    disk_free_bytes: int | None = None,
) -> Failure:
    """Params: ``gpus``, the physical GPU indices the job ran on (its CUDA_VISIBLE_DEVICES), to name the
    real GPU; ``last_step``, the last step seen in trainer_log.jsonl (else the log's progress bar is read);
    ``disk_free_bytes``, free space where the job writes (:func:`disk_free`), to recognise a full disk
    behind torch's vague write errors."""
    params = params or {}
    lines = clean_lines(log_text)
    # match messages, not the source lines a traceback quotes (they hold the same words in f-strings)
    text = "\n".join(ln for ln in lines if ln and not ln[0].isspace())
    step = last_step if last_step is not None else _last_step("\n".join(lines))
    at = f" at step {step}" if step else " before the first training step"

    if re.search(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED",
                 text):
        return Failure("oom", _oom_message(text, params, gpus, at))
    m = re.search(r"Undefined dataset (\S+) in dataset_info\.json", text)
    if m:
        return Failure("dataset", f"dataset '{m.group(1)}' is not registered with the daemon; add it with "
                                  f"`ftctl dataset add {m.group(1)} FILE.json`")
    m = re.search(r"Some (?:keys|specified arguments) are not used by the HfArgumentParser: (\[.*?\]|\{.*?\})", text)
    if m:
        keys = ", ".join(re.findall(r"'([^']+)'", m.group(1))) or m.group(1)
        return Failure("unknown_keys", f"LLaMA-Factory does not know the keys {keys}; fix their spelling or "
                                       "remove them (--set KEY= removes a template key)")
    m = re.search(r"Template (\S+) does not exist\.", text)
    if m:
        return Failure("template", f"template '{m.group(1)}' does not exist in this LLaMA-Factory; use "
                                   "template: qwen2_vl for Qwen2-VL and Qwen2.5-VL")
    if "Failed to load tokenizer." in text:
        model = params.get("model_name_or_path", "the model")
        return Failure("tokenizer", f"no usable tokenizer in {model}; point model_name_or_path at a complete "
                                    "model directory (tokenizer files next to config.json)")
    m = re.search(r"The number of (images|videos|audios) does not match the number of (<\w+>) tokens", text)
    if m:
        return Failure("dataset", f"a record's {m.group(2)} tags do not match its {m.group(1)}{at}; fix the "
                                  "dataset and add it again (`ftctl dataset add` checks every record)")
    if "The dataset is not applicable in the current training stage" in text:
        return Failure("dataset", f"the dataset does not fit stage {params.get('stage', 'sft')}: dpo and rm need "
                                  "ranking data (chosen/rejected), the other stages need plain records")
    m = re.search(r"No space left on device(?::\s*'([^']+)')?|\[Errno 28\]", text)
    # torch.save on a full disk says only "iostream error" / "unexpected pos": ask the file system too
    if m or (disk_free_bytes is not None and disk_free_bytes < _LOW_DISK_BYTES
             and re.search(r"iostream error|inline_container|PytorchStreamWriter|write failed|OSError", text)):
        where = f" while writing {m.group(1)}" if m and m.group(1) else ""
        limit = params.get("save_total_limit")
        lower = f" or lower save_total_limit (now {limit})" if limit else ""
        return Failure("disk_full", f"the disk is full{where}{at}; free space on it{lower}, then retry the job "
                                    "(it resumes from its last checkpoint)")
    nccl = next((ln for ln in lines if re.search(r"NCCL (?:error|WARN)|nccl\w*Error|ProcessGroupNCCL|"
                                                  r"Watchdog caught collective operation timeout", ln)), None)
    if nccl:
        on = f" between GPUs {','.join(map(str, gpus))}" if gpus else ""
        return Failure("nccl", f"GPU communication (NCCL) failed{on}{at}: {_shorten(nccl)}; check "
                               "`nvidia-smi topo -m`, or set NCCL_P2P_DISABLE=1 (or NCCL_P2P_LEVEL=NVL) in the "
                               "[train] env of the config")
    exc = _root_exception(lines)
    if exc:
        return Failure("error", exc)
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        workers = params.get("preprocessing_num_workers")
        now = f" (now {workers})" if workers else ""
        return Failure("host_oom", f"the trainer was killed (SIGKILL){at} without an error of its own: usually the "
                                   "kernel's out-of-memory killer (host RAM, see `dmesg`); lower "
                                   f"preprocessing_num_workers{now} or dataloader_num_workers")
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    code = _exit_text(returncode)
    return Failure("error", f"the trainer {code}{at}" + (f"; its last words: {_shorten(last)}" if last else
                                                             "; its log is empty (see `ftctl logs`)"))


def _oom_message(text: str, params: Mapping[str, Any], gpus: Sequence[int], at: str) -> str:
    m = re.search(r"GPU (\d+)", text)
    where = ""
    if m:
        visible = int(m.group(1))
        physical = gpus[visible] if visible < len(gpus) else visible
        where = f" on GPU {physical}"
    batch = params.get("per_device_train_batch_size", _HF_DEFAULT_BATCH)
    fixes: list[str] = []
    if isinstance(batch, int) and batch > 1:
        fixes.append(f"lower per_device_train_batch_size (now {batch})")
    else:
        fixes.append(f"lower cutoff_len (now {params.get('cutoff_len', 2048)})")
        if params.get("image_max_pixels"):
            fixes.append(f"image_max_pixels (now {params['image_max_pixels']})")
    if params.get("quantization_bit") is None:
        fixes.append("set quantization_bit: 4")
    elif len(gpus) > 1 and not params.get("deepspeed"):
        fixes.append("set deepspeed: ds_z3_config.json")
    else:
        fixes.append("ask for more GPUs (--gpus N) with deepspeed: ds_z3_config.json")
    joined = ", ".join(fixes[:-1]) + f" or {fixes[-1]}" if len(fixes) > 1 else fixes[0]
    return f"GPU out of memory{where}{at}: {joined}"


def _last_step(text: str) -> int | None:
    found = _TQDM_RE.findall(text)
    return int(found[-1][0]) if found else None


def _root_exception(lines: list[str]) -> str | None:
    """The last line of the traceback that caused the failure: an unindented ``XError: …`` line right after
    a traceback frame (so a cut-off tail without its "Traceback" header still counts), skipping wrappers."""
    found: list[str] = []
    prev = ""
    for line in lines:
        if line and not line[0].isspace() and prev[:1].isspace() and _EXC_LINE_RE.match(line):
            found.append(line.strip())
        if line.strip():
            prev = line
    for line in reversed(found):
        if not any(w in line for w in _WRAPPERS):
            return _shorten(line)
    return _shorten(found[-1]) if found else None


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "stopped"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _shorten(line: str, limit: int = 300) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
