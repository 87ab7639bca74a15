"""The coordinator's metadata encoder, explored: whatever DCP metadata and stored items a save produces, the JSON
``encode`` writes is what ``parse_metadata`` accepts and gives back, field for field, and ``to_dcp`` rebuilds the same
DCP ``Metadata`` from it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from torch.distributed.checkpoint.metadata import (  # noqa: E402
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from cloudckpt.errors import ConfigurationError  # noqa: E402
from cloudckpt.torch.dcp_format import (  # noqa: E402
    DTYPES,
    MAX_DIMS,
    Record,
    StoredItem,
    encode,
    parse_metadata,
    to_dcp,
)

_CRC = st.integers(0, 2**32 - 1).map(lambda v: f"{v:08x}")


@st.composite
def saves(draw: st.DrawFn) -> tuple[Metadata, list[StoredItem], dict[str, int]]:
    """A save's DCP metadata (tensors cut into row chunks, opaque bytes items) and where each item was stored."""
    sd: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    stored: list[StoredItem] = []
    files: dict[str, int] = {}
    for i in range(draw(st.integers(0, 6))):
        fqn = draw(st.sampled_from([f"layer{i}.weight", f"opt.state.{i}", f"ünï {i}", f"a\"b\\{i}"]))
        file = f"__{draw(st.integers(0, 3))}_0.distcp"
        start = files.get(file, 0)
        if draw(st.booleans()):
            sd[fqn] = BytesStorageMetadata()
            length = draw(st.integers(0, 50))
            stored.append(StoredItem(fqn=fqn, index=draw(st.none() | st.integers(0, 3)), file=file, start=start,
                                     length=length, crc32c=draw(_CRC)))
            files[file] = start + length
            continue
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        dims = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
        rows = draw(st.integers(1, 4))
        size = [dims[0] * rows, *dims[1:]]
        chunks = [ChunkStorageMetadata(torch.Size([r * dims[0], *[0] * (len(dims) - 1)]), torch.Size(dims))
                  for r in range(rows)]
        sd[fqn] = TensorStorageMetadata(TensorProperties(dtype=DTYPES[dtype], requires_grad=draw(st.booleans())),
                                        torch.Size(size), chunks)
        nbytes = math.prod(dims) * DTYPES[dtype].itemsize
        for c in chunks:
            record = None
            if draw(st.booleans()):
                block = draw(st.sampled_from([4096, 8192]))
                record = Record(start=3, size=nbytes, block=block,
                                crc32c=[draw(_CRC) for _ in range(-(-nbytes // block))])
            length = nbytes + 3 + draw(st.integers(0, 9))
            stored.append(StoredItem(fqn=fqn, offset=list(c.offsets), file=file, start=start, length=length,
                                     crc32c=draw(_CRC), record=record))
            start += length
        files[file] = start
    planner = draw(st.none() | st.dictionaries(st.text(max_size=5), st.lists(st.text(max_size=3) | st.integers(),
                                                                              max_size=3), max_size=3))
    md = Metadata(state_dict_metadata=sd, planner_data=planner, version=draw(st.none() | st.just("1.0.0")))
    return md, draw(st.permutations(stored)), files


@settings(max_examples=150, deadline=None)
@given(saves())
def test_encoded_metadata_parses_back_to_what_was_saved(save):
    md, stored, files = save
    parsed = parse_metadata(encode(md, stored), files)

    assert parsed.storage == sorted(stored, key=lambda s: (s.file, s.start))
    assert parsed.dcp_version == md.version
    assert parsed.planner_data == ({k: list(v) for k, v in md.planner_data.items()} if md.planner_data else
                                   md.planner_data)
    back = to_dcp(parsed, {}).state_dict_metadata
    assert back.keys() == md.state_dict_metadata.keys()
    for fqn, want in md.state_dict_metadata.items():
        got = back[fqn]
        assert type(got) is type(want)
        if isinstance(want, TensorStorageMetadata):
            assert (got.size, got.properties.dtype, got.properties.requires_grad) == (
                want.size, want.properties.dtype, want.properties.requires_grad)
            assert [(c.offsets, c.sizes) for c in got.chunks] == [(c.offsets, c.sizes) for c in want.chunks]


def test_a_tensor_a_checkpoint_cannot_hold_is_refused_at_encode_not_at_restore():
    too_many = torch.Size([1] * (MAX_DIMS + 1))
    md = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), too_many, [ChunkStorageMetadata(torch.Size([0] * len(too_many)),
                                                                                too_many)])})
    with pytest.raises(ConfigurationError, match="dimensions"):
        encode(md, [])
