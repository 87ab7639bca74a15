"""The benchmark harness runs end to end (``python -m bench.run --quick``) and writes a complete, well-formed report.

Benchmarks are not timed tests: nothing here looks at a time or a ratio, only at the report's shape — every
comparison present, every sample a number, the plot a real PNG.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
STORE_SECTIONS = {"push_s3", "push_gcs", "restore_s3", "restore_gcs", "memory", "index_local", "index_s3",
                  "index_gcs", "checksum"}
TRAINING_SECTIONS = {"epoch_overhead", "sigterm"}  # plus one stall_<N>MB per model size
RAW_CLIENTS = {
    "push_s3": {"cloudckpt", "boto3 upload_file", "s3fs put_file", "s5cmd cp", "obstore put",
                "cloudckpt, multipart_checksum=full_object"},
    "push_gcs": {"cloudckpt", "google-cloud-storage upload_from_filename", "gcsfs put_file",
                 "google-cloud-storage, cloudckpt's chunk size"},
    "restore_s3": {"cloudckpt", "boto3 download_file (1 stream) + crc32c", "s3fs get_file + crc32c",
                   "s5cmd cp (1 stream) + crc32c", "obstore get + crc32c"},
    "restore_gcs": {"cloudckpt", "gcsfs get_file", "google-cloud-storage download_to_filename"},
    "memory": {"cloudckpt push", "s3fs put_file", "cloudckpt push (gcs)"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST"):
        env.pop(var, None)  # the harness starts its own servers
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=540, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"bench.run --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def _doc(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_quick_run_writes_json_table_and_png(quick_run):
    doc = _doc(quick_run)
    assert doc["mode"] == "quick"
    png = (quick_run / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (quick_run / "results.md").read_text()
    assert table.startswith("## Targets at a glance\n\n| # | Target | Measured | Verdict |")
    assert "\n| Measurement | Variant |" in table
    for sec in doc["sections"]:
        if not sec["skipped"]:
            for v in sec["variants"]:
                assert f"| {v['name']} |" in table


def test_machine_and_load_are_recorded(quick_run):
    doc = _doc(quick_run)
    m = doc["machine"]
    assert m["cores_logical"] >= 1 and m["ram_gib"] > 0 and m["cpu"]
    assert m["python"].count(".") == 2
    for pkg in ("cloudckpt", "boto3", "s3fs", "gcsfs", "google-cloud-storage", "moto"):
        assert pkg in m["packages"], pkg
    assert len(doc["load"]["start"]) == 3 and len(doc["load"]["end"]) == 3


def test_every_store_comparison_is_present_side_by_side(quick_run):
    sections = {s["id"]: s for s in _doc(quick_run)["sections"]}
    assert STORE_SECTIONS <= set(sections)
    for sid in STORE_SECTIONS:
        sec = sections[sid]
        assert sec["error"] is None, f"{sid} failed: {sec['error']}"
        assert sec["skipped"] is None, f"{sid} skipped: {sec['skipped']}"
        assert sec["variants"], sid
        for v in sec["variants"]:
            assert v["samples"] and all(isinstance(s, (int, float)) and math.isfinite(s) for s in v["samples"]), v
            assert v["median"] == pytest.approx(statistics.median(v["samples"]))
        assert isinstance(sec["ratio"], (int, float)) and isinstance(sec["met"], bool), sid
        assert sec["target"], sid
    for sid, names in RAW_CLIENTS.items():  # a client not installed is left out, with the reason (checked below)
        skipped = set(sections[sid]["params"].get("skipped_clients", {}))
        assert {v["name"] for v in sections[sid]["variants"]} == names - skipped, sid
    for sid in ("push_s3", "push_gcs", "restore_s3", "restore_gcs"):
        for v in sections[sid]["variants"]:  # interleaved: every client ran in every repetition
            assert len(v["samples"]) == len(sections[sid]["variants"][0]["samples"]) >= 2
            assert len(v["extra"]["server_cpu_s"]) == len(v["samples"])
    for kind in ("local", "s3", "gcs"):
        names = {v["name"] for v in sections[f"index_{kind}"]["variants"]}
        counts = _doc(quick_run)["sizes"]["index_counts"]
        assert names == {f"{what} @ {n}" for what in ("best", "latest", "ls", "commit") for n in counts}
    threads = sections["checksum"]["params"]["threads_that_ran_checksums"]
    assert threads and all(t.startswith("cloudckpt-io") for t in threads)


def test_training_comparisons_are_present_or_skipped_with_a_reason(quick_run):
    doc = _doc(quick_run)
    sections = {s["id"]: s for s in doc["sections"]}
    stall = {f"stall_{mb}MB" for mb in doc["sizes"]["models_mb"]}
    assert stall | TRAINING_SECTIONS <= set(sections)
    for sid in stall | TRAINING_SECTIONS:
        sec = sections[sid]
        assert sec["error"] is None, f"{sid} failed: {sec['error']}"
        if sec["skipped"]:
            assert "cloudckpt.keras" in sec["skipped"] or "not installed" in sec["skipped"]
            continue
        assert sec["variants"] and all(v["samples"] for v in sec["variants"]), sid
        assert isinstance(sec["met"], bool), sid
    for sid in stall:
        if not sections[sid]["skipped"]:
            sec = sections[sid]
            variants = {v["name"]: v for v in sec["variants"]}
            assert set(variants) == {
                "Keras ModelCheckpoint (local)", "Keras ModelCheckpoint + BackupAndRestore (local)",
                "CloudCheckpoint (s3)", "ModelCheckpoint + inline push (s3)", "CloudCheckpoint (local store)"}
            # the exact-resume baseline counts BackupAndRestore's hooks too; CloudCheckpoint's stall is split
            assert "backup_ms" in variants["Keras ModelCheckpoint + BackupAndRestore (local)"]["extra"]
            assert {"keras_save_ms", "own_part_ms", "capture_ms"} <= set(variants["CloudCheckpoint (s3)"]["extra"])
            ratios = sec["other_ratios"]
            assert all(isinstance(v, (int, float)) and v >= 0 for v in ratios.values()), ratios
            words = ("BackupAndRestore", "quartiles", "own part", "no server")
            assert [any(word in desc for desc in ratios) for word in words] == [True] * len(words), ratios


# verdicts the harness computes from the samples in the JSON: the test recomputes them (section -> target ids)
RECOMPUTED = {"push_s3": "5 push (S3)", "restore_s3": "5 verified pull (S3)", "push_gcs": "push (GCS)",
              "restore_gcs": "verified pull (GCS)"}
FASTEST_OF = {"push_s3": ("boto3 upload_file", "s3fs put_file", "s5cmd cp"),
              "restore_s3": ("boto3 download_file (1 stream) + crc32c", "s3fs get_file + crc32c",
                             "s5cmd cp (1 stream) + crc32c"),
              "push_gcs": ("google-cloud-storage upload_from_filename", "gcsfs put_file"),
              "restore_gcs": ("gcsfs get_file", "google-cloud-storage download_to_filename")}


def test_targets_at_a_glance_lists_every_verdict_computed_from_the_measurements(quick_run):
    doc = _doc(quick_run)
    md = (quick_run / "results.md").read_text()
    glance = md.split("## Every measurement")[0]
    sections = {s["id"]: s for s in doc["sections"]}
    assert doc["targets"] == [t for s in doc["sections"] for t in s["targets"]]
    assert {t["section"] for t in doc["targets"]} >= set(RECOMPUTED) | {"memory", "checksum"}
    for t in doc["targets"]:
        assert {"id", "target", "measured", "met"} <= set(t) and t["target"] and t["measured"], t
        assert isinstance(t["met"], bool), t
        verdict = "met" if t["met"] else "MISSED"
        assert f"| {t['id']} | {t['target']} | {t['measured']} | **{verdict}** | {t['section']} |" in glance
        if "op" in t:  # the verdict is the comparison of the measured value with the bound, nothing else
            assert t["met"] == (t["value"] is not None and math.isfinite(t["value"])
                                and {"<=": t["value"] <= t["limit"], ">=": t["value"] >= t["limit"]}[t["op"]]), t
    for sid, tid in RECOMPUTED.items():  # from the raw samples: cloudckpt's median over the fastest client's
        med = {v["name"]: statistics.median(v["samples"]) for v in sections[sid]["variants"]}
        want = med["cloudckpt"] / min(med[n] for n in FASTEST_OF[sid])
        (t,) = [t for t in sections[sid]["targets"] if t["id"] == tid]
        assert t["value"] == pytest.approx(want) and sections[sid]["met"] is t["met"]
        assert t["met"] == (want <= t["limit"])
    for sid in ("memory", "sigterm"):
        sec = sections[sid]
        if sec["skipped"]:
            continue
        mine = next(v for v in sec["variants"] if v["name"] in ("cloudckpt push", "CloudCheckpoint (s3)"))
        assert sec["targets"][0]["value"] == pytest.approx(statistics.median(mine["samples"]))
    for sid in ("push_s3", "restore_s3"):  # s5cmd and obstore ran (installed by the test extra), or say why not
        ran = {v["name"] for v in sections[sid]["variants"]}
        skipped = sections[sid]["params"].get("skipped_clients", {})
        assert all(why.startswith("not installed") for why in skipped.values()) and not ran & set(skipped)


def test_a_client_that_is_not_installed_is_skipped_with_the_reason(monkeypatch, tmp_path):
    """Without s5cmd's binary or the obstore module the comparison runs without them and says why (no crash)."""
    from bench import s3_clients

    monkeypatch.setattr(s3_clients, "s5cmd_exe", lambda: None)
    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore raises ImportError
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    push, push_skipped = s3_clients.push_clients("http://127.0.0.1:9", "bucket", src)
    pull, pull_skipped = s3_clients.pull_clients("http://127.0.0.1:9", "bucket", "k", tmp_path, size=1,
                                                 crc32c="00000000", extra=lambda n: {})
    assert set(push) == {"boto3 upload_file", "s3fs put_file"} and set(pull) == {
        "boto3 download_file (1 stream) + crc32c", "s3fs get_file + crc32c"}
    assert set(push_skipped) == {"s5cmd cp", "obstore put"}
    assert set(pull_skipped) == {"s5cmd cp (1 stream) + crc32c", "obstore get + crc32c"}
    assert all(why.startswith("not installed: ") for why in (*push_skipped.values(), *pull_skipped.values()))


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=12))
def test_a_variants_lower_quartile_lies_within_its_samples(samples):
    """A ratio of quartiles is only meaningful if each quartile is one of the times the samples span: the default
    quantile method extrapolated from two skewed stalls to a negative quartile and failed a CI run."""
    from bench.common import Variant

    q1 = Variant("v", list(samples)).lower_quartile
    assert min(samples) <= q1 <= statistics.median(samples)
