"""One NePS worker process for the neps tests: ``python neps_worker.py SPEC``.

SPEC is a JSON object: ``run``, ``redis`` (URL), ``root`` (this worker's own
root directory), ``space`` (a name from `SPACES`), ``neps`` (keyword
arguments for `neps_redis.run`) and ``evaluate`` (how the evaluation
function behaves, see `make_evaluate`).

Every evaluation appends one JSON line to ``<root>/evaluated.jsonl``: the
trial id, this process's pid, the config and the directories NePS handed
over, so that a test can prove which worker evaluated what, and where.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import neps

import neps_redis


class PlainSpace(neps.PipelineSpace):
    x = neps.Float(0.0, 1.0)
    y = neps.Integer(1, 10)


class FidelitySpace(neps.PipelineSpace):
    x = neps.Float(0.0, 1.0)
    y = neps.Integer(1, 10)
    epochs = neps.IntegerFidelity(1, 9)


class PriorSpace(neps.PipelineSpace):
    x = neps.Float(0.0, 1.0, prior=0.3, prior_confidence="medium")
    y = neps.Integer(1, 10, prior=4, prior_confidence="medium")
    epochs = neps.IntegerFidelity(1, 9)


class OtherSpace(neps.PipelineSpace):
    x = neps.Float(0.0, 2.0)
    y = neps.Integer(1, 10)


SPACES = {
    "plain": PlainSpace,
    "fidelity": FidelitySpace,
    "priors": PriorSpace,
    "other": OtherSpace,
}


def objective(config: dict[str, Any]) -> float:
    """A cheap deterministic objective; higher fidelities are better."""
    value = (config["x"] - 0.3) ** 2 + config["y"] / 10
    return value + 1.0 / config.get("epochs", 1)


def make_evaluate(spec: dict[str, Any]) -> Any:
    """The evaluation function the spec asks for.

    ``evaluate`` keys: ``sleep`` (seconds per evaluation), ``fail_ids`` (raise
    ValueError for these trial ids), ``crash_ids`` (the process dies with
    os._exit for these), ``crash_once_ids`` with ``crash_once_file`` (the
    same, only for the first evaluation of each, over all workers: the file
    is test plumbing, not shared state of the run), ``async`` (return None:
    results come later), ``gate`` (a file that must exist before an
    evaluation returns).
    """
    behaviour = spec.get("evaluate", {})
    root = Path(spec["root"])
    record_path = root / "evaluated.jsonl"

    def evaluate(
        pipeline_id: str,
        pipeline_directory: Path,
        previous_pipeline_directory: Path | None,
        **config: Any,
    ) -> Any:
        record = {
            "id": pipeline_id,
            "pid": os.getpid(),
            "config": config,
            "directory": str(pipeline_directory),
            "directory_exists": pipeline_directory.is_dir(),
            "previous": None
            if previous_pipeline_directory is None
            else str(previous_pipeline_directory),
            "previous_exists": previous_pipeline_directory is not None
            and previous_pipeline_directory.is_dir(),
        }
        with record_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        (pipeline_directory / "checkpoint.txt").write_text(pipeline_id)

        if pipeline_id in behaviour.get("crash_ids", []):
            os._exit(3)
        once = behaviour.get("crash_once_file")
        if pipeline_id in behaviour.get("crash_once_ids", []) and once:
            try:
                Path(once).touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                os._exit(3)
        gate = behaviour.get("gate")
        if gate:
            while not Path(gate).exists():
                time.sleep(0.05)
        time.sleep(behaviour.get("sleep", 0.0))
        if pipeline_id in behaviour.get("fail_ids", []):
            raise ValueError(f"evaluation of trial {pipeline_id} failed")
        if behaviour.get("async"):
            return None
        return {"objective_to_minimize": objective(config), "cost": 1.0}

    return evaluate


def main() -> None:
    spec = json.loads(sys.argv[1])
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    kwargs = dict(spec.get("neps", {}))
    if isinstance(kwargs.get("optimizer"), list):
        # JSON has no tuples; NePS takes (name, settings) as a tuple.
        kwargs["optimizer"] = tuple(kwargs["optimizer"])
    neps_redis.run(
        make_evaluate(spec),
        SPACES[spec["space"]](),
        run=spec["run"],
        redis=spec["redis"],
        root_directory=root,
        **kwargs,
    )


if __name__ == "__main__":
    main()
