"""Helpers for the tests that run NePS itself (marked ``neps``).

Worker processes run ``tests/neps_worker.py``, each in its own empty
directory; nothing but the Redis server is shared. `RunView` reads what a
run left behind, in Redis and in the workers' directories, and checks the
rules every run must keep: each trial evaluated exactly once by one worker,
none lost, none left evaluating.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neps_redis import RedisNePSState, State, Trial
from neps_redis.keys import RunKeys

WORKER_SCRIPT = Path(__file__).with_name("neps_worker.py")

# Four workers share two cores in CI: torch's thread pools in each would
# only fight over them.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The states a trial ends in once a worker evaluated it.
FINISHED = {State.SUCCESS, State.FAILED, State.CRASHED}


def spawn_worker(
    tmp_path: Path,
    name: str,
    *,
    run: str,
    redis_url: str,
    space: str = "plain",
    neps: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Worker:
    """Start a worker process in its own empty directory ``tmp_path/name``."""
    root = tmp_path / name
    root.mkdir(parents=True)
    spec = {
        "run": run,
        "redis": redis_url,
        "root": str(root),
        "space": space,
        "neps": neps or {},
        "evaluate": evaluate or {},
    }
    log = (tmp_path / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(WORKER_SCRIPT), json.dumps(spec)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **SINGLE_THREADED, **(env or {})},
    )
    worker = Worker(name=name, root=root, process=process, log_path=Path(log.name))
    _SPAWNED.append(worker)
    return worker


# Every worker started, so that a failed test leaves none running.
_SPAWNED: list[Worker] = []


def kill_leftover_workers() -> None:
    """Kill the workers a test started and did not wait for."""
    while _SPAWNED:
        worker = _SPAWNED.pop()
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@dataclass
class Worker:
    name: str
    root: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker {self.name} did not finish in {timeout} s:\n{self.log[-3000:]}"
            ) from None

    def records(self) -> list[dict[str, Any]]:
        path = self.root / "evaluated.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


def wait_all(workers: list[Worker], timeout: float = 180.0) -> list[int]:
    """Wait for every worker; returns their exit codes."""
    deadline = time.monotonic() + timeout
    return [w.wait(max(1.0, deadline - time.monotonic())) for w in workers]


def assert_all_succeeded(workers: list[Worker], timeout: float = 180.0) -> None:
    codes = wait_all(workers, timeout)
    for worker, code in zip(workers, codes, strict=True):
        assert code == 0, f"worker {worker.name} exited {code}:\n{worker.log[-4000:]}"


def wait_until(condition: Any, timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class RunView:
    """What a run left: its trials and events in Redis, and the workers'
    own records of what they evaluated."""

    state: RedisNePSState
    trials: dict[str, Trial]
    records: list[dict[str, Any]]
    events: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, redis_url: str, run: str, workers: list[Worker]) -> RunView:
        state = RedisNePSState.create_or_load(run, redis=redis_url, load_only=True)
        client = state.client
        events = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in client.xrange(RunKeys(run).events)
        ]
        records = [r for w in workers for r in w.records()]
        return cls(state, state.lock_and_read_trials(), records, events)

    def evaluated_by(self) -> Counter:
        """Trials with a report, by the worker that evaluated them."""
        return Counter(
            t.metadata.evaluating_worker_id
            for t in self.trials.values()
            if t.report is not None and t.metadata.state != State.EXTERNAL
        )

    def assert_each_trial_evaluated_once(self) -> None:
        """No trial duplicated, lost, or left behind."""
        evaluated = Counter(r["id"] for r in self.records)
        twice = {i: n for i, n in evaluated.items() if n > 1}
        assert not twice, f"trials evaluated more than once: {twice}"

        finished = {i for i, t in self.trials.items() if t.metadata.state in FINISHED}
        assert set(evaluated) == finished, (
            f"evaluated {sorted(evaluated)} but finished {sorted(finished)}"
        )
        left = {
            i: t.metadata.state
            for i, t in self.trials.items()
            if t.metadata.state in (State.PENDING, State.EVALUATING)
        }
        assert not left, f"trials left unfinished: {left}"
        for record in self.records:
            assert record["directory_exists"], record
            assert record["directory"].endswith(f"configs/config_{record['id']}")

    def assert_promotions_valid(self, fidelity: str = "epochs") -> int:
        """Every continuation continues a finished trial of the rung below,
        with the same config at a higher fidelity, sampled after it ended;
        returns how many there are."""
        promotions = 0
        for trial in self.trials.values():
            previous_id = trial.metadata.previous_trial_id
            if previous_id is None:
                continue
            promotions += 1
            base, rung = trial.id.rsplit("_rung_", 1)
            assert previous_id == f"{base}_rung_{int(rung) - 1}", trial.id
            previous = self.trials[previous_id]
            assert previous.metadata.state == State.SUCCESS, previous_id
            assert previous.metadata.time_end <= trial.metadata.time_sampled
            assert trial.config[fidelity] > previous.config[fidelity]
            same = {k: v for k, v in trial.config.items() if k != fidelity}
            assert same == {k: v for k, v in previous.config.items() if k != fidelity}
            assert trial.metadata.previous_trial_location == previous.metadata.location
        return promotions

    def assert_previous_directories_are_local(self) -> None:
        """A continuation got its previous trial's directory where that trial
        ran on the same machine (here: the same worker directory), else None."""
        where = {r["id"]: Path(r["directory"]).parent.parent for r in self.records}
        for record in self.records:
            previous_id = self.trials[record["id"]].metadata.previous_trial_id
            if previous_id is None:
                assert record["previous"] is None
                continue
            here = Path(record["directory"]).parent.parent
            if where.get(previous_id) == here:
                assert record["previous_exists"], record
                assert record["previous"].endswith(f"configs/config_{previous_id}")
            else:
                assert record["previous"] is None, record
