"""Named crash points for the crash-consistency tests: ``CLOUDCKPT_FAILPOINT=<name>`` makes the process SIGKILL
itself when it reaches that point of the commit protocol. Unset (always, outside tests), ``hit`` is one dict lookup.

Points: ``push.after_upload`` (files stored, no manifest), ``push.after_manifest`` (manifest stored, index not
updated), ``push.after_index`` (committed, pruned objects not yet deleted), ``prune.after_index`` (index updated,
objects not yet deleted), ``gc.before_delete``.
"""

from __future__ import annotations

import os
import signal


def hit(name: str) -> None:
    if os.environ.get("CLOUDCKPT_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
