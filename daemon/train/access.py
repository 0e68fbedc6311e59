"""What a member may point a training job at. The trainer runs as the daemon's user, so everything here is
checked against the caller at submit, never by asking whether the daemon could read it:

* ``--set`` takes the training knobs in :data:`ALLOWED_KEYS` (hyperparameters, LoRA, data sizes, precision,
  logging/eval/save steps, pixel budgets…) plus the admin's ``train.extra_allowed_keys``. Keys in
  :data:`NEVER` (secrets, keys that reach the network, paths the daemon picks) stay refused whatever the
  config says: a token would be stored in a spec every member can read, an upload would send data as the
  daemon, and a path would be read or written with the daemon's rights.
* ``model_name_or_path``: a folder inside ``train.model_roots`` (admin-listed, shared by definition) or a hub
  id, which the trainer resolves in the daemon's own Hugging Face cache.
* ``adapter_name_or_path``: the output (or a checkpoint) of a train job the caller owns (admins: any), or a
  folder inside ``train.model_roots``.
* ``deepspeed``: the name of a file in configs/deepspeed (admin-written), never a path.
* ``trust_remote_code: true`` runs the Python of the model's folder: only for ``train.trusted_models``.

Paths are compared after resolving every link (``os.path.realpath``): a link inside a root that points out
of it is refused. A path that does not exist is left to validate.py ("directory not found").
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.jobs.base import Caller
from daemon.jobs.outputs import inside, under_jobs
from shared.config import TrainConfig
from shared.protocol import JobInfo

# The --set allow-list, in one place. Every key is a knob of LLaMA-Factory's catalogue (llamafactory_keys.json,
# checked by tests) that changes how a model trains, never what it reads, writes or runs.
ALLOWED_GROUPS: dict[str, tuple[str, ...]] = {
    "the model": (
        "model_name_or_path", "adapter_name_or_path",  # paths, checked as the module docstring says
        "template", "flash_attn", "rope_scaling", "low_cpu_mem_usage", "use_fast_tokenizer", "split_special_tokens",
        "resize_vocab", "shift_attn", "enable_liger_kernel", "moe_aux_loss_coef", "disable_gradient_checkpointing",
        "use_reentrant_gc", "upcast_layernorm", "upcast_lmhead_output", "print_param_status",
        "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
    ),
    "images and video": (
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
        "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
    ),
    "method": (
        "stage", "finetuning_type", "pure_bf16", "freeze_vision_tower", "freeze_multi_modal_projector",
        "freeze_language_model", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
        "compute_accuracy", "disable_shuffling", "early_stopping_steps", "plot_loss",
        "include_effective_tokens_per_second", "use_llama_pro", "use_dft_loss", "use_asft_loss", "asft_alpha",
        "use_eaft_loss", "eaft_alpha",
    ),
    "LoRA": (
        "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "loraplus_lr_ratio",
        "loraplus_lr_embedding", "use_rslora", "use_dora", "pissa_init", "pissa_iter", "pissa_convert",
        "create_new_adapter", "module_dropout", "oft_rank", "oft_block_size", "oft_target",
    ),
    "preference training": (
        "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss", "dpo_label_smoothing", "kto_chosen_weight",
        "kto_rejected_weight", "simpo_gamma", "ld_alpha", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm",
        "ppo_target", "ppo_whiten_rewards",
    ),
    "data sizes": (
        "cutoff_len", "max_samples", "val_size", "train_on_prompt", "mask_history", "streaming", "buffer_size",
        "mix_strategy", "interleave_probs", "overwrite_cache", "preprocessing_batch_size",
        "preprocessing_num_workers", "ignore_pad_token_for_loss", "eval_on_each_dataset", "packing", "neat_packing",
        "tool_format", "default_system", "enable_thinking", "preserve_thinking", "dataloader_num_workers",
        "dataloader_drop_last", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
    ),
    "hyperparameters": (
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio",
        "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
        "label_smoothing_factor", "neftune_noise_alpha", "seed", "data_seed", "full_determinism",
        "gradient_checkpointing", "auto_find_batch_size", "torch_empty_cache_steps", "ddp_timeout",
        "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
        "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type",
        "galore_layerwise", "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
        "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise", "apollo_scale_front",
        "use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
        "badam_update_ratio", "badam_mask_mode", "badam_verbose", "use_adam_mini", "use_muon",
    ),
    "precision": ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval"),
    "logging, eval and save steps": (
        "logging_steps", "logging_strategy", "logging_first_step", "log_level", "disable_tqdm", "run_name",
        "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_accumulation_steps",
        "prediction_loss_only", "do_eval", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    ),
    "generation (eval)": (
        "predict_with_generate", "generation_max_length", "generation_num_beams", "eval_num_beams", "do_sample",
        "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens", "repetition_penalty",
        "length_penalty", "skip_special_tokens",
    ),
    "export": (
        "export_size", "export_device", "export_legacy_format", "export_quantization_bit",
        "export_quantization_nsamples", "export_quantization_maxlen",
    ),
    "distributed": ("deepspeed",),  # a file name of configs/deepspeed
}
ALLOWED_KEYS: frozenset[str] = frozenset(k for keys in ALLOWED_GROUPS.values() for k in keys)
# shown in a refusal, so that the line stays short
_EXAMPLES = ("learning_rate", "num_train_epochs", "max_steps", "lora_rank", "cutoff_len", "image_max_pixels",
             "bf16", "save_steps")
WHERE_LISTED = "daemon/train/access.py (ALLOWED_KEYS)"

_SECRET = "a secret: it would sit in the job spec every member can read"
_NETWORK = "it sends data off this server or opens connections as the daemon's user"
_PATH = "a path the trainer would read or write with the daemon's rights; the daemon picks it"
# Refused whatever train.extra_allowed_keys says (see the module docstring for why).
NEVER: dict[str, str] = {
    **dict.fromkeys(("hub_token", "hf_hub_token", "ms_hub_token", "om_hub_token", "swanlab_api_key",
                     "swanlab_lark_secret"), _SECRET),
    **dict.fromkeys(("push_to_hub", "hub_model_id", "hub_strategy", "hub_always_push", "hub_private_repo",
                     "hub_revision", "export_hub_model_id", "use_swanlab", "swanlab_project", "swanlab_workspace",
                     "swanlab_run_name", "swanlab_mode", "swanlab_lark_webhook_url", "trackio_space_id",
                     "trackio_bucket_id", "trackio_static_space_id", "project", "ray_init_kwargs",
                     "ray_num_workers", "master_addr", "master_port", "model_revision"), _NETWORK),
    **dict.fromkeys(("cache_dir", "tokenized_path", "logging_dir", "profiler_output_dir", "enable_torch_profiler",
                     "media_dir", "adapter_folder", "offload_folder", "resume_from_checkpoint", "swanlab_logdir",
                     "kt_weight_path", "kt_expert_checkpoint_path", "export_quantization_dataset", "ref_model",
                     "ref_model_adapters", "reward_model", "reward_model_adapters", "new_special_tokens_config",
                     "generation_config", "fsdp_config", "accelerator_config", "liger_kernel_config",
                     "hyper_parallel_args", "vllm_config", "sglang_config", "save_on_each_node"), _PATH),
    "dataset": "datasets are named with --dataset NAME (see `ftctl dataset list`)",
    "eval_dataset": "datasets are named with --dataset NAME (see `ftctl dataset list`)",
}
# What a user's own LLaMA-Factory YAML may hold beyond the --set knobs: what the job is (train, eval or
# export follows from them, spec.job_kind) and the datasets it reads, by their names in the daemon's
# dataset_info.json (validate.py checks they are there and of the right kind).
YAML_KEYS = frozenset(("do_train", "do_eval", "do_predict", "dataset", "eval_dataset"))
# set by the daemon: spec.py says so itself ("output_dir is set by the daemon; remove --set output_dir")
_FORCED = frozenset(("output_dir", "overwrite_output_dir", "report_to", "dataset_dir", "export_dir"))
TRUST_KEY = "trust_remote_code"

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class Policy:
    """The admin's rules (``[train]``) and where the daemon keeps what jobs may read."""

    model_roots: tuple[str, ...] = ()
    trusted_models: tuple[str, ...] = ()
    extra_allowed_keys: tuple[str, ...] = ()
    jobs_dir: Path = Path("/nonexistent")
    deepspeed_dir: Path = Path("/nonexistent")

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, jobs_dir: Path, deepspeed_dir: Path) -> Policy:
        return cls(model_roots=tuple(cfg.model_roots), trusted_models=tuple(cfg.trusted_models),
                   extra_allowed_keys=tuple(cfg.extra_allowed_keys), jobs_dir=jobs_dir, deepspeed_dir=deepspeed_dir)

    def allowed(self) -> frozenset[str]:
        return ALLOWED_KEYS | (frozenset(self.extra_allowed_keys) - NEVER.keys())

    def readable_roots(self) -> list[str]:
        """model_roots and trusted_models (an admin who trusts a folder's code lets jobs read it), resolved."""
        return [_real(r) for r in (*self.model_roots, *self.trusted_models) if r]


