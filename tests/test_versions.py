"""Declared floors and extras: the floors in pyproject.toml are the ones the code checks, every extra installs with an
old pip (no extra naming its own package), tensorflow-cpu is chosen only where it has wheels, and an older Keras
or botocore is refused at import/open with a ConfigurationError naming the floor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement

from cloudckpt.versions import MIN_BOTOCORE, MIN_KERAS, MIN_LIGHTNING, MIN_TORCH, MIN_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}


def _floor(extra: str, name: str) -> str:
    (req,) = [r for r in EXTRAS[extra] if r.name == name]
    (spec,) = [s for s in req.specifier if s.operator == ">="]
    return spec.version


def test_floors_are_the_ones_the_code_checks():
    for extra in ("s3", "all"):
        assert _floor(extra, "botocore") == MIN_BOTOCORE
        assert _floor(extra, "boto3") == MIN_BOTOCORE  # boto3 X.Y.Z needs botocore X.Y.Z
    for extra in ("keras", "keras-cpu", "all"):
        assert _floor(extra, "keras") == MIN_KERAS
    for extra in ("torch", "lightning", "hf"):
        assert _floor(extra, "torch") == MIN_TORCH
    assert _floor("lightning", "lightning") == MIN_LIGHTNING
    assert _floor("hf", "transformers") == MIN_TRANSFORMERS


def test_no_extra_names_its_own_package():
    """pip 23.2 (bundled with Python 3.11) fails with ResolutionImpossible on ``all = ["cloudckpt[...]"]``."""
    for extra, reqs in EXTRAS.items():
        assert all(r.name != PROJECT["name"] for r in reqs), extra
    runtime = {r.name for extra in ("s3", "gcs", "azure", "keras") for r in EXTRAS[extra]}
    assert {r.name for r in EXTRAS["all"]} == runtime


@pytest.mark.parametrize("system,machine,wanted", [
    ("Linux", "x86_64", "tensorflow-cpu"), ("Windows", "AMD64", "tensorflow-cpu"),
    ("Darwin", "arm64", "tensorflow"), ("Linux", "aarch64", "tensorflow"),
])
def test_keras_cpu_picks_a_tensorflow_with_wheels(system, machine, wanted):
    env = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower()}
    chosen = {r.name for r in EXTRAS["keras-cpu"] if r.name.startswith("tensorflow")
              and (r.marker is None or r.marker.evaluate(env))}
    assert chosen == {wanted}
    assert Marker("python_version < '3.14'").evaluate()  # requires-python below: TensorFlow's supported Pythons
    assert PROJECT["requires-python"] == ">=3.10,<3.14"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_an_older_keras_is_refused_at_import():
    proc = _python("""
        import keras
        keras.__version__ = "3.9.2"
        try:
            import cloudckpt.keras
        except Exception as e:
            print(type(e).__name__, e)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ConfigurationError cloudckpt needs keras>=3.10"), proc.stdout
    assert "3.9.2" in proc.stdout


def test_a_botocore_without_put_object_if_match_is_refused_with_exit_5():
    """A botocore whose S3 model lacks PutObject IfMatch (before 1.35.69) can't swap the index: the store refuses to
    open, naming the floor, instead of failing on the second commit."""
    proc = _python("""
        import sys
        import botocore.loaders
        load = botocore.loaders.Loader.load_service_model

        def old_model(self, service_name, type_name, api_version=None):
            model = load(self, service_name, type_name, api_version)
            if service_name == "s3" and type_name == "service-2":
                model["shapes"]["PutObjectRequest"]["members"].pop("IfMatch", None)
            return model

        botocore.loaders.Loader.load_service_model = old_model
        botocore.__version__ = "1.35.60"
        from cloudckpt.cli import main
        sys.exit(main(["ls", "--remote", "s3://some-bucket/run"]))
        """)
    assert proc.returncode == 5, proc.stderr
    assert f"cloudckpt needs botocore>={MIN_BOTOCORE}" in proc.stderr and "1.35.60" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("installed,ok", [("3.10.0", True), ("3.10.1", True), ("3.11.0rc1", True),
                                          ("3.10.0rc1", False), ("3.10.0.dev3", False), ("3.9.9", False),
                                          ("not-a-version", False)])
def test_a_pre_release_of_the_floor_is_below_it(installed, ok):
    """PEP 440 order (packaging.version), not the leading digits: 3.10.0rc1 comes before 3.10 and is refused."""
    from cloudckpt.errors import ConfigurationError
    from cloudckpt.versions import require

    if ok:
        require("keras", installed, "3.10", "test")
    else:
        with pytest.raises(ConfigurationError, match=r"keras>=3\.10"):
            require("keras", installed, "3.10", "test")
