"""The bytes of one DCP item, written in the format of DCP's own ``FileSystemWriter`` and read back without
unpickling anything from the store.

A tensor item is ``torch.save`` of the tensor (compact: its storage holds exactly its elements), as
``FileSystemWriter`` writes it, so a pulled folder loads with DCP's ``FileSystemReader``. Reading it back here takes
the one storage record of that archive (``<archive>/data/0``, stored uncompressed) as raw bytes and views them with
the dtype and shape of the validated metadata; the archive's pickle is never run. A bytes item (a value of the state
dict that is not a tensor; DCP's planner pickled it) is decoded with ``torch.load(weights_only=True)`` (plain data and
tensors only, no objects) and handed to DCP's planner re-encoded here.
"""

from __future__ import annotations

import io
import math
import re
import sys
import warnings
import zipfile

import google_crc32c
import torch

from ..errors import IntegrityError

_DATA = re.compile(r"^[^/]+/data/0$")
_RECORD = re.compile(r"^[^/]+/(data\.pkl|\.format_version|\.storage_alignment|byteorder|version|data/0|"
                     r"\.data/serialization_id)$")


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor item: ``torch.save`` of a compact CPU copy (a view's whole storage isn't saved)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
        t = t.contiguous().clone()
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


BLOCK = 1 << 20  #: bytes of a tensor's raw record per recorded crc32c: a part of a tensor is read and checked by blocks


def record_span(item: bytes) -> tuple[int, int]:
    """Where the raw storage record of a tensor item written by :func:`encode_tensor` lies inside it:
    ``(start, size)``."""
    with zipfile.ZipFile(io.BytesIO(item)) as archive:
        [info] = [i for i in archive.infolist() if _DATA.match(i.filename)]
    start = _payload_start(item, info, "a tensor item")
    assert info.compress_type == zipfile.ZIP_STORED
    return start, info.file_size


def block_crcs(raw: bytes | memoryview, block: int = BLOCK) -> list[str]:
    """The crc32c of each ``block`` bytes of ``raw`` (the last one shorter)."""
    return [google_crc32c.Checksum(bytes(raw[i:i + block])).digest().hex() for i in range(0, len(raw), block)]


with warnings.catch_warnings():  # torch warns once per process that a tensor over read-only bytes must not be
    warnings.simplefilter("ignore")  # written to: the tensors below never are (they are copied into the state dict)
    torch.frombuffer(b"\0", dtype=torch.uint8)


def view(data: bytes, start: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` over ``data`` from byte ``start``, without a copy: read-only (``data`` is immutable
    bytes), so a caller copies it into its own tensor before writing."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, offset=start, count=count).reshape(shape)


def decode_rows(data: bytes, dtype: torch.dtype, shape: list[int], where: str) -> torch.Tensor:
    """Rows of a tensor from their raw bytes (already checked against their blocks' checksums): a read-only
    :func:`view` of ``data``."""
    want = math.prod(shape) * dtype.itemsize
    if len(data) != want:
        raise IntegrityError(f"{where}: {len(data)} bytes for rows of size {shape} ({dtype}), want {want}")
    return view(data, 0, shape, dtype)


def decode_tensor(data: bytes, dtype: torch.dtype, shape: list[int], where: str) -> torch.Tensor:
    """The tensor saved by :func:`encode_tensor`, from its raw storage record only: IntegrityError when the archive
    is not one such tensor of ``dtype`` and ``shape``. A read-only :func:`view` of ``data`` (no copy: the caller
    checked ``data`` against its crc32c, which covers the record; the archive's own CRC-32 is not read)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            records = [i for i in infos if _DATA.match(i.filename)]
            if any(not _RECORD.match(n) for n in names) or len(records) != 1:
                raise IntegrityError(f"{where}: not a saved tensor (records {names[:8]})")
            byteorder = next((n for n in names if n.endswith("/byteorder")), None)
            if byteorder is not None and archive.read(byteorder).decode("ascii", "replace") != sys.byteorder:
                raise IntegrityError(f"{where}: saved with another byte order")
            want = math.prod(shape) * dtype.itemsize
            if records[0].file_size != want or records[0].compress_type != zipfile.ZIP_STORED:
                raise IntegrityError(f"{where}: storage record is {records[0].file_size} bytes, a {dtype} tensor of "
                                     f"size {shape} needs {want}")
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as exc:
        raise IntegrityError(f"{where}: not a saved tensor ({exc})") from None
    return view(data, _payload_start(data, records[0], where), shape, dtype)


def _payload_start(data: bytes, info: zipfile.ZipInfo, where: str) -> int:
    """Where the stored (uncompressed) bytes of ``info`` begin in the archive ``data``: after its local header."""
    header = data[info.header_offset:info.header_offset + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise IntegrityError(f"{where}: not a saved tensor (no local header for {info.filename})")
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    if start + info.file_size > len(data):
        raise IntegrityError(f"{where}: not a saved tensor (its record runs past the item's end)")
    return start


def safe_bytes_item(data: bytes, where: str) -> io.BytesIO:
    """A bytes item for DCP's planner: decoded here with ``weights_only=True`` (IntegrityError when it holds
    anything but plain data and tensors), handed on as bytes this process encoded."""
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses objects; a torn archive fails to open
        raise IntegrityError(f"{where}: refused a non-tensor item that is not plain data ({type(exc).__name__})") \
            from None
    out = io.BytesIO()
    torch.save(value, out)
    out.seek(0)
    return out
