"""Every default of the package, in one place, with why it is what it is.

Each can be changed per process by the environment variable named beside it.
"""

from __future__ import annotations

import os

# Layout version of a run's keys. A run written with another version is
# refused with a clear error rather than misread.
SCHEMA_VERSION = 1

# How long a claimed trial is leased to its worker before it may be taken
# over. Long, because a GPU evaluation can run for hours between heartbeats
# of a worker that is alive but busy. NEPS_REDIS_LEASE_SECONDS.
LEASE_SECONDS = 1800.0

# How long the optimizer lease lasts. A sampler that dies holding it blocks
# other samplers at most this long. NEPS_REDIS_OPTIMIZER_LEASE_SECONDS.
OPTIMIZER_LEASE_SECONDS = 120.0

# How long a worker waits for the optimizer lease before giving up with an
# error. Longer than the lease itself, so a dead holder never causes it.
# NEPS_REDIS_OPTIMIZER_WAIT_SECONDS.
OPTIMIZER_WAIT_SECONDS = 600.0

# Approximate cap of the event stream (XADD MAXLEN ~). About 100 bytes an
# event; the stream is for monitoring and catching up, not the record.
# NEPS_REDIS_EVENTS_MAXLEN.
EVENTS_MAXLEN = 100_000

# How long the reply of a write is kept for replays. redis-py retries a
# lost reply within seconds; ten minutes covers a long reconnect.
# NEPS_REDIS_REQUEST_TTL_SECONDS.
REQUEST_TTL_SECONDS = 600.0

# How many trials one pipeline reads at a time in a full read.
READ_CHUNK = 2_000

# How many pending ids a claim offers the script as candidates.
CLAIM_CANDIDATES = 8

# The server used when nothing else is configured.
FALLBACK_URL = "redis://localhost:6379/0"


def env_float(name: str, default: float) -> float:
    """A positive number from the environment, or `default`."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number.") from None
    if not value > 0:
        raise ValueError(f"{name}={text!r} must be greater than 0.")
    return value


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# The settings as this process sees them: the default, unless overridden by
# the environment variable named beside it.


def lease_seconds() -> float:
    return env_float("NEPS_REDIS_LEASE_SECONDS", LEASE_SECONDS)


def optimizer_lease_seconds() -> float:
    return env_float("NEPS_REDIS_OPTIMIZER_LEASE_SECONDS", OPTIMIZER_LEASE_SECONDS)


def optimizer_wait_seconds() -> float:
    return env_float("NEPS_REDIS_OPTIMIZER_WAIT_SECONDS", OPTIMIZER_WAIT_SECONDS)


def events_maxlen() -> int:
    return int(env_float("NEPS_REDIS_EVENTS_MAXLEN", EVENTS_MAXLEN))


def request_ttl_ms() -> int:
    return int(1000 * env_float("NEPS_REDIS_REQUEST_TTL_SECONDS", REQUEST_TTL_SECONDS))