def override_problems(overrides: Mapping[str, Any], policy: Policy, catalog_keys: Collection[str],
                      ) -> list[str]:
    """One line per ``--set`` key the caller may not set. Keys LLaMA-Factory does not know are left to
    validate.py, which names the closest one; keys the daemon forces are left to spec.py."""
    return _key_problems(overrides, policy.allowed(), policy, catalog_keys, "--set ", "remove it")


def yaml_problems(params: Mapping[str, Any], policy: Policy, catalog_keys: Collection[str], name: str,
                  ) -> list[str]:
    """The same for the keys of a user's own LLaMA-Factory YAML (``ftctl train --yaml NAME``): the --set knobs,
    plus :data:`YAML_KEYS`. The keys the daemon picks (output_dir, …) are replaced by spec.py, not refused:
    every LLaMA-Factory example sets them."""
    allowed = policy.allowed() | YAML_KEYS
    return _key_problems(params, allowed, policy, catalog_keys, f"{name}: key ", f"remove it from {name}")


def _key_problems(given: Mapping[str, Any], allowed: frozenset[str], policy: Policy, catalog_keys: Collection[str],
                  prefix: str, fix: str) -> list[str]:
    problems: list[str] = []
    for key in given:
        if key in _FORCED or key == TRUST_KEY or key not in catalog_keys or key in allowed:
            continue
        what = prefix + key
        if key in NEVER:
            extra = "; train.extra_allowed_keys cannot allow it" if key in policy.extra_allowed_keys else ""
            problems.append(f"{what} is refused: {NEVER[key]}{extra}; {fix}")
        else:
            problems.append(f"{what} is not a training knob this server takes ({', '.join(_EXAMPLES)}, …: "
                            f"{len(allowed)} keys, listed in {WHERE_LISTED}); {fix}, or ask an admin to add it "
                            "to train.extra_allowed_keys")
    return problems


