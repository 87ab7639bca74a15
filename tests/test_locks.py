"""The lock layer (filelock): the local store's index lock and the staging directories' owner locks, contended by
real processes, released when a holder is SIGKILLed, and no POSIX-only module needed (Windows has no fcntl)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from cloudckpt.backends.local import LocalBackend
from cloudckpt.uploader import UNLOCKED_GRACE, new_staging_dir, remove_staging

#: a PID no process of this namespace has (above the kernel's pid_max): another container's process, seen from here
FOREIGN_PID = 4_194_400


def _start(code: str, ready: Path) -> subprocess.Popen:
    """Run ``code`` in a child process and wait until it has written ``ready``."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_index_lock_held_by_another_process_blocks_the_swap_until_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    backend = LocalBackend(str(run))
    token = backend.write_index(b'{"v": 1}', None)
    ready = tmp_path / "ready"
    holder = _start(f"""
        import pathlib, time
        from filelock import FileLock
        lock = FileLock({str(run / ".index.lock")!r}); lock.acquire()
        pathlib.Path({str(ready)!r}).write_text("held"); time.sleep(300)
        """, ready)
    done = threading.Event()
    result = {}

    def swap():
        result["token"] = backend.write_index(b'{"v": 2}', token)
        done.set()

    thread = threading.Thread(target=swap, daemon=True)
    try:
        thread.start()
        assert not done.wait(1.5), "the index was swapped while another process held the lock"
        assert backend.read_index()[0] == b'{"v": 1}'
    finally:
        _kill(holder)  # SIGKILL: no release by the holder; the OS drops the lock
    assert done.wait(30), "the lock of a killed holder was never released"
    assert backend.read_index() == (b'{"v": 2}', result["token"])


def test_local_store_needs_no_fcntl(tmp_path):
    """Without fcntl (as on Windows) the default store still commits and restores; no "install cloudckpt[all]"."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(os.urandom(1000))
    code = f"""
        import sys
        sys.modules["fcntl"] = None  # what `import fcntl` finds on Windows: nothing
        from cloudckpt import CheckpointStore
        with CheckpointStore({str(tmp_path / "run")!r}) as store:
            store.push({str(tmp_path / "src")!r}, epoch=1)
            store.push({str(tmp_path / "src")!r}, epoch=2)
            print(store.pull("latest", to={str(tmp_path / "out")!r}).entry.epoch)
        """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2"]
    assert (tmp_path / "out" / "w.bin").read_bytes() == (tmp_path / "src" / "w.bin").read_bytes()


def test_a_live_owners_staging_is_never_swept_a_killed_owners_is(tmp_path):
    """The owner runs with a PID this namespace doesn't know (another container on the host): only its lock says
    it is alive. While it lives its staging stays; once SIGKILLed, the next run removes it."""
    root, folder, ready = tmp_path / "staging-root", tmp_path / "ckpt", tmp_path / "ready"
    owner = _start(f"""
        import os, pathlib, time
        os.getpid = lambda: {FOREIGN_PID}
        from cloudckpt.uploader import new_staging_dir
        staging = new_staging_dir({str(root)!r}, pathlib.Path({str(folder)!r}))
        (staging / "job-000001").mkdir()
        (staging / "job-000001" / "model.weights.h5").write_bytes(b"w" * 1000)
        pathlib.Path({str(ready)!r}).write_text(str(staging)); time.sleep(300)
        """, ready)
    theirs = Path(ready.read_text())
    try:
        assert theirs.name.startswith(f"cloudckpt-staging-{FOREIGN_PID}-")
        mine = new_staging_dir(root, folder)
        assert (theirs / "job-000001" / "model.weights.h5").exists(), "a live owner's staging was swept"
        remove_staging(mine)
    finally:
        _kill(owner)
    gone = time.time() - UNLOCKED_GRACE - 5  # a directory is judged once it is older than the grace
    os.utime(theirs, (gone, gone))
    mine = new_staging_dir(root, folder)
    try:
        assert not theirs.exists(), "a killed owner's staging was left behind"
        assert sorted(p.name for p in root.iterdir()) == [mine.name]
    finally:
        remove_staging(mine)


RACER = """
import pathlib, sys
from cloudckpt.uploader import new_staging_dir, remove_staging
root, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for i in range(int(sys.argv[3])):
    d = new_staging_dir(root, folder)  # sweeps the others' directories, then takes its own lock
    (d / "job").mkdir()
    assert (d / "job").is_dir(), "a live staging directory was swept"
    remove_staging(d)
"""


def test_processes_sharing_a_staging_root_never_sweep_or_block_each_others_new_directories(tmp_path):
    """Every process sweeps the shared root when it makes its own directory: a sweep that probes a directory between
    its creation and its owner's lock must neither remove it nor make the owner fail to lock it (seen in CI with
    two test workers: filelock Timeout on a fresh '.owner.lock')."""
    root, folder = tmp_path / "root", tmp_path / "ckpt"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(folder), "300"], stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)
