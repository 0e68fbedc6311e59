"""The eval-compare table from predict_results.json files as LLaMA-Factory 0.9.5 writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.train.results import EvalColumn, ResultsMissing, compare_table, read_eval_metrics

# the keys and value kinds of a real predict_results.json from the tiny model
REAL = {"predict_bleu-4": 3.5630625, "predict_model_preparation_time": 0.0046, "predict_rouge-1": 0.0,
        "predict_rouge-2": 0.0, "predict_rouge-l": 0.0, "predict_runtime": 7.0423,
        "predict_samples_per_second": 1.136, "predict_steps_per_second": 1.136}


def test_table_puts_jobs_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "predict_results.json").write_text(json.dumps(REAL))
    base = EvalColumn("job 3 (base)", read_eval_metrics(tmp_path))
    tuned = EvalColumn("job 5 (adapter of job 2)", {**base.metrics, "predict_bleu-4": 41.25, "predict_rouge-l": 38.5})
    assert compare_table([base, tuned]).splitlines() == [
        "metric     job 3 (base)  job 5 (adapter of job 2)",
        "---------  ------------  ------------------------",
        "bleu-4             3.56                     41.25",
        "rouge-1            0.00                      0.00",
        "rouge-2            0.00                      0.00",
        "rouge-l            0.00                     38.50",
        "runtime s           7.0                       7.0",
        "samples/s          1.14                      1.14",
    ]


def test_missing_results_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ResultsMissing, match=r"predict_results\.json does not exist"):
        read_eval_metrics(tmp_path)
    assert "-" in compare_table([EvalColumn("job 1", {})]).splitlines()[2]
