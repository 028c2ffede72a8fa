"""The host fingerprint: what the capability rules read without importing torch, and
``lora-harness env`` on a stored run."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from harness.core import host as env

ROOT = Path(__file__).resolve().parent.parent


def test_quick_facts_hold_what_the_rules_need():
    f = env.quick_facts()
    assert set(env.RULE_PACKAGES) <= set(f["packages"])
    assert f["packages"]["torch"] and f["packages"]["bitsandbytes"]
    for key in ("torch_cuda_version", "driver_cuda_version", "flash_attn_installed"):
        assert key in f
    if not f["has_gpu"]:
        assert f["driver_cuda_version"] is None


def test_torch_cuda_build_is_read_from_the_file(tmp_path, monkeypatch):
    pkg = tmp_path / "torch"
    pkg.mkdir()
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        if name == "torch":
            return importlib.util.spec_from_file_location("torch", pkg / "__init__.py",
                                                          submodule_search_locations=[str(pkg)])
        return real(name, *a, **kw)

    monkeypatch.setattr(env.importlib.util, "find_spec", fake)
    (pkg / "version.py").write_text("__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\nhip = None\n")
    assert env.torch_cuda_build() == "13.0"
    (pkg / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert env.torch_cuda_build() is None


def test_env_from_a_stored_run():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    p = cli("env", "--from-run", "reports/reference/h200-core-2026-11-29")
    assert p.returncode == 0, p.stderr
    assert "NVIDIA H200, cc 9.0, 139.8 GiB" in p.stdout and "580.159.04" in p.stdout
    assert "bitsandbytes backend" in p.stdout and "cuda" in p.stdout and "attention: sdpa" in p.stdout
    bad = cli("env", "--from-run", "docs")
    assert bad.returncode == 2 and bad.stderr.strip() == "lora-harness: error: docs holds no env.json"
