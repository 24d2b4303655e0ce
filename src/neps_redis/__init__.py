"""neps-redis: NePS's shared optimization state in Redis.

The state of a NePS run (trials, worker ids, optimizer state, errors) kept in
Redis instead of a directory guarded by file locks: every state change is one
atomic Lua script, and workers on machines that share nothing but a Redis
URL work on one run.
"""

from typing import Any

from neps_redis.cache import TrialsView
from neps_redis.errors import (
    EncodingError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidStateError,
    InvalidURLError,
    LeaseLostError,
    NePSError,
    RunNotFoundError,
    SchemaVersionError,
    TrialAlreadyExistsError,
    TrialNotFoundError,
    UnsafeServerError,
)
from neps_redis.model import (
    BudgetInfo,
    ErrDump,
    ImportedConfig,
    MetaData,
    OptimizationState,
    OptimizerInfo,
    Report,
    SampledConfig,
    SeedSnapshot,
    SerializableTrialError,
    State,
    Trial,
)
from neps_redis.state import RedisNePSState

__version__ = "0.1.0"


def run(
    evaluate_pipeline: Any, pipeline_space: Any = None, *, run: str, **kwargs: Any
) -> None:
    """`neps.run` with the run's state in Redis (needs the `neps` extra).

    See `neps_redis.neps_bridge.run`; NePS is imported only when this is
    called, so that the rest of the package works without it.
    """
    from neps_redis.neps_bridge import run as run_on_redis

    run_on_redis(evaluate_pipeline, pipeline_space, run=run, **kwargs)


__all__ = [
    "BudgetInfo",
    "EncodingError",
    "ErrDump",
    "ImportedConfig",
    "InvalidArgumentError",
    "InvalidNameError",
    "InvalidStateError",
    "InvalidURLError",
    "LeaseLostError",
    "MetaData",
    "NePSError",
    "OptimizationState",
    "OptimizerInfo",
    "RedisNePSState",
    "Report",
    "RunNotFoundError",
    "SampledConfig",
    "SchemaVersionError",
    "SeedSnapshot",
    "SerializableTrialError",
    "State",
    "Trial",
    "TrialAlreadyExistsError",
    "TrialNotFoundError",
    "TrialsView",
    "UnsafeServerError",
    "__version__",
    "run",
]
