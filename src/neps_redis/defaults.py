"""Every default of the package, in one place, with why it is what it is.

Each can be changed per process by the environment variable named beside it.
"""

from __future__ import annotations

import math
import os

# Layout version of a run's keys. A run written with another version is
# refused with a clear error rather than misread.
SCHEMA_VERSION = 1

# How long a claimed trial is leased to its worker before it may be taken
# over; the worker's heartbeat renews it. Long, because a false takeover
# costs a second evaluation: a process whose heartbeat thread is starved (an
# extension holding the GIL) or a caller with heartbeats off must keep its
# trial. A shorter lease requeues a dead worker's trial sooner.
# NEPS_REDIS_LEASE_SECONDS.
LEASE_SECONDS = 1800.0

# How often a worker's heartbeat renews the leases of the trials it holds.
# Six renewals fit in one lease, so a few missed ones (a busy machine, a
# reconnect) do not lose a trial; unset, it is the lease divided by six.
# NEPS_REDIS_HEARTBEAT_SECONDS.
HEARTBEAT_FRACTION = 6

# NEPS_REDIS_HEARTBEAT=0 turns heartbeats off for callers that renew leases
# themselves (or claim with a lease long enough for the whole evaluation).
HEARTBEAT_ENV = "NEPS_REDIS_HEARTBEAT"

# How often the live workers of a run, all together, look for trials whose
# lease expired: a run-wide lock with this expiry paces them. A dead
# worker's trial is back in the queue within its lease plus this.
# NEPS_REDIS_SWEEP_SECONDS.
SWEEP_SECONDS = 60.0

# How many claims a trial gets before a lost lease marks it crashed instead
# of pending: an evaluation that kills its worker every time (out of memory,
# a segfault) must not cycle through the workers forever.
# NEPS_REDIS_MAX_ATTEMPTS.
MAX_ATTEMPTS = 3

# How many expired trials one requeue script handles; keeps each script
# short, since a script blocks every other client while it runs.
SWEEP_BATCH = 200

# How often a client retries a command whose connection broke, and the
# backoff between tries (half fixed, half random, doubling from the base up
# to the cap). Ten tries wait at least 6.5 s in all (10 s on average), so a
# worker outlives a restart of its server that takes a few seconds, while a
# server that is not there at all is reported within half a minute.
CONNECTION_RETRIES = 10
CONNECTION_BACKOFF_BASE = 0.05
CONNECTION_BACKOFF_CAP = 2.0

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

# Pacing of a caller that asks for the evaluating trials in a loop (NePS's
# DDP ranks, which wait for rank 0's next trial without pausing): the pause
# doubles from the first to the second value while the answer stays the
# same, so a waiting rank costs the server about one read a second.
POLL_MIN_SECONDS = 0.05
POLL_MAX_SECONDS = 1.0

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
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={text!r} must be a finite number above 0.")
    return value


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# The settings as this process sees them: the default, unless overridden by
# the environment variable named beside it.


def lease_seconds() -> float:
    return env_float("NEPS_REDIS_LEASE_SECONDS", LEASE_SECONDS)


def heartbeat_seconds(lease: float) -> float:
    return env_float("NEPS_REDIS_HEARTBEAT_SECONDS", lease / HEARTBEAT_FRACTION)


def heartbeat_enabled() -> bool:
    text = os.environ.get(HEARTBEAT_ENV, "").strip().lower()
    return text not in ("0", "false", "no", "off")


def sweep_seconds() -> float:
    return env_float("NEPS_REDIS_SWEEP_SECONDS", SWEEP_SECONDS)


def max_attempts() -> int:
    value = env_float("NEPS_REDIS_MAX_ATTEMPTS", MAX_ATTEMPTS)
    if value != int(value):
        raise ValueError(f"NEPS_REDIS_MAX_ATTEMPTS={value!r} must be a whole number.")
    return int(value)


def optimizer_lease_seconds() -> float:
    return env_float("NEPS_REDIS_OPTIMIZER_LEASE_SECONDS", OPTIMIZER_LEASE_SECONDS)


def optimizer_wait_seconds() -> float:
    return env_float("NEPS_REDIS_OPTIMIZER_WAIT_SECONDS", OPTIMIZER_WAIT_SECONDS)


def events_maxlen() -> int:
    return int(env_float("NEPS_REDIS_EVENTS_MAXLEN", EVENTS_MAXLEN))


def request_ttl_ms() -> int:
    # At least a second: shorter would not outlive redis-py's own retries,
    # and a zero expiry would make the server refuse the write's last step.
    seconds = env_float("NEPS_REDIS_REQUEST_TTL_SECONDS", REQUEST_TTL_SECONDS)
    return max(1000, int(1000 * seconds))
