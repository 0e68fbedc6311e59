"""Eval results: read an eval job's predict_results.json and print several side by side (`ftctl eval-compare`).

The table is the one people used to copy by hand: bleu-4, rouge-1/2/l, runtime and samples/s, one column
per job (base model vs adapters on the same dataset).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.text_table import text_table

PREDICT_RESULTS = "predict_results.json"
# (row label, key in predict_results.json, format)
METRICS = (
    ("bleu-4", "predict_bleu-4", "{:.2f}"),
    ("rouge-1", "predict_rouge-1", "{:.2f}"),
    ("rouge-2", "predict_rouge-2", "{:.2f}"),
    ("rouge-l", "predict_rouge-l", "{:.2f}"),
    ("runtime s", "predict_runtime", "{:.1f}"),
    ("samples/s", "predict_samples_per_second", "{:.2f}"),
)


class ResultsMissing(ValueError):
    """An eval job without results; the message names the job's output dir and what to do."""


@dataclass(frozen=True)
class EvalColumn:
    title: str  # e.g. "job 12 (base)" or "job 14 (adapter job 9)"
    metrics: dict[str, float]


def read_eval_metrics(output_dir: Path) -> dict[str, float]:
    path = output_dir / PREDICT_RESULTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsMissing(f"{path} does not exist: the eval job did not finish; run it again") from None
    except (OSError, ValueError) as exc:
        raise ResultsMissing(f"{path} cannot be read ({exc}); run the eval job again") from None
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_table(columns: Sequence[EvalColumn]) -> str:
    """Plain-text table, metrics as rows and jobs as columns; '-' where a job lacks a metric."""
    header = ["metric", *(c.title for c in columns)]
    rows = [header]
    for label, key, fmt in METRICS:
        rows.append([label, *(fmt.format(c.metrics[key]) if key in c.metrics else "-" for c in columns)])
    return text_table(rows)