def path_problems(params: Mapping[str, Any], *, policy: Policy, caller: Caller,
                  job_of: Callable[[int], JobInfo | None]) -> list[str]:
    """One line per path in the rendered ``params`` that ``caller`` may not make the trainer read."""
    problems: list[str] = []
    roots = policy.readable_roots()
    model = params.get("model_name_or_path")
    model_real: str | None = None
    if isinstance(model, str) and model:
        problem, model_real = _model(model, caller, roots, policy)
        if problem:
            problems.append(problem)
    if params.get(TRUST_KEY):
        trusted = [_real(t) for t in policy.trusted_models if t]
        if model_real is None or not any(inside(model_real, t) for t in trusted):
            listed = ", ".join(policy.trusted_models) or "none listed"
            problems.append(f"{caller.user} cannot set {TRUST_KEY}: true for model {model}: it would run the Python "
                            f"in the model's folder as the daemon's user, and only folders in train.trusted_models "
                            f"({listed}) may do that; remove it (--set {TRUST_KEY}=false) or ask an admin to list "
                            "the folder")
    adapters = params.get("adapter_name_or_path")
    if isinstance(adapters, str):
        for adapter in (a.strip() for a in adapters.split(",")):
            if adapter:
                problem = _adapter(adapter, caller, roots, policy, job_of)
                if problem:
                    problems.append(problem)
    ds = params.get("deepspeed")
    if isinstance(ds, str) and ds:
        problem = _deepspeed(ds, policy.deepspeed_dir)
        if problem:
            problems.append(problem)
    return problems


