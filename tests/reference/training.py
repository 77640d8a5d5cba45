"""Running the original training code (tests/reference/run_train_original.py in `.venv-orig`) and
this project's trainer on the same command line, and reading what each left."""

import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT
from reference.original import REFERENCE_PYTHON

RUNNER = ROOT / "tests" / "reference" / "run_train_original.py"


def reference_train(argv: list, record: Path, adapter: Path = None, timeout: float = 900) -> dict:
    """The original train() on `argv` (train.py's arguments): each step's loss, learning rates, gradient norm."""
    head = [str(record)] + ([str(adapter)] if adapter else [])
    result = subprocess.run(
        [REFERENCE_PYTHON, str(RUNNER), "train", *head, "--", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(record.read_text())


def reference_preprocess(jobs: dict, out: Path, timeout: float = 600) -> list:
    """ids, labels, pixels and mismatch warnings of each record, from train.py's own dataset."""
    (out / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run(
        [REFERENCE_PYTHON, str(RUNNER), "preprocess", str(out / "jobs.json"), str(out / "items.json")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "items.json").read_text())


def train_log(out: Path) -> list:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
