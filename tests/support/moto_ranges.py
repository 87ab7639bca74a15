"""moto's S3 server, answering a ranged GET by reading only that range of the object, as S3 does.

Stock moto (5.2.x) builds a GET's answer from the whole object (``FakeKey.value`` reads it all) and slices the range
out of it afterwards (NOTES.md): 32 ranges of a 256 MiB object read 8 GiB, so any client's parallel ranged GETs
measure the test server, not the client. Here, while a GET with one ``Range`` is answered, ``FakeKey.value`` is a
view that reads only the bytes sliced out of it. Everything else is moto's. For the bench (:mod:`bench.shaped`):

    python -m tests.support.moto_ranges -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import sys
import threading
from typing import Any

_ranged = threading.local()


class _RangeView:
    """Stands for an object's bytes: its length, and the slice ``_handle_range_header`` takes, read from the
    object's buffer alone."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __len__(self) -> int:
        return int(self._key.size)

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(len(self))
        with self._key.lock:
            self._key._value_buffer.seek(start)
            return self._key._value_buffer.read(max(0, stop - start))


def install() -> None:
    from moto.s3 import models, responses

    value = models.FakeKey.value

    def lazy_value(self: Any) -> Any:
        return _RangeView(self) if getattr(_ranged, "on", False) else value.fget(self)

    models.FakeKey.value = property(lazy_value, value.fset)  # type: ignore[method-assign]
    get_object = responses.S3Response.get_object

    def ranged_get_object(self: Any) -> Any:
        rng = self.headers.get("range") or ""
        _ranged.on = rng.startswith("bytes=") and "," not in rng and not self._get_int_param("partNumber") \
            and all(p.strip().isdigit() for p in rng[6:].split("-", 1))  # one "a-b" range: sliced right after
        try:
            return get_object(self)
        finally:
            _ranged.on = False

    responses.S3Response.get_object = ranged_get_object  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from moto.server import main

    sys.exit(main(sys.argv[1:]))
