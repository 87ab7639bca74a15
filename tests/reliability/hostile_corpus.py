"""A corpus of bad indexes, manifests, objects and pull targets, each with the typed error and CLI exit code it must
end in. Each case mutates a valid run (two checkpoints, nested files) through the store's own backend, the way a
corrupted bucket or a hostile party would; :func:`valid_run` builds that run."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloudckpt import CheckpointStore
from cloudckpt.errors import ConfigurationError, IntegrityError
from cloudckpt.manifest import INDEX_NAME, MANIFEST_NAME

EVIL_ABS = "/tmp/cloudckpt-evil-target/owned.bin"


@dataclass
class Run:
    """The valid run a case starts from."""

    store: CheckpointStore
    index: dict  # the valid index as JSON data
    raw: bytes
    target: Path  # where pulls go (holds an earlier good pull)

    def put_index(self, data: dict | bytes) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.store.backend.write_bytes(INDEX_NAME, raw)

    def edit(self, fn: Callable[[dict], object]) -> None:
        """Apply ``fn`` to a copy of the valid index and store the result."""
        data = copy.deepcopy(self.index)
        fn(data)
        self.put_index(data)

    def latest(self, data: dict) -> dict:
        return next(c for c in data["checkpoints"] if c["id"] == data["latest"])

    def older(self, data: dict) -> dict:
        return next(c for c in data["checkpoints"] if c["id"] != data["latest"])

    def latest_file(self, name: str = "sub/opt.bin") -> str:
        return f"{self.index['latest']}/{name}"

    def manifest(self) -> dict:
        return json.loads(self.store.backend.read_bytes(f"{self.index['latest']}/{MANIFEST_NAME}"))

    def put_manifest(self, data: dict | bytes) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.store.backend.write_bytes(f"{self.index['latest']}/{MANIFEST_NAME}", raw)


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Run], None]
    op: str = "pull"  # pull | verify | ls
    error: type[Exception] = IntegrityError
    exit_code: int = 4
    local_only: bool = False


def _set(path: str, value) -> Callable[[Run], None]:
    """Set a field of the latest checkpoint's first file (``file.x``), of the latest entry (``entry.x``) or of the
    index (``x``)."""

    def mutate(run: Run) -> None:
        def fn(data: dict) -> None:
            where, _, key = path.rpartition(".")
            obj = {"": data, "entry": run.latest(data), "file": run.latest(data)["files"][0]}[where]
            obj[key] = value
        run.edit(fn)

    return mutate


def _bad_path(path: str) -> Callable[[Run], None]:
    return _set("file.path", path)


def _dup_ids(run: Run) -> None:
    run.edit(lambda d: d["checkpoints"].append(copy.deepcopy(d["checkpoints"][0])))


def _many_files(run: Run) -> None:
    def fn(d: dict) -> None:
        e = run.latest(d)
        e["files"] = [{"path": f"f{i}", "size": 0, "crc32c": "00000000"} for i in range(100_001)]
        e["size"] = 0
    run.edit(fn)


def _dup_file(run: Run) -> None:
    def fn(d: dict) -> None:
        e = run.latest(d)
        e["files"].append(copy.deepcopy(e["files"][0]))
        e["size"] += e["files"][0]["size"]
    run.edit(fn)


def _file_and_dir(run: Run) -> None:
    def fn(d: dict) -> None:
        e = run.latest(d)
        e["files"].append({"path": "sub", "size": 0, "crc32c": "00000000"})
    run.edit(fn)


def _size_lies(run: Run) -> None:
    def fn(d: dict) -> None:
        e = run.latest(d)
        e["files"][0]["size"] += 10
        e["size"] += 10
    run.edit(fn)


def _absurd_but_legal_size(run: Run) -> None:
    def fn(d: dict) -> None:
        e = run.latest(d)
        e["files"][0]["size"] = 2**49
        e["size"] = sum(f["size"] for f in e["files"])
    run.edit(fn)


def _wrong_crc(run: Run) -> None:
    def fn(d: dict) -> None:
        f = run.latest(d)["files"][0]
        f["crc32c"] = "00000000" if f["crc32c"] != "00000000" else "11111111"
    run.edit(fn)


def _flip_byte(run: Run) -> None:
    rel = run.latest_file()
    data = bytearray(run.store.backend.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    run.store.backend.write_bytes(rel, bytes(data))


def _truncate_object(run: Run) -> None:
    rel = run.latest_file()
    run.store.backend.write_bytes(rel, run.store.backend.read_bytes(rel)[:-7])


def _extend_object(run: Run) -> None:
    rel = run.latest_file()
    run.store.backend.write_bytes(rel, run.store.backend.read_bytes(rel) + b"extra")


def _delete_object(run: Run) -> None:
    run.store.backend.delete([run.latest_file()])


def _symlink_object(run: Run) -> None:
    outside = Path(run.store.backend.root).parent / "outside-secret.bin"
    outside.write_bytes(b"secret bytes outside the store")
    p = Path(run.store.backend.root) / run.latest_file()
    p.unlink()
    os.symlink(outside, p)


def _symlink_checkpoint_dir(run: Run) -> None:
    root = Path(run.store.backend.root)
    outside = root.parent / "outside-dir"
    outside.mkdir(exist_ok=True)
    (outside / "w.bin").write_bytes(b"not the checkpoint")
    victim = root / run.index["latest"]
    for p in sorted(victim.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    victim.rmdir()
    os.symlink(outside, victim)


def _manifest_edit(fn: Callable[[dict], object]) -> Callable[[Run], None]:
    def mutate(run: Run) -> None:
        m = run.manifest()
        fn(m)
        run.put_manifest(m)
    return mutate


def _target_symlink(run: Run) -> None:
    elsewhere = run.target.parent / "elsewhere"
    elsewhere.mkdir()
    for p in sorted(run.target.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    run.target.rmdir()
    os.symlink(elsewhere, run.target)


def _target_foreign_dir(run: Run) -> None:
    (run.target / ".cloudckpt.json").unlink()
    (run.target / "users-thesis.tex").write_text("precious")


def _target_is_file(run: Run) -> None:
    for p in sorted(run.target.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    run.target.rmdir()
    run.target.write_text("a file where the directory should be")


def _half(run: Run) -> None:
    run.put_index(run.raw[: len(run.raw) // 2])


CORPUS: list[Case] = [
    # --- the index: not JSON, not ours, wrong types, unknown versions ---------------------------------------------
    Case("empty index", lambda r: r.put_index(b"")),
    Case("truncated index", _half),
    Case("index is random bytes", lambda r: r.put_index(os.urandom(300))),
    Case("index is invalid UTF-8", lambda r: r.put_index(b"\xff\xfe{}")),
    Case("index is a JSON array", lambda r: r.put_index(b"[]")),
    Case("index is JSON null", lambda r: r.put_index(b"null")),
    Case("index is a JSON string", lambda r: r.put_index(b'"index"')),
    Case("index nested 100k deep", lambda r: r.put_index(b"[" * 100_000)),
    Case("unknown schema_version 4", _set("schema_version", 4)),
    Case("schema_version as string", _set("schema_version", "1")),
    Case("schema_version 1e400",
         lambda r: r.put_index(r.raw.replace(b'"schema_version":1', b'"schema_version":1e400'))),
    Case("schema names a manifest", _set("schema", "cloudckpt/manifest")),
    Case("unknown top-level field", _set("owned", True)),
    Case("checkpoints is an object", _set("checkpoints", {"a": 1})),
    Case("seq negative", _set("seq", -1)),
    # --- entries ---------------------------------------------------------------------------------------------------
    Case("duplicate checkpoint ids", _dup_ids),
    Case("latest names an unknown id", _set("latest", "ckpt-nope-00000000")),
    Case("best names an unknown id", _set("best", "ckpt-nope-00000000")),
    Case("checkpoints but no latest", _set("latest", None)),
    Case("checkpoint id '..'", _set("entry.id", "..")),
    Case("checkpoint id with a slash", _set("entry.id", "ckpt-a/../../x")),
    Case("checkpoint id 'index.json'", _set("entry.id", "index.json")),
    Case("checkpoint id 200 chars", _set("entry.id", "c" * 200)),
    Case("negative epoch", _set("entry.epoch", -1)),
    Case("epoch as string", _set("entry.epoch", "3")),
    Case("metrics are strings", _set("entry.metrics", {"val_loss": "low"})),
    Case("metric is Infinity", lambda r: r.put_index(r.raw.replace(b'"val_loss":', b'"val_loss":Infinity,"x":', 1))),
    Case("created is not a date", _set("entry.created", "yesterday")),
    Case("total size not the sum of files", _set("entry.size", 1)),
    Case("entry lists no files", _set("entry.files", [])),
    Case("enormous file count (100,001)", _many_files),
    Case("a file listed twice", _dup_file),
    Case("a file that is also a directory", _file_and_dir),
    # --- files: sizes, checksums, hostile paths ---------------------------------------------------------------
    Case("negative file size", _set("file.size", -5)),
    Case("absurd file size 2**60", _set("file.size", 2**60)),
    Case("file size 1e400", lambda r: r.put_index(r.raw.replace(b'"size":', b'"size":1e400,"y":', 1))),
    Case("file size as float", _set("file.size", 1.5)),
    Case("file size as string", _set("file.size", "10")),
    Case("crc32c not hex", _set("file.crc32c", "XYZ")),
    Case("no checksum at all", lambda r: r.edit(lambda d: [f.pop("crc32c") for f in r.latest(d)["files"]])),
    Case("path '..' escape", _bad_path("../escape.bin")),
    Case("path escapes through a subdir", _bad_path("sub/../../escape.bin")),
    Case("absolute path", _bad_path(EVIL_ABS)),
    Case("Windows drive path", _bad_path("C:\\evil.bin")),
    Case("backslash path", _bad_path("..\\evil.bin")),
    Case("path with a newline", _bad_path("a\nb.bin")),
    Case("path with NUL", _bad_path("a\x00b.bin")),
    Case("empty path", _bad_path("")),
    Case("path '.'", _bad_path(".")),
    Case("path is the manifest's name", _bad_path(MANIFEST_NAME)),
    Case("path 2000 chars", _bad_path("p" * 2000)),
    # --- a valid index over bad bytes -------------------------------------------------------------------------
    Case("checksum mismatch (a byte flipped)", _flip_byte),
    Case("object truncated", _truncate_object),
    Case("object extended", _extend_object),
    Case("object missing", _delete_object),
    Case("index size larger than the object", _size_lies),
    Case("absurd but legal size (512 TiB)", _absurd_but_legal_size),
    Case("index checksum wrong", _wrong_crc),
    Case("object is a symlink out of the store", _symlink_object, local_only=True),
    Case("checkpoint dir is a symlink out of the store", _symlink_checkpoint_dir, local_only=True),
    # --- manifests (checked by verify) --------------------------------------------------------------------------------
    Case("manifest missing", lambda r: r.store.backend.delete([f"{r.index['latest']}/{MANIFEST_NAME}"]), op="verify"),
    Case("manifest truncated", lambda r: r.put_manifest(json.dumps(r.manifest()).encode()[:40]), op="verify"),
    Case("manifest differs from the index", _manifest_edit(lambda m: m["checkpoint"].update(metrics={"val_loss": 9.0})),
         op="verify"),
    Case("manifest unknown schema_version", _manifest_edit(lambda m: m.update(schema_version=7)), op="verify"),
    Case("manifest with a '..' path", _manifest_edit(lambda m: m["checkpoint"]["files"][0].update(path="../x")),
         op="verify"),
    # --- the pull target --------------------------------------------------------------------------------------
    Case("pull target is a symlink", _target_symlink, error=ConfigurationError, exit_code=5),
    Case("pull target is someone else's directory", _target_foreign_dir, error=ConfigurationError, exit_code=5),
    Case("pull target is a file", _target_is_file, error=ConfigurationError, exit_code=2),  # click checks --to: usage
]


def valid_run(url: str, src_root: Path, target: Path) -> Run:
    """Push two checkpoints (nested files) and pull the latest into ``target``; return the run."""
    store = CheckpointStore(url, budget=20)
    for i in range(2):
        src = src_root / f"src{i}"
        (src / "sub").mkdir(parents=True)
        (src / "model.bin").write_bytes(bytes(range(256)) * (40 + i))
        (src / "sub" / "opt.bin").write_bytes(b"optimizer-state-%d" % i * 500)
        store.push(src, epoch=i, step=100 * i, metrics={"val_loss": 1.0 - i / 10}, monitor="val_loss")
    raw, _ = store.backend.read_index()
    store.pull("latest", to=target)
    return Run(store, json.loads(raw), raw, target)


# --- Keras resume: the index and the resume state are input, not instructions ---------------------------------------


@dataclass
class KerasRun:
    """A run the Keras callback committed (``filepath`` in ``box/ckpt``) and the places a hostile entry aims at:
    ``box/outside`` (beside the job's folder, holding a secret) and :data:`EVIL_ABS`."""

    url: str
    box: Path
    filepath: str
    good: str  # id of the valid latest checkpoint

    @property
    def outside(self) -> Path:
        return self.box / "outside"

    def push_copy(self, *, meta: dict | None = None, state: Callable[[dict], object] | bytes | None = None,
                  files: Callable[[Path], object] | None = None, best: bool = True) -> str:
        """Commit a copy of the valid latest checkpoint as a new one, as anyone who can write to the bucket can:
        with ``meta`` as its entry's metadata, its ``state.json`` edited by ``state`` (or replaced by bytes), its
        directory edited by ``files``, and (``best``) a metric that makes it the run's best. Returns its id."""
        import tempfile

        with CheckpointStore(self.url) as store:
            good = store.index().get(self.good)
            src = Path(tempfile.mkdtemp(dir=self.box.parent)) / "copy"
            store.pull(self.good, to=src)
            (src / ".cloudckpt.json").unlink()
            if state is not None:
                sj = src / "cloudckpt_state" / "state.json"
                if isinstance(state, bytes):
                    sj.write_bytes(state)
                else:
                    doc = json.loads(sj.read_text())
                    state(doc)
                    sj.write_text(json.dumps(doc))
            if files is not None:
                files(src)
            entry = store.push(src, epoch=good.epoch, step=(good.step or 0) + 1,
                               metrics={"val_loss": -1.0} if best else {}, meta={**good.meta, **(meta or {})},
                               monitor="val_loss", keep_best=None, keep_last=None)
            return entry.id


@dataclass(frozen=True)
class KerasCase:
    name: str
    mutate: Callable[[KerasRun], object]
    skips_checkpoint: bool = False  # the hostile checkpoint can't be resumed from: resume takes the valid one


def _meta(**meta: str) -> Callable[[KerasRun], object]:
    def mutate(run: KerasRun) -> str:
        where = dict(outside=run.outside, ckpt=run.box / "ckpt", evil=EVIL_ABS, up="../" * 40)
        return run.push_copy(meta={k: v.format(**where).replace("//", "/") for k, v in meta.items()})

    return mutate


def _state(edit: Callable[[dict], object] | bytes) -> Callable[[KerasRun], object]:
    return lambda run: run.push_copy(state=edit, best=False)


def _files(edit: Callable[[Path], object]) -> Callable[[KerasRun], object]:
    return lambda run: run.push_copy(files=edit, best=False)


def _text_variables(checkpoint: Path) -> None:
    """Every array in ``variables.npz`` replaced by text of the same shape."""
    import numpy as np

    npz = checkpoint / "cloudckpt_state" / "variables.npz"
    with np.load(npz) as z:
        arrays = {k: np.full(z[k].shape, "x") for k in z.files}
    with open(npz, "wb") as f:
        np.savez(f, **arrays)


KERAS_CORPUS: list[KerasCase] = [
    KerasCase("best's local_path is a file outside the job's folder", _meta(local_path="{outside}/autostart.desktop")),
    KerasCase("best's local_path is an absolute path in /tmp", _meta(local_path="{evil}")),
    KerasCase("best's local_path can't be created on this machine", _meta(local_path="/proc/cloudckpt/m.weights.h5")),
    KerasCase("best's file reads from outside the checkpoint",
              _meta(file="{up}{outside}/secret.txt", local_path="{ckpt}/stolen.weights.h5")),
    KerasCase("best's local_file escapes with '..'", _meta(local_file="../outside/escape.weights.h5")),
    KerasCase("best's local_file is absolute", _meta(local_file="{outside}/abs.weights.h5")),
    KerasCase("best's local_file has a suffix Keras never writes", _meta(local_file="autostart.sh")),
    KerasCase("best's local_file is a dot file", _meta(local_file=".bashrc.weights.h5")),
    KerasCase("state's weights_file escapes the checkpoint",
              _state(lambda d: d.update(weights_file="../" * 40 + "etc/passwd")), skips_checkpoint=True),
    KerasCase("state's weights_file names a file the checkpoint lacks",
              _state(lambda d: d.update(weights_file="other.weights.h5")), skips_checkpoint=True),
    KerasCase("state's initial_epoch is a string", _state(lambda d: d.update(initial_epoch="1")),
              skips_checkpoint=True),
    KerasCase("state's batches_done is negative",
              _state(lambda d: d.update(epoch_done=False, batches_done=-3)), skips_checkpoint=True),
    KerasCase("state's layout is not a layout", _state(lambda d: d.update(layout={"model": 3})), skips_checkpoint=True),
    KerasCase("state.json nested 100k deep", _state(b"[" * 100_000), skips_checkpoint=True),
    KerasCase("state's variables are text", _files(_text_variables), skips_checkpoint=True),
    KerasCase("the weights file is not an HDF5 file",
              _files(lambda d: (d / "m.weights.h5").write_bytes(b"not hdf5" * 64)), skips_checkpoint=True),
    KerasCase("state's covered variables have no weights file to come from",
              _state(lambda d: d.update(weights_file=None)), skips_checkpoint=True),
]