def _model(value: str, caller: Caller, roots: list[str], policy: Policy) -> tuple[str | None, str | None]:
    """(problem, resolved folder): a hub id has no folder."""
    if not os.path.isabs(value):
        if _HUB_ID_RE.match(value) and ".." not in value:
            return None, None  # validate.py checks the daemon's cache when offline
        return (f"model_name_or_path {value}: give an absolute path inside train.model_roots or a hub id like "
                "Qwen/Qwen2-VL-7B-Instruct"), None
    real = _real(value)
    if not os.path.isdir(real):
        return None, real  # validate.py: "directory not found"
    if any(inside(real, r) for r in roots):
        return None, real
    shown = ", ".join(policy.model_roots) or "none set"
    return (f"{caller.user} cannot read model_name_or_path {_shown(value, real)}: the trainer reads local models "
            f"only inside train.model_roots ({shown}); put the model under one of them, or ask an admin to add "
            "its folder to train.model_roots"), real


def _adapter(value: str, caller: Caller, roots: list[str], policy: Policy,
             job_of: Callable[[int], JobInfo | None]) -> str | None:
    if not os.path.isabs(value):
        return (f"adapter_name_or_path {value}: give a train job (--adapter JOB) or an absolute path inside "
                "train.model_roots")
    real = _real(value)
    found = under_jobs(real, _real(str(policy.jobs_dir)), job_of)
    if found is not None:
        job = found.job
        if job is None:
            return (f"{caller.user} cannot read adapter_name_or_path {_shown(value, real)}: it is not the output of "
                    "a train job; name the job with --adapter JOB")
        if job.owner != caller.user and not caller.is_admin:
            return (f"{caller.user} cannot read adapter_name_or_path {_shown(value, real)}: it is job {job.id}'s, "
                    f"which belongs to {job.owner}; use one of your own train jobs (--adapter JOB), or ask "
                    f"{job.owner} or an admin")
        if not found.adapter:
            return (f"adapter_name_or_path {_shown(value, real)}: not a train job's adapter; name the job with "
                    f"--adapter {job.id} (or one of its output/checkpoint-N folders)")
        return None
    if not os.path.isdir(real) or any(inside(real, r) for r in roots):
        return None  # a missing folder: validate.py says "directory not found"
    shown = ", ".join(policy.model_roots) or "none set"
    return (f"{caller.user} cannot read adapter_name_or_path {_shown(value, real)}: an adapter is one of your "
            f"train jobs (--adapter JOB) or a folder inside train.model_roots ({shown}); copy it there or ask an "
            "admin")


def _deepspeed(value: str, deepspeed_dir: Path) -> str | None:
    """spec.py has already turned a known name into its file in ``deepspeed_dir``."""
    names = ", ".join(sorted(p.name for p in deepspeed_dir.glob("*.json"))) or "none there"
    outside = os.path.dirname(os.path.normpath(value)) != os.path.normpath(deepspeed_dir)
    if (os.path.isabs(value) and outside) or (not os.path.isabs(value) and os.sep in value):
        return (f"deepspeed {value}: give the name of a file in {deepspeed_dir} ({names}), not a path; an admin "
                "adds configs there")
    path = value if os.path.isabs(value) else str(deepspeed_dir / value)
    real = _real(path)
    if not os.path.lexists(path):
        return f"deepspeed {os.path.basename(value)}: no such file in {deepspeed_dir}; choose one of {names}"
    if os.path.dirname(real) != _real(str(deepspeed_dir)) or not os.path.isfile(real):
        return (f"deepspeed {os.path.basename(value)}: the file in {deepspeed_dir} is a link to {real}, outside "
                "that folder; ask an admin to copy the config there")
    return None


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _shown(value: str, real: str) -> str:
    return value if os.path.abspath(value) == real else f"{value} (a link to {real})"
