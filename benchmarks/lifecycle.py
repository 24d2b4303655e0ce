"""Running the lifecycle workload in worker processes, on either backend.

A `WorkerPool` starts its processes once (spawned, so that each one builds
its own clients, locks and caches, as separate NePS workers do) and runs
every configuration with the first few of them: importing NePS takes
seconds a process, which would otherwise be paid again for each run.

`run_lifecycles` creates an empty run, has `processes` workers load it,
starts them together and lets each do its share of lifecycles until the
run holds `trials` trials. Throughput is lifecycles per second of wall
time from the start to the last worker's end.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any

from benchmarks.workload import LIFECYCLES, summarize_steps

logger = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")

# A worker loading a run (NePS: importing torch) on a busy machine.
_PREPARE_TIMEOUT = 300.0
_POLL = 0.5


def _serve(index: int, tasks: Any, results: Any) -> None:
    """A worker process: prepare, go, census and close, until told to stop."""
    lifecycle = None
    while True:
        message = tasks.get()
        if message is None:
            break
        kind, payload = message
        try:
            if kind == "prepare":
                if lifecycle is not None:
                    lifecycle.close()
                cls = LIFECYCLES[payload["backend"]]
                if payload["create"]:
                    cls.create(payload["where"], payload["run"])
                lifecycle = cls(payload["where"], payload["run"], f"worker_{index}")
                results.put(("ready", index, None))
            elif kind == "go":
                records = []
                cpu = time.process_time()
                for _ in range(payload["count"]):
                    if time.time() > payload["deadline"]:
                        break
                    records.append(lifecycle.run_one())
                done = {
                    "end": time.time(),
                    "records": records,
                    "cpu_s": time.process_time() - cpu,
                }
                results.put(("done", index, done))
            elif kind == "census":
                results.put(("census", index, lifecycle.census()))
        except Exception:
            results.put(("error", index, traceback.format_exc()))
    if lifecycle is not None:
        lifecycle.close()


class WorkerError(RuntimeError):
    """A worker process raised, died, or did not answer in time."""


class WorkerPool:
    """`size` spawned worker processes, each with its own task queue."""

    def __init__(self, size: int) -> None:
        self.results: Any = SPAWN.Queue()
        self._tasks = [SPAWN.Queue() for _ in range(size)]
        self._processes = [
            SPAWN.Process(
                target=_serve,
                args=(i, self._tasks[i], self.results),
                name=f"bench-worker-{i}",
                daemon=True,
            )
            for i in range(size)
        ]
        for process in self._processes:
            process.start()

    @property
    def size(self) -> int:
        return len(self._processes)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, index: int, kind: str, payload: Any = None) -> None:
        self._tasks[index].put((kind, payload))

    def receive(self, kind: str, indexes: list[int], timeout: float) -> dict[int, Any]:
        """Wait for a `kind` answer from each worker in `indexes`."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(indexes):
            try:
                got, index, payload = self.results.get(timeout=_POLL)
            except queue.Empty:
                dead = [i for i in indexes if not self._processes[i].is_alive()]
                if dead:
                    raise WorkerError(f"Worker processes {dead} died.") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(indexes) - set(answers))
                    raise WorkerError(
                        f"Workers {missing} gave no {kind!r} answer in {timeout:g} s."
                    ) from None
                continue
            if got == "error":
                raise WorkerError(f"Worker {index} failed:\n{payload}")
            if got != kind:
                raise WorkerError(f"Worker {index} answered {got!r}, not {kind!r}.")
            answers[index] = payload
        return answers

    def close(self) -> None:
        """Ask every worker to stop; terminate those that do not."""
        for tasks in self._tasks:
            tasks.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


@dataclass(frozen=True)
class Target:
    """Where a backend keeps its runs: a Redis URL or a directory."""

    backend: str
    where: str


def run_lifecycles(
    pool: WorkerPool,
    target: Target,
    *,
    run: str,
    processes: int,
    trials: int,
    timeout: float,
) -> dict[str, Any]:
    """Run `trials` lifecycles on a new run with `processes` workers.

    A run that hits `timeout` stops early; its result says how many
    lifecycles were done (`completed`) and is marked `truncated`.
    """
    if processes > pool.size:
        raise ValueError(f"{processes} processes asked of a pool of {pool.size}.")
    workers = list(range(processes))
    spec = {"backend": target.backend, "where": target.where, "run": run}

    # The first worker creates the run, alone: NePS does not lock creation.
    pool.send(0, "prepare", {**spec, "create": True})
    pool.receive("ready", [0], _PREPARE_TIMEOUT)
    for i in workers[1:]:
        pool.send(i, "prepare", {**spec, "create": False})
    pool.receive("ready", workers[1:], _PREPARE_TIMEOUT)

    shares = [trials // processes + (i < trials % processes) for i in workers]
    started = time.time()
    deadline = started + timeout
    for i, count in zip(workers, shares, strict=True):
        pool.send(i, "go", {"count": count, "deadline": deadline})
    done = pool.receive("done", workers, timeout + _PREPARE_TIMEOUT)
    wall = max(answer["end"] for answer in done.values()) - started

    records = [r for answer in done.values() for r in answer["records"]]
    cpu_s = sum(answer["cpu_s"] for answer in done.values())
    pool.send(0, "census")
    census = pool.receive("census", [0], _PREPARE_TIMEOUT)[0]
    completed = len(records)
    return {
        "backend": target.backend,
        "processes": processes,
        "trials": trials,
        "completed": completed,
        "truncated": completed < trials,
        "wall_s": round(wall, 3),
        "lifecycles_per_s": round(completed / wall, 2) if wall > 0 else None,
        # The workers' own CPU time (user and system), all processes summed.
        "client_cpu_ms_per_lifecycle": (
            round(cpu_s * 1000 / completed, 3) if completed else None
        ),
        "steps": summarize_steps(records),
        "census": census,
        "verified": census == {"success": completed},
    }
