"""A writer refuses a store that doesn't do what the commit protocol needs (issue 10, item 6).

- Object stores: a proxy in front of the real S3 server (moto) / fake-gcs-server strips the conditions of every
  request (``If-Match`` / ``If-None-Match``, ``ifGenerationMatch``), as an S3-compatible store that ignores them
  would: a push stops before uploading anything, with a ConfigurationError / exit 5 naming ``unsafe_no_cas``, and
  goes through when that option is given. Reads never probe.
- Local directories: the mount parsing is a pure function, tested on real ``/proc/self/mountinfo`` lines; the real
  local store on this machine passes, and a root that a mount table puts on NFS ``nolock`` or a FUSE mount is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from reliability.faultproxy import FaultProxy

from cloudckpt import CheckpointStore, cli
from cloudckpt.backends import ObjectInfo, capabilities
from cloudckpt.backends.capabilities import Mount, flock_problem, lock_problem, mount_of, parse_mountinfo
from cloudckpt.errors import ConfigurationError
from cloudckpt.garbage import plan_gc
from cloudckpt.manifest import PROBE_DIR, Index

CLI = Path(sys.executable).with_name("cloudckpt")

# Real lines: proc(5)'s example, and mounts as Linux prints them for NFS, gcsfuse, s3fs, SMB, USB (fuseblk), overlay.
MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
312 27 0:53 / /mnt/ckpt rw,relatime shared:165 - nfs4 10.0.0.5:/export/ckpt rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.9,local_lock=none,addr=10.0.0.5
313 27 0:54 / /mnt/nfs3 rw,relatime shared:166 - nfs 10.0.0.5:/export rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.5,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.5
314 27 0:55 / /mnt/nfs-flock rw,relatime shared:167 - nfs4 fs-0123.efs.us-east-1.amazonaws.com:/ rw,vers=4.1,rsize=1048576,wsize=1048576,namlen=255,hard,noresvport,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=172.31.5.6,local_lock=flock,addr=172.31.7.8
400 27 0:60 / /gcs rw,nosuid,nodev,relatime shared:200 - fuse.gcsfuse my-bucket rw,user_id=0,group_id=0,default_permissions
401 27 0:61 / /s3 rw,nosuid,nodev,relatime shared:201 - fuse.s3fs s3fs rw,user_id=1000,group_id=1000
402 27 0:62 / /mnt/my\040ckpts rw,relatime - nfs4 srv:/x rw,vers=4.1,local_lock=flock,addr=1.2.3.4
403 27 8:17 / /media/usb rw,nosuid,nodev,relatime shared:300 - fuseblk /dev/sdb1 rw,user_id=0,group_id=0,allow_other,blksize=4096
404 27 0:63 / /mnt/smb rw,relatime - cifs //nas/ckpt rw,vers=3.1.1,cache=strict,username=u,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.7,file_mode=0755,dir_mode=0755,soft,nounix,serverino,mapposix,nobrl,rsize=4194304,wsize=4194304
405 27 0:64 / /mnt/ckpt rw,relatime shared:168 - fuse.s3fs s3fs rw,user_id=0,group_id=0
500 450 0:70 / /data rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
"""


# --- the pure part: mountinfo -----------------------------------------------------------------------------------

def test_parse_mountinfo_reads_type_source_options_and_escapes():
    mounts = {m.mount_point: m for m in parse_mountinfo(MOUNTINFO)}
    assert mounts["/mnt2"] == Mount("/mnt2", "ext3", "/dev/root", frozenset({"rw", "noatime", "errors=continue"}))
    assert mounts["/mnt/my ckpts"].fstype == "nfs4"  # \040 is a space
    assert "nolock" in mounts["/mnt/nfs3"].options and "local_lock=all" in mounts["/mnt/nfs3"].options
    assert mounts["/gcs"].fstype == "fuse.gcsfuse" and mounts["/gcs"].source == "my-bucket"
    assert parse_mountinfo("garbage\n\n1 2 3\n") == []


def test_mount_of_takes_the_longest_mount_point_and_the_top_of_a_stack():
    mounts = parse_mountinfo(MOUNTINFO)
    assert mount_of("/mnt/nfs3/runs/r1", mounts).mount_point == "/mnt/nfs3"
    assert mount_of("/mnt/nfs3", mounts).mount_point == "/mnt/nfs3"
    assert mount_of("/mnt/nfs3x/r1", mounts).mount_point == "/"  # a sibling whose name merely starts alike
    assert mount_of("/home/me/run", mounts).fstype == "ext4"
    assert mount_of("/mnt/ckpt/r1", mounts).fstype == "fuse.s3fs"  # mounted over the NFS export: the visible one


