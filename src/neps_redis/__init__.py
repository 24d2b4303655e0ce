"""neps-redis: NePS's shared optimization state in Redis.

The state of a NePS run (trials, worker ids, optimizer state, errors) kept in
Redis instead of a directory guarded by file locks: every state change is one
atomic Lua script, and workers on machines that share nothing but a Redis
URL work on one run.
"""

from neps_redis.errors import (
    EncodingError,
    InvalidNameError,
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

__all__ = [
    "BudgetInfo",
    "EncodingError",
    "ErrDump",
    "ImportedConfig",
    "InvalidNameError",
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
    "UnsafeServerError",
    "__version__",
]
