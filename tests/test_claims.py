"""The seed's claims: verdict rules on numbers, the GPU claims' cell logic against a fake
host, and the claims suite itself on the CPU with the tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fit import claims as C
from harness.fit import claims_run as claimsrun
from harness.fit import search as fitrun
from harness.core.budget import GIB
from harness.core.spec import CellSpec
from tests.fakes import FakeHost

ROOT = Path(__file__).resolve().parent.parent


def test_vram_between():
    assert C.judge_vram_between({"fp32": 40 * GIB, "bf16": 21 * GIB, "int8": 19 * GIB}).verdict == C.HOLDS
    v = C.judge_vram_between({"fp32": 40 * GIB, "bf16": 21 * GIB, "int8": 25 * GIB})
    assert v.verdict == C.REFUTED and "int8 25.00 GiB > bf16 21.00 GiB" in v.summary and not v.passed


def test_faster():
    assert C.judge_faster({"bf16": 5800.0, "int8": 2500.0, "nf4": 4500.0}).verdict == C.HOLDS
    v = C.judge_faster({"bf16": 763.0, "int8": 3065.0, "nf4": 2493.0})
    assert v.verdict == C.REFUTED and "not faster than int8, nf4" in v.summary


def test_more_stable():
    ref = [11.8, 11.5, 11.0, 10.2]
    close = [x + 0.001 for x in ref]
    far = [x + 0.05 for x in ref]
    assert C.judge_more_stable({"fp32": ref, "bf16": close, "int8": far, "nf4": far}).verdict == C.HOLDS
    v = C.judge_more_stable({"fp32": ref, "bf16": far, "int8": close, "nf4": far})
    assert v.verdict == C.REFUTED and "int8 closer to fp32" in v.summary
    v = C.judge_more_stable({"fp32": ref, "bf16": ref[:3] + ["nan"], "int8": far, "nf4": far})
    assert v.verdict == C.REFUTED and v.numbers["nonfinite"]["bf16"] == 1
    v = C.judge_more_stable({"fp32": ref, "bf16": close, "int8": ["inf"] * 4, "nf4": far})
    assert v.verdict == C.HOLDS and v.numbers["mean_abs_dev_from_fp32"]["int8"] is None
    assert C.judge_more_stable({"fp32": ["nan"] * 4, "bf16": ref, "int8": ref, "nf4": ref}).verdict == C.INCONCLUSIVE


def test_extends_and_table():
    kw = dict(base_longest=4096, base_status="found", probe_len=4096, evidence="e")
    assert C.judge_extends("ckpt-extends", "gc-on", other_fits_beyond=False, **kw).verdict == C.HOLDS
    assert C.judge_extends("ckpt-extends", "gc-on", other_fits_beyond=True, **kw).verdict == C.REFUTED
    assert C.judge_extends("8bit-extends", "gc-offload", other_fits_beyond=True, **kw).verdict == C.HOLDS
    assert C.judge_extends("8bit-extends", "gc-offload", other_fits_beyond=None, **kw).verdict == C.ERROR
    assert C.judge_extends("8bit-extends", "x", other_fits_beyond=True, **dict(kw, base_status="at_cap")).verdict \
        == C.INCONCLUSIVE
    vs = [C.judge_faster({"bf16": 1.0, "int8": 2.0, "nf4": 3.0}), C.skipped("fits-2048-24gb", "gc-off", "needs a GPU")]
    md = C.markdown(vs, "claims")
    assert "**REFUTED**" in md and "skipped" in md and "1 refuted, 1 skipped" in md
    assert json.loads(C.to_json(vs))[0]["verdict"] == "refuted"


def test_gpu_claims_logic_with_a_fake_host():
    host = FakeHost()
    search = fitrun.FitSearch(fitrun.FitSettings((claimsrun.BUDGET_BYTES,), 256, 65536), measure=host,
                              out=lambda s: None)
    ctx = claimsrun.ClaimsContext(CellSpec("llama-3.1-8b", "bf16", 512), host, search, use_gpu=True,
                                  device_total_bytes=140 * GIB)
    assert claimsrun.claim_vram_between(ctx).verdict == C.HOLDS
    assert claimsrun.claim_faster(ctx).verdict == C.HOLDS
    assert claimsrun.claim_more_stable(ctx).verdict == C.HOLDS
    assert len(host.calls) == 4  # the four comparison cells, shared by three claims
    off = claimsrun.claim_fits_2048(ctx, "off")
    assert off.verdict == C.REFUTED and "ran out of memory" in off.summary  # 15.5 + 16 GiB > 24 GiB
    assert claimsrun.claim_fits_2048(ctx, "offload").verdict == C.HOLDS
    n = len(host.calls)
    ext = claimsrun.claim_ckpt_extends(ctx, "on")
    assert ext.verdict == C.HOLDS and ext.numbers["base_longest"] > 2048
    # gc-off already failed at 2048 under 24 GiB: it fails at the longer length without a cell
    assert all(c.grad_ckpt == "on" for c in host.calls[n:])
    eight = claimsrun.claim_8bit_extends(ctx)
    assert eight.verdict == C.HOLDS and host.calls[-1].precision == "int8"
    assert host.calls[-1].seq_len == eight.numbers["base_longest"] + 256
    small = claimsrun.ClaimsContext(ctx.template, host, search, use_gpu=True, device_total_bytes=16 * GIB)
    assert claimsrun.claim_8bit_extends(small).verdict == C.SKIPPED
    cpu = claimsrun.ClaimsContext(ctx.template, host, search, use_gpu=False)
    assert "needs a GPU" in claimsrun.claim_vram_between(cpu).summary


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def cpu_claims(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("claims") / "run"
    args = ("suites/test_claims.py", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu",
            "--run-dir", str(run_dir))
    first = _pytest(*args)
    lines_after_first = (run_dir / "results.jsonl").read_text().splitlines()
    second = _pytest(*args)
    return first, second, run_dir, lines_after_first


def test_claims_suite_on_cpu(cpu_claims):
    first, _, run_dir, _ = cpu_claims
    table = json.loads((run_dir / "claims.json").read_text())
    assert len(table) == 8  # 3 comparisons, fits x2, checkpointing x2, 8-bit
    by = {(v["claim"], v["variant"]): v for v in table}
    for v in table:  # every VRAM claim is skipped on a CPU host, with that reason
        if C.CLAIMS[v["claim"]].needs_gpu:
            assert v["verdict"] == C.SKIPPED and "needs a GPU" in v["summary"]
        else:
            assert v["verdict"] in (C.HOLDS, C.REFUTED), v
    stable = next(v for k, v in by.items() if k[0] == "more-stable")
    assert set(stable["numbers"]["losses"]) == {"fp32", "bf16", "int8", "nf4"}
    assert all(len(x) == 7 and all(math.isfinite(float(y)) for y in x) for x in stable["numbers"]["losses"].values())
    # pytest's outcome follows the verdict: a refuted claim fails, showing its numbers
    refuted = [v for v in table if v["verdict"] == C.REFUTED]
    assert first.returncode == (1 if refuted else 0), first.stdout[-3000:]
    for v in refuted:
        assert "REFUTED" in first.stdout and v["summary"].split(":")[0] in first.stdout
    assert "6 skipped" in first.stdout and "needs a GPU" in first.stdout
    md = (run_dir / "claims.md").read_text()
    assert "| claim (../shared/SEED.md) | verdict | the numbers |" in md
    recs = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["precision"] for r in recs) == ["bf16", "fp32", "int8", "nf4"]
    assert all(r["spec"]["load"] == "pretrained" and r["status"] == "ok" for r in recs)


def test_claims_suite_reuses_the_run_folder(cpu_claims):
    first, second, run_dir, lines_after_first = cpu_claims
    assert (run_dir / "results.jsonl").read_text().splitlines() == lines_after_first  # nothing ran again
    assert second.returncode == first.returncode
    assert "worker server ready" not in second.stdout  # not even the worker server started
