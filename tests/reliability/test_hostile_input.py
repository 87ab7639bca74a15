"""Hostile and bad input: every case of :mod:`hostile_corpus` ends in its typed error (API) and its documented exit
code (CLI), leaves no partial files, and writes nothing outside the pull target — the target itself keeps the
earlier good pull untouched."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudckpt import cli
from cloudckpt.errors import CloudCkptError, IntegrityError, UnsafePathError
from cloudckpt.manifest import CheckpointEntry, FileEntry
from cloudckpt.restore import pull_into

from .hostile_corpus import CORPUS, EVIL_ABS, Run, valid_run


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything below ``root``: type, size, content hash or link target (symlinks not followed)."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def cli_exit(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


class Restorer:
    """Puts the valid run and the good pull back after each case."""

    def __init__(self, run: Run, sandbox: Path) -> None:
        self.run = run
        self.sandbox = sandbox
        backend = run.store.backend
        self.objects = {o.rel: backend.read_bytes(o.rel) for o in backend.list_objects()}
        self.good = sandbox.parent / "good-pull"
        shutil.copytree(run.target, self.good)
        # A pull re-uses the target's files that verify (cloudckpt.pull_plan) and would never read the tampered
        # objects: the earlier pull's files are changed locally (same size, a byte flipped), so every file is
        # fetched, and the target (whose files the pull first hard-links and checks) must still come out untouched.
        for f in self.good.rglob("*"):
            if f.is_file() and f.name != ".cloudckpt.json" and f.stat().st_size:
                data = bytearray(f.read_bytes())
                data[-1] ^= 0xFF
                f.write_bytes(bytes(data))

    def restore(self) -> None:
        backend = self.run.store.backend
        root = getattr(backend, "root", None)
        if root is not None:  # local: links planted by a case go first, so nothing is written through them
            for dirpath, dirs, files in os.walk(root):
                for name in dirs + files:
                    p = Path(dirpath) / name
                    if p.is_symlink():
                        p.unlink()
        extra = [o.rel for o in backend.list_objects() if o.rel not in self.objects]
        if extra:
            backend.delete(extra)
        for rel, data in self.objects.items():
            backend.write_bytes(rel, data)
        for p in self.sandbox.iterdir():
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p)
        shutil.copytree(self.good, self.run.target)


@pytest.fixture(params=["local", "s3"])
def hostile_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def test_hostile_corpus(hostile_url, tmp_path, figures):
    kind = "s3" if hostile_url.startswith("s3://") else "local"
    sandbox = tmp_path / "sandbox"
    target = sandbox / "target"
    sandbox.mkdir()
    run = valid_run(hostile_url, tmp_path / "src", target)
    restorer = Restorer(run, sandbox)
    failures: list[str] = []
    cli_tried: Counter = Counter()
    tried = 0
    with run.store:
        for case in CORPUS:
            if case.local_only and kind != "local":
                continue
            restorer.restore()
            case.mutate(run)
            before = snapshot(sandbox)
            tried += 1
            try:
                store = run.store  # the same client throughout: a cached index must not hide a tampered one
                if case.op == "pull":
                    with pytest.raises(case.error):
                        store.pull("latest", to=target)
                    args = ["pull", "latest", "--remote", hostile_url, "--to", str(target)]
                else:
                    results = store.verify(all=True)
                    assert [r.ok for r in results].count(False) == 1, results
                    args = ["verify", "--remote", hostile_url, "--all"]
                assert snapshot(sandbox) == before, "the failed API call changed files beside or in the target"
                if kind != "local" and tried % 3 and case.exit_code == 4:
                    continue  # each CLI call opens a fresh S3 client (~0.35 s of botocore set-up): a third suffice
                code, err = cli_exit(*args)
                cli_tried[kind] += 1
                assert code == case.exit_code, f"exit {code}, expected {case.exit_code}: {err.strip()[-300:]}"
                assert err.count("\n") == 1 and err.startswith("cloudckpt: "), f"not one line: {err!r}"
                assert snapshot(sandbox) == before, "the failed CLI call changed files beside or in the target"
                assert not Path(EVIL_ABS).exists()
            except BaseException as exc:  # collect every failing case, then fail once with all of them
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:400]}")
    figures["bad_inputs"][kind] += tried
    figures["bad_inputs_via_cli"][kind] += cli_tried[kind]
    assert not failures, f"{len(failures)} of {tried} hostile cases misbehaved:\n" + "\n".join(failures)
    assert tried >= 30


def test_fallback_skips_a_tampered_latest(hostile_url, tmp_path, figures):
    """``pull --fallback`` restores the newest older checkpoint that verifies, and says which it skipped."""
    run = valid_run(hostile_url, tmp_path / "src", tmp_path / "first")
    with run.store as store:
        rel = run.latest_file()
        data = bytearray(store.backend.read_bytes(rel))
        data[0] ^= 1
        store.backend.write_bytes(rel, bytes(data))
        result = store.pull("latest", to=tmp_path / "restored", fallback=True)
        assert result.skipped == (run.index["latest"],)
        assert result.entry.id != run.index["latest"]
        assert (tmp_path / "restored" / "sub" / "opt.bin").read_bytes() == b"optimizer-state-0" * 500
    proc = subprocess.run([sys.executable, "-m", "cloudckpt", "pull", "latest", "--remote", hostile_url, "--to",
                           str(tmp_path / "cli"), "--fallback"], capture_output=True, text=True, timeout=120)
    # a real process: the warning goes through logging, which pytest's own handlers capture in-process
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "failed verification" in ln]  # one line for the event
    assert run.index["latest"] in line
    figures["bad_inputs"]["fallback"] += 1


@pytest.mark.parametrize("path", ["../escape.bin", "sub/../../escape.bin", "/tmp/cloudckpt-evil-abs.bin"])
def test_restore_refuses_escaping_paths_even_past_validation(local_url, tmp_path, path, figures):
    """Defense in depth: an entry that bypassed schema validation still can't write outside the target."""
    run = valid_run(local_url, tmp_path / "src", tmp_path / "first")
    sandbox = tmp_path / "box"
    (sandbox / "deep").mkdir(parents=True)
    evil = FileEntry.model_construct(path=path, size=3, crc32c="00000000", sha256=None)
    entry = CheckpointEntry.model_construct(id=run.index["latest"], epoch=1, step=None, created=None, metrics={},
                                            files=(evil,), size=3, writer=None, pinned=False, meta={})
    before = snapshot(tmp_path / "box")
    with run.store, ThreadPoolExecutor(2) as pool:
        with pytest.raises(CloudCkptError) as info:
            pull_into(run.store.backend, entry, sandbox / "deep" / "target", budget=5, pool=pool)
    assert isinstance(info.value, IntegrityError)
    if ".." in path:
        assert isinstance(info.value, UnsafePathError)
    assert snapshot(tmp_path / "box") == before
    assert not Path("/tmp/cloudckpt-evil-abs.bin").exists() and not (tmp_path / "escape.bin").exists()
    figures["bad_inputs"]["bypassed-validation"] += 1


