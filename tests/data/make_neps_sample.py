"""Writes ``neps-0.17-run/`` beside this file with NePS's own file-based state.

Run it with a Python that has neural-pipeline-search 0.17 installed:

    python tests/data/make_neps_sample.py

The run is small on purpose: successive halving over one float and an
integer fidelity (1 to 3, eta 3) gives three configs at the lowest fidelity
and one continuation (``<n>_rung_1``) of the best at the highest. The second
evaluation raises, so the run holds a crashed trial with a traceback in
``shared_errors.jsonl``. The tests import this directory without NePS.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from pathlib import Path

import neps
import numpy as np

HERE = Path(__file__).parent
TARGET = HERE / "neps-0.17-run"
SEED = 7


class SampleSpace(neps.PipelineSpace):
    x = neps.Float(lower=0.0, upper=1.0)
    epochs = neps.IntegerFidelity(lower=1, upper=3)


class DivergedError(Exception):
    """The evaluation's loss went to infinity."""


calls = {"n": 0}


def evaluate(x: float, epochs: int) -> dict:
    calls["n"] += 1
    if calls["n"] == 2:
        raise DivergedError(f"loss diverged at x={x:.3f}")
    loss = (x - 0.3) ** 2 / epochs
    return {
        "objective_to_minimize": loss,
        "cost": float(epochs),
        "learning_curve": [loss * (epochs + 1 - e) for e in range(1, epochs + 1)],
        "extra": {"epochs_run": epochs, "note": "sample"},
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    random.seed(SEED)
    np.random.seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "neps-0.17-run"
        neps.run(
            evaluate_pipeline=evaluate,
            pipeline_space=SampleSpace(),
            root_directory=root,
            optimizer=("successive_halving", {"eta": 3}),
            total_evaluations_to_spend=4,
            ignore_errors=True,
        )
        # Lock files are empty and belong to the machine that ran NePS.
        for lock in root.rglob("*.lock"):
            lock.unlink()
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(root, TARGET)
    print(f"Wrote {TARGET}")


if __name__ == "__main__":
    main()
