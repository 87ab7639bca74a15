"""How many ranged GETs a pull runs at once and how large each is, and the HTTP connections a store keeps for them.

A pull's ranges (:class:`~cloudckpt.fetch.RangePool`) share the store's HTTP connection pool with its own transfers
(``max_concurrency`` parts or blocks at a time): every store client's pool is sized for the larger of the two, so no
connection a range used is thrown away when it ends (urllib3 discards what doesn't fit its pool, with a warning, and
the next range opens a new connection: a TLS handshake on a cloud).
"""

from __future__ import annotations

import os

from .errors import ConfigurationError

MiB = 2**20
#: defaults measured through a shaped network (docs/benchmarks.md: 1 GiB at 40 MB/s per connection, 16 x 4 MiB
#: 0.69-0.71x the time of 8 x 8 MiB on S3, GCS and Azure, the same 64 MiB of memory); $CLOUDCKPT_RANGE_SIZE /
#: $CLOUDCKPT_CONCURRENCY
DEFAULT_RANGE_SIZE = 4 * MiB
DEFAULT_CONCURRENCY = 16
#: requests' and botocore's default pool: never fewer
_MIN_POOL = 10


def _env_int(name: str, default: int, low: int) -> int:
    """The integer in ``$name`` (``default`` when unset or empty); ConfigurationError when it isn't one >= ``low``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        raise ConfigurationError(f"${name} must be an integer >= {low}. Received: {raw!r}")
    return value


def pull_concurrency() -> int:
    """Ranged GETs a pull runs at once: $CLOUDCKPT_CONCURRENCY, else :data:`DEFAULT_CONCURRENCY`."""
    return _env_int("CLOUDCKPT_CONCURRENCY", DEFAULT_CONCURRENCY, 1)


def range_size() -> int:
    """Bytes per ranged GET: $CLOUDCKPT_RANGE_SIZE, else :data:`DEFAULT_RANGE_SIZE`."""
    return _env_int("CLOUDCKPT_RANGE_SIZE", DEFAULT_RANGE_SIZE, 64 * 1024)


def http_pool_size(max_concurrency: int) -> int:
    """Connections a store client keeps per host: its own ``max_concurrency`` transfers or a pull's ranges, whichever
    is more, and two for the index and manifests read or written beside them."""
    return max(_MIN_POOL, max(max_concurrency, pull_concurrency()) + 2)
