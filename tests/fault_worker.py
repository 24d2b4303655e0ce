"""A worker process for the fault tests: sample, claim, "evaluate", report.

Run as ``python -m tests.fault_worker URL RUN LOG [options]`` from the
repository root. It works on an existing run until the run holds `--target`
finished trials, sampling in batches while fewer exist. Its evaluation is a
sleep; its objective is a random number, so that a test can tell whose
result was stored.

Every acknowledged step is a JSON line in LOG, written with one system call
before the next step begins, so a line survives a SIGKILL of this process:
``claimed`` (trial, attempt), ``reported`` (trial, objective), ``late``
(trial, objective: refused with LeaseLostError), ``sample_lost`` (a sample
that outlived the optimizer lease, stored nothing), ``done``. Leases and
heartbeats come from the environment (NEPS_REDIS_LEASE_SECONDS, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from neps_redis import LeaseLostError, RedisNePSState, SampledConfig, Trial


class BudgetSpentError(Exception):
    """The run holds as many trials as it should."""


class Batches:
    """Configs with ids max+1..., never more trials than `target` in all."""

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(
        self, trials: Mapping[str, Trial], budget_info: Any, n: int | None = None
    ) -> list[SampledConfig]:
        count = min(n or 1, self.target - len(trials))
        if count <= 0:
            raise BudgetSpentError
        first = max((int(i) for i in trials), default=0) + 1
        return [
            SampledConfig(id=str(first + i), config={"x": random.random()})
            for i in range(count)
        ]


def _finished(counts: Mapping[str, int]) -> int:
    return sum(v for k, v in counts.items() if k not in ("pending", "evaluating"))


def work(args: argparse.Namespace, log: TextIO) -> None:
    state = RedisNePSState.create_or_load(args.run, redis=args.url, load_only=True)
    worker_id = state.lock_and_set_new_worker_id()
    optimizer = Batches(args.target)
    spent = False

    def record(event: str, **fields: Any) -> None:
        log.write(json.dumps({"event": event, "worker": worker_id, **fields}) + "\n")

    while True:
        trial = state.claim_next_pending_trial(worker_id=worker_id)
        if trial is None:
            if not spent:
                try:
                    state.lock_and_sample_trial(
                        optimizer, worker_id=worker_id, n=args.batch
                    )
                except BudgetSpentError:
                    spent = True
                except LeaseLostError:
                    # Sampling outlived the optimizer lease (a slow read of a
                    # big run on a busy machine): nothing was stored; again.
                    record("sample_lost")
                continue
            if _finished(state.counts()) >= args.target:
                break
            # Others hold the rest; a dead one's trial comes back to pending
            # once its lease expires, and a claim then finds it.
            time.sleep(0.05)
            continue

        attempt = int(state.client.hget(state.keys.trial(trial.id), "attempts") or 0)
        record("claimed", trial=trial.id, attempt=attempt)
        time.sleep(random.uniform(args.eval_min, args.eval_max))
        objective = random.random()
        report = trial.set_complete(
            report_as="success",
            time_end=time.time(),
            objective_to_minimize=objective,
            cost=None,
            learning_curve=None,
            err=None,
            tb=None,
            extra=None,
            evaluation_duration=0.0,
        )
        try:
            state.lock_and_report_trial_evaluation(trial, report, worker_id=worker_id)
        except LeaseLostError:
            record("late", trial=trial.id, objective=objective)
            continue
        record("reported", trial=trial.id, objective=objective)
    record("done")
    state.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("run")
    parser.add_argument("log")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-min", type=float, default=0.005)
    parser.add_argument("--eval-max", type=float, default=0.02)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    # Line-buffered: each line is one write, done before the next step.
    with Path(args.log).open("a", buffering=1) as log:
        work(args, log)


if __name__ == "__main__":
    main()
