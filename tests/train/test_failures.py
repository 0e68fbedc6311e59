"""One actionable line from a failed run's log.

Most logs here are tails of real LLaMA-Factory 0.9.5 runs on bad specs (tests/train/logs/README.md). CUDA
and NCCL failures cannot happen on this CPU-only machine; their snippets are written in the exact format
torch prints (the same text appears in LLaMA-Factory's issue tracker), and say so.
"""

from __future__ import annotations

import signal
from pathlib import Path

from daemon.train.failures import clean_lines, disk_free, explain_failure, read_log_tail

LOGS = Path(__file__).resolve().parent / "logs"


def _log(name: str) -> str:
    return read_log_tail(LOGS / name)


def test_unknown_key_names_the_key_not_the_source_line() -> None:
    f = explain_failure(_log("unknown_key.log"), returncode=1)
    assert f.kind == "unknown_keys"
    assert f.message.startswith("LLaMA-Factory does not know the keys lora_rnak;")


def test_unknown_template() -> None:
    f = explain_failure(_log("unknown_template.log"), returncode=1)
    assert (f.kind, f.message.split(";")[0]) == ("template", "template 'qwen2vl' does not exist in this LLaMA-Factory")


def test_undefined_dataset_says_how_to_add_it() -> None:
    f = explain_failure(_log("undefined_dataset.log"), returncode=1)
    assert f.kind == "dataset" and "`ftctl dataset add nosuch FILE.json`" in f.message


def test_image_tag_mismatch_points_at_the_dataset() -> None:
    f = explain_failure(_log("image_tag_mismatch.log"), returncode=1)
    assert f.kind == "dataset" and "<image> tags do not match its images" in f.message


def test_other_errors_give_the_last_line_of_the_causing_traceback() -> None:
    f = explain_failure(_log("no_tokenizer.log"), returncode=1)
    assert f == f.__class__("error", "ValueError: Image features and image tokens do not match, tokens: 0, "
                                     "features: 4")


def test_full_disk_is_recognised_from_torch_write_errors_and_free_space() -> None:
    log = _log("disk_full.log")
    f = explain_failure(log, params={"save_total_limit": 3}, returncode=1, disk_free_bytes=0)
    assert f.kind == "disk_full"
    assert f.message.startswith("the disk is full at step 4; free space on it or lower save_total_limit (now 3)")
    # with space left, the same vague torch error is reported as it is
    plenty = explain_failure(log, returncode=1, disk_free_bytes=50 * 2**30)
    assert plenty.kind == "error" and "unexpected pos" in plenty.message
    assert disk_free(Path("/definitely/not/here")) is not None  # falls back to the nearest existing parent


def test_sigkill_without_traceback_suggests_host_memory() -> None:
    f = explain_failure(_log("killed_mid_run.log"), params={"preprocessing_num_workers": 16},
                        returncode=-signal.SIGKILL)
    assert f.kind == "host_oom"
    assert "killed (SIGKILL) at step 12" in f.message and "preprocessing_num_workers (now 16)" in f.message


# torch's CUDA OOM format (cannot be produced without a GPU), as torchrun prefixes it for rank 2
CUDA_OOM = """\
{'loss': 1.2031, 'grad_norm': 0.84, 'learning_rate': 9.1e-05, 'epoch': 0.41}
 65%|██████▌   | 130/200 [12:01<06:28,  5.55s/it]
[rank2]: Traceback (most recent call last):
[rank2]:   File "/opt/lf/lib/python3.11/site-packages/transformers/trainer.py", line 1778, in _run_epoch
[rank2]:     tr_loss_step = self.training_step(model, inputs, num_items_in_batch)
[rank2]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 2 has a total capacity of \
79.19 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.16 GiB memory in use. Of \
the allocated memory 75.10 GiB is allocated by PyTorch, and 1.52 GiB is reserved by PyTorch but unallocated.
E1122 10:12:03.123000 4242 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1)
Traceback (most recent call last):
  File "/opt/lf/bin/torchrun", line 8, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Traceback (most recent call last):
  File "/opt/lf/lib/python3.11/site-packages/llamafactory/launcher.py", line 133, in launch
subprocess.CalledProcessError: Command '['torchrun', '--nnodes', '1']' returned non-zero exit status 1.
"""


def test_cuda_oom_names_the_physical_gpu_step_and_knob() -> None:
    f = explain_failure(CUDA_OOM, params={"per_device_train_batch_size": 8}, gpus=[4, 5, 6, 7], returncode=1)
    assert f.kind == "oom"
    assert f.message == ("GPU out of memory on GPU 6 at step 130: lower per_device_train_batch_size (now 8) "
                         "or set quantization_bit: 4")


def test_cuda_oom_with_batch_one_suggests_shorter_sequences() -> None:
    f = explain_failure(CUDA_OOM, params={"per_device_train_batch_size": 1, "cutoff_len": 4096,
                                          "image_max_pixels": 262144, "quantization_bit": 4},
                        gpus=[0, 1, 2, 3], last_step=131)
    assert f.message == ("GPU out of memory on GPU 2 at step 131: lower cutoff_len (now 4096), image_max_pixels "
                         "(now 262144) or set deepspeed: ds_z3_config.json")


def test_wrapper_exceptions_are_skipped_for_the_root_cause() -> None:
    log = CUDA_OOM.replace("torch.OutOfMemoryError: CUDA out of memory.", "ValueError: bad thing happened.")
    assert explain_failure(log).message.startswith("ValueError: bad thing happened.")


# NCCL's format (cannot be produced without GPUs)
NCCL = """\
[rank1]:[E1122 10:20:01.000000 ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600032 milliseconds
[rank1]: torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error
"""


def test_nccl_failure_suggests_p2p_settings() -> None:
    f = explain_failure(NCCL, gpus=[2, 3], last_step=40)
    assert f.kind == "nccl" and "between GPUs 2,3 at step 40" in f.message and "NCCL_P2P_DISABLE=1" in f.message


def test_empty_log_and_plain_exit() -> None:
    assert explain_failure("", returncode=2).message == ("the trainer exited with status 2 before the first "
                                                         "training step; its log is empty (see `ftctl logs`)")
    assert "last words: Segmentation fault" in explain_failure("Segmentation fault\n", returncode=-11).message


def test_clean_lines_keeps_the_last_tqdm_frame_and_drops_colours_and_rank_prefixes() -> None:
    assert clean_lines("\x1b[31m[rank0]: boom\x1b[0m\n 1%|a| 1/9 [\r 2%|b| 2/9 [") == ["boom", " 2%|b| 2/9 ["]