def test_cli_process_exit_codes_on_bad_runs(local_url, tmp_path, figures):
    """The same mapping through a real ``cloudckpt`` process: tampered index 4, no run 3, foreign target 5."""
    from .procs import cli_cmd
    from .procs import run as run_proc

    good = valid_run(local_url, tmp_path / "src", tmp_path / "first")
    good.store.close()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    out = run_proc(cli_cmd("pull", "latest", "--remote", local_url, "--to", str(tmp_path / "foreign")))
    assert out.returncode == 5 and (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    out = run_proc(cli_cmd("ls", "--remote", str(tmp_path / "no-such-run")))
    assert out.returncode == 3, out.stderr
    good.put_index(good.raw[:-20])
    out = run_proc(cli_cmd("pull", "latest", "--remote", local_url, "--to", str(tmp_path / "t")))
    assert out.returncode == 4 and out.stderr.startswith("cloudckpt: error: index is invalid")
    assert not (tmp_path / "t").exists()
    figures["bad_inputs_via_cli"]["process"] += 3


def test_keras_resume_treats_the_index_as_input(tmp_path, figures, caplog):
    """Each hostile entry of :data:`KERAS_CORPUS` pushed into a run the callback committed: a resumed ``fit`` goes
    on (from the valid checkpoint when the hostile one can't be resumed from), says what it skipped, writes nothing
    outside the callback's folder and nothing there but Keras' own file, even with ``prune_local``."""
    keras = pytest.importorskip("keras")
    import logging

    from support.keras_job import build_model, data

    from cloudckpt.keras import CloudCheckpoint

    from .hostile_corpus import KERAS_CORPUS, KerasRun

    x, y = data()
    x, y = x[:640], y[:640]
    box, store_dir = tmp_path / "box", tmp_path / "store"
    (box / "outside").mkdir(parents=True)
    (box / "outside" / "secret.txt").write_text("the user's secret")
    filepath = str(box / "ckpt" / "m.weights.h5")

    def fit(epochs: int) -> CloudCheckpoint:
        keras.utils.set_random_seed(3)
        cb = CloudCheckpoint(filepath, save_weights_only=True, remote=str(store_dir), keep_best=1, keep_last=2,
                             prune_local=True, preemption=None, staging_dir=str(tmp_path / "staging"))
        build_model().fit(x, y, batch_size=64, epochs=epochs, validation_split=0.2, verbose=0, callbacks=[cb])
        return cb

    first = fit(1)
    run = KerasRun(str(store_dir), box, filepath, first.uploader.committed[-1].id)
    pristine = tmp_path / "pristine"
    shutil.copytree(store_dir, pristine)
    failures = []
    caplog.set_level(logging.WARNING, logger="cloudckpt")
    for case in KERAS_CORPUS:
        shutil.rmtree(store_dir)
        shutil.copytree(pristine, store_dir)
        (box / "ckpt" / "m.weights.h5").unlink(missing_ok=True)  # another machine: resume puts the file back
        hostile = case.mutate(run)
        before = {k: v for k, v in snapshot(box).items() if not k.startswith("ckpt")}
        caplog.clear()
        try:
            cb = fit(2)
            assert cb.resumed_from == (run.good if case.skips_checkpoint else hostile), cb.resumed_from
            assert {k: v for k, v in snapshot(box).items() if not k.startswith("ckpt")} == before, \
                "files outside the callback's folder changed"
            assert not Path(EVIL_ABS).exists()
            assert sorted(os.listdir(box / "ckpt")) == ["m.weights.h5"], "only Keras' own file in the folder"
            warned = " ".join(r.getMessage() for r in caplog.records)
            assert hostile in warned, f"no warning names the hostile checkpoint {hostile}: {warned[:300]}"
        except Exception as exc:  # collect every failing case, then fail once with all of them
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:300]}")
    figures["bad_inputs"]["keras-resume"] += len(KERAS_CORPUS)
    assert not failures, (f"{len(failures)} of {len(KERAS_CORPUS)} hostile Keras cases misbehaved:\n"
                          + "\n".join(failures))