@pytest.mark.parametrize("point, refused", [
    ("/", None), ("/mnt2", None), ("/mnt/ckpt-nfs-default", None), ("/media/usb", None), ("/data", None),
    ("/mnt/nfs3", "nolock"), ("/mnt/nfs-flock", "local_lock=flock"), ("/mnt/my ckpts", "local_lock=flock"),
    ("/gcs", "fuse.gcsfuse"), ("/s3", "fuse.s3fs"), ("/mnt/smb", "nobrl"),
])
def test_lock_problem_refuses_node_local_locks(point, refused):
    mounts = parse_mountinfo(MOUNTINFO)
    if point == "/mnt/ckpt-nfs-default":  # the NFSv4 default (local_lock=none) locks across machines
        mount = next(m for m in mounts if m.source == "10.0.0.5:/export/ckpt")
    else:
        mount = mount_of(point, mounts)
        assert mount.mount_point == point
    problem = lock_problem(mount)
    assert (problem is None) if refused is None else (refused in problem and "local to this machine" in problem)


# --- the local store --------------------------------------------------------------------------------------------

def _ckpt(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "w.bin").write_bytes(os.urandom(5000))
    return root


def cli_exit(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


def test_the_real_local_store_here_passes_and_flock_excludes(local_url, tmp_path):
    """End to end on this machine's own filesystem: the mount found is the real one, flock excludes, push works."""
    with CheckpointStore(local_url) as store:
        store.push(_ckpt(tmp_path / "c"), epoch=1)
        assert store.backend._cas_checked
    root = Path(local_url)
    mounts = parse_mountinfo(Path(capabilities.MOUNTINFO).read_text())
    assert mount_of(os.path.realpath(root), mounts) is not None
    assert capabilities.mount_lock_problem(root) is None
    assert flock_problem(root / ".index.lock") is None


def test_flock_check_is_not_vacuous(tmp_path, monkeypatch):
    """Where flock grants a second exclusive lock (a filesystem that ignores it), the check says so."""
    monkeypatch.setattr(capabilities.fcntl, "flock", lambda fd, op: None)
    assert "does not exclude" in flock_problem(tmp_path / "lock")


@pytest.mark.parametrize("fstype, options", [("nfs", "rw,vers=3,nolock,local_lock=all,addr=10.0.0.5"),
                                             ("fuse.gcsfuse", "rw,user_id=0,group_id=0")])
def test_local_store_on_a_node_local_lock_mount_is_refused(fstype, options, tmp_path, monkeypatch):
    root = tmp_path / "mnt" / "runs" / "r1"
    table = tmp_path / "mountinfo"
    point = os.path.realpath(tmp_path / "mnt")
    table.write_text(MOUNTINFO + f"900 27 0:90 / {point} rw,relatime - {fstype} srv:/x {options}\n")
    monkeypatch.setattr(capabilities, "MOUNTINFO", str(table))
    with CheckpointStore(str(root)) as store:
        with pytest.raises(ConfigurationError, match="unsafe_no_cas=true") as info:
            store.push(_ckpt(tmp_path / "c"), epoch=1)
        assert "local to this machine" in str(info.value)
    assert not [p for p in root.rglob("*") if p.name != ".index.lock"], "something was written before the refusal"
    code, err = cli_exit("push", str(tmp_path / "c"), "--remote", str(root))
    assert code == 5 and err.count("\n") == 1 and "unsafe_no_cas" in err, (code, err)
    with CheckpointStore(str(root), unsafe_no_cas=True) as store:  # the documented way to accept the risk
        store.push(tmp_path / "c", epoch=1)
        assert len(store.list()) == 1
    assert cli_exit("-o", "unsafe_no_cas=true", "push", str(tmp_path / "c"), "--remote", str(root))[0] == 0
    monkeypatch.setenv("CLOUDCKPT_UNSAFE_NO_CAS", "1")
    assert cli_exit("push", str(tmp_path / "c"), "--remote", str(root))[0] == 0
    assert cli_exit("ls", "--remote", str(root))[0] == 0


# --- object stores behind a proxy that strips the conditions ------------------------------------------------------

def _proxy(upstream: str, **kwargs) -> FaultProxy:
    """A FaultProxy injecting no faults that keeps every request's method and target (path and query)."""
    seen: list[tuple[str, str]] = []
    proxy = FaultProxy(upstream, fault_filter=lambda method, target: seen.append((method, unquote(target))), **kwargs)
    proxy.seen = seen
    return proxy


def _probe_requests(proxy: FaultProxy) -> list[str]:
    """Requests naming a probe object in their path: S3 PUT (create, create again, swap, stale swap; its delete is a
    POST ?delete naming keys in the body), GCS DELETE (its uploads name the object in the body)."""
    return [method for method, target in proxy.seen if PROBE_DIR in target.split("?")[0]]


@pytest.fixture
def s3_stripping(s3_server):
    with _proxy(s3_server.endpoint, strip_conditions=True) as proxy:
        yield proxy


@pytest.fixture
def gcs_stripping(gcs_server):
    with _proxy(gcs_server.endpoint, strip_conditions=True) as proxy:
        yield proxy


def _open(kind: str, url: str, proxy: FaultProxy, monkeypatch, **options) -> CheckpointStore:
    if kind == "s3":
        options["endpoint_url"] = proxy.endpoint
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    return CheckpointStore(url, budget=30, **options)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_object_store_ignoring_conditions_is_refused_before_any_upload(kind, request, monkeypatch, tmp_path):
    url = request.getfixturevalue(f"{kind}_url")
    proxy = request.getfixturevalue(f"{kind}_stripping")
    src = _ckpt(tmp_path / "c")
    with CheckpointStore(url) as direct:  # straight to the server: it does enforce conditions
        first = direct.push(src, epoch=1)
    with _open(kind, url, proxy, monkeypatch) as store:
        assert store.latest().id == first.id  # reading needs no probe
        store.pull("latest", to=tmp_path / "restored")
        assert store.verify()[0].ok
        store.prune(keep_last=1, dry_run=True)
        assert _probe_requests(proxy) == [], "a read probed the store"
        with pytest.raises(ConfigurationError, match=r"refusing to write: a create-only write .* unsafe_no_cas=true"):
            store.push(src, epoch=2)
        assert proxy.stripped >= 2  # the probe's conditions really were removed on the way
    with CheckpointStore(url) as direct:
        objects = {o.rel for o in direct.backend.list_objects()}
        assert {o.split("/")[0] for o in objects} == {"index.json", first.id}, "the refused push left objects"
        assert [c.id for c in direct.list()] == [first.id]
    with _open(kind, url, proxy, monkeypatch, unsafe_no_cas=True) as store:  # the risk accepted: it writes
        second = store.push(src, epoch=2)
        assert [c.id for c in store.list()] == [first.id, second.id]


def test_cli_refuses_with_exit_5_and_one_line(s3_url, s3_stripping, tmp_path):
    if not CLI.exists():
        pytest.skip("the cloudckpt CLI is not installed in this venv")
    src = _ckpt(tmp_path / "c")
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_stripping.endpoint, "AWS_ENDPOINT_URL_S3": s3_stripping.endpoint}
    proc = subprocess.run([str(CLI), "push", str(src), "--remote", s3_url], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cloudckpt: error:") and "-o unsafe_no_cas=true" in proc.stderr
    proc = subprocess.run([str(CLI), "-o", "unsafe_no_cas=true", "push", str(src), "--remote", s3_url], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_probe_runs_once_per_store_and_leaves_nothing(kind, request, monkeypatch, tmp_path):
    """Against the real servers (conditions intact) the probe passes: five requests once per store object, its
    object deleted; claim and prune reuse the verdict."""
    url = request.getfixturevalue(f"{kind}_url")
    server = request.getfixturevalue(f"{kind}_server")
    with _proxy(server.endpoint) as proxy:
        with _open(kind, url, proxy, monkeypatch) as store:
            store.claim()
            for epoch in (1, 2):
                store.push(_ckpt(tmp_path / f"c{epoch}"), epoch=epoch)
            store.prune(keep_last=1)
        assert _probe_requests(proxy) == {"s3": ["PUT"] * 4, "gcs": ["DELETE"]}[kind], proxy.seen
        with CheckpointStore(url) as direct:
            assert not [o.rel for o in direct.backend.list_objects() if o.rel.startswith(PROBE_DIR)]


def test_other_fsspec_stores_are_read_freely_and_written_only_with_the_option(tmp_path):
    src = _ckpt(tmp_path / "c")
    url = f"memory://cloudckpt-cap-{os.urandom(4).hex()}/run"
    with CheckpointStore(url) as store:
        with pytest.raises(ConfigurationError, match="no conditional write.*unsafe_no_cas"):
            store.push(src, epoch=1)
    with CheckpointStore(url, unsafe_no_cas=True) as store:
        entry = store.push(src, epoch=1)
    with CheckpointStore(url) as reader:
        assert reader.latest().id == entry.id


def test_gc_removes_old_probe_leftovers_and_never_takes_them_for_checkpoints():
    objects = [ObjectInfo(f"{PROBE_DIR}/0123abcd", 36, 0), ObjectInfo(f"{PROBE_DIR}/4567ef01", 36, 990),
               ObjectInfo(PROBE_DIR, 1, 0)]
    plan = plan_gc(objects, Index(), now=1000, min_age=60)
    assert plan.delete == [f"{PROBE_DIR}/0123abcd"] and plan.checkpoints == set() and not plan.kept_young
