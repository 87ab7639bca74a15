"""Named crash points for the crash-consistency tests: ``CLOUDCKPT_FAILPOINT=<name>`` makes the process SIGKILL
itself when it reaches that point of the commit protocol. Unset (always, outside tests), ``hit`` is one dict lookup.

Points: ``push.after_upload`` (files stored, no manifest), ``push.after_manifest`` (manifest stored, index not
updated), ``push.after_index`` (committed, pruned objects not yet deleted), ``prune.after_index`` (index updated,
objects not yet deleted), ``gc.after_condemn`` (gc's names condemned in the index, nothing deleted yet),
``gc.before_delete``, ``keras.write.before_close`` (a background Keras file write, its temporary HDF5 file not yet
closed nor renamed), ``keras.writer.task`` (the Keras callback's background writer, before it writes a save point);
for a DCP save (cloudckpt.torch.dcp), on the rank where it is set: ``dcp.before_upload``, ``dcp.mid_upload`` (some
bytes of its objects sent), ``dcp.after_upload``, ``dcp.finish`` (the coordinator, nothing of its own stored yet),
``dcp.finish.after_manifest`` (manifest stored, index not updated; also the HF Trainer's sharded commit); for the HF
Trainer under FSDP (cloudckpt.hf.sharded): ``hf.sharded.before_upload``, ``hf.sharded.mid_upload``,
``hf.sharded.after_upload`` (this rank's files stored), ``hf.sharded.before_commit`` (rank 0, JSON metadata
stored, no manifest).
``<name>:<n>`` kills at the n-th time the point is reached; ``<name>:<n>:enospc`` raises ``OSError(ENOSPC)``
there instead, once (a full disk at that write).
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def hit(name: str) -> None:
    wanted = os.environ.get("CLOUDCKPT_FAILPOINT")
    if not wanted or not wanted.startswith(name):
        return
    point, _, rest = wanted.partition(":")
    if point != name:
        return
    nth, _, action = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if action == "enospc":
        if _hits[name] == int(nth or 1):
            raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    elif _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
