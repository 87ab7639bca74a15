"""Large files are streamed: pushing and pulling a file much larger than the memory it may use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SIZE = 256 * 2**20
LIMIT = 128 * 2**20  # the promise: the buffers a transfer holds are bounded, well under the file size

# Two measures: the peak of what Python allocated (tracemalloc: every transfer buffer, ours and the SDKs', is a
# Python object) and the RSS. The RSS also holds what glibc keeps of freed buffers in its per-thread arenas (on a
# quiet machine a GCS composite push's 8-part threads left it ~2.5x the buffers' peak), so it is only held to "never
# the whole file".
SCRIPT = textwrap.dedent("""
    import resource, sys, json, tracemalloc
    from cloudckpt import CheckpointStore
    url, src, out, action = sys.argv[1:5]
    store = CheckpointStore(url, **json.loads(sys.argv[5] if len(sys.argv) > 5 else "{}"))
    store.index() if action != "push" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    if action == "push":
        store.push(src, epoch=1)
    else:
        store.pull("latest", to=out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "held": tracemalloc.get_traced_memory()[1]}))
""")


def _run(url: str, src: str, out: str, action: str, options: dict | None = None) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", SCRIPT, url, src, out, action, json.dumps(options or {})],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _big(path):
    with open(path, "wb") as f:
        for _ in range(SIZE // (16 * 2**20)):
            f.write(os.urandom(16 * 2**20))
    return path


@pytest.mark.parametrize("kind", ["local", "s3", "gcs"])
def test_large_file_push_and_pull_stay_within_bounded_memory(kind, request, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    src = _big(tmp_path / "big.bin")
    push = _run(url, str(src), "", "push")
    pull = _run(url, "", str(tmp_path / "out"), "pull")
    assert (tmp_path / "out" / "big.bin").stat().st_size == SIZE
    with open(src, "rb") as a, open(tmp_path / "out" / "big.bin", "rb") as b:
        while chunk := a.read(16 * 2**20):
            assert chunk == b.read(16 * 2**20)
    for name, m in (("push", push), ("pull", pull)):
        added = m["peak"] - m["base"]
        assert m["held"] < LIMIT, f"{kind} {name} held {m['held'] / 2**20:.0f} MiB for a {SIZE / 2**20:.0f} MiB file"
        assert added < SIZE, f"{kind} {name} grew RSS by {added / 2**20:.0f} MiB for a {SIZE / 2**20:.0f} MiB file"


def test_a_gcs_push_holds_one_resumable_chunk_in_memory_not_two(gcs_url, tmp_path):
    # google-cloud-storage keeps the previous chunk alive through its last response while reading the next one; the
    # backend's response hook drops it. With 96 MiB chunks, two chunks alive would add ~192 MiB.
    chunk = 96 * 2**20
    push = _run(gcs_url, str(_big(tmp_path / "big.bin")), "", "push", {"chunk_size": chunk, "composite_threshold": 0})
    assert push["held"] < 1.5 * chunk, f"a GCS push with {chunk >> 20} MiB chunks held {push['held'] >> 20} MiB"
