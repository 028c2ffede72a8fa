"""``--baseline`` at the end of a sweep: pytest suites/ and lora-harness run."""

import json

from tests.report_helpers import FIXTURES, one_line_error, record, run, write_run


def _resumable_run(tmp_path, name, scale=1.0):
    """A run folder holding the fixture's bf16 gc-off cells at 64 and 1024 tokens (step
    times scaled by ``scale``), so a --resume session replays them without training."""
    recs = [json.loads(line) for line in (FIXTURES / "cpu-mixed" / "results.jsonl").read_text().splitlines()]
    keep = [dict(r) for r in recs if r["cell_id"] in ("tiny-llama/bf16/s64/gc-off", "tiny-llama/bf16/s1024/gc-off")]
    for r in keep:
        r["step_times_s"] = [t * scale for t in r["step_times_s"]]
        r["step_time_s"] *= scale
        r["tokens_per_s"] /= scale
    return write_run(tmp_path / name, keep, env={"hostname": "vm", "device": "cpu"})


PYTEST_ARGS = ("pytest", "suites/", "-p", "no:cacheprovider", "-p", "no:benchmark", "--device", "cpu", "--resume",
               "--precision", "bf16", "--seq-len", "64,1024", "--grad-ckpt", "off")


def test_pytest_baseline_fails_the_session_on_regression(tmp_path):
    current = _resumable_run(tmp_path, "current")
    fast = _resumable_run(tmp_path, "fast-baseline", scale=0.25)  # the baseline was 4x faster
    p = run(*PYTEST_ARGS, "--run-dir", str(current), "--baseline", str(fast))
    assert p.returncode == 1, p.stdout[-3000:]
    assert "2 passed" in p.stdout  # the cells themselves ran fine ...
    assert "lora-harness: baseline: REGRESSION: 2 metric regression(s) in 2 compared cells" in p.stdout  # ... but slower
    report = (current / "compare.md").read_text()
    regressions = report.split("## Metric regressions")[1].split("## Status changes")[0]
    assert regressions.count("| REGRESSION |") == 2
    # the same cells against themselves: no regression, the session passes
    p = run(*PYTEST_ARGS, "--run-dir", str(current), "--baseline", str(current), "--baseline-fail", "tokens_per_s:-1%")
    assert p.returncode == 0, p.stdout[-3000:]
    assert "lora-harness: baseline: no regression: 2 cells compared" in p.stdout


def test_pytest_bad_baseline_is_a_usage_error(tmp_path):
    current = _resumable_run(tmp_path, "current")
    for extra, msg in [(("--baseline", str(tmp_path / "nope")), "no such run folder"),
                       (("--baseline", str(current), "--baseline-fail", "tokens_per_s:5%"), "say which way is worse")]:
        p = run(*PYTEST_ARGS, "--run-dir", str(current), *extra)
        assert p.returncode == 4, p.stdout + p.stderr
        assert f"lora-harness: --baseline: " in p.stderr and msg in p.stderr and "Traceback" not in p.stderr


def test_cli_run_with_a_baseline_trains_then_compares(tmp_path):
    """A real cell on the CPU against a baseline it cannot match (a 10-microsecond step)."""
    base = write_run(tmp_path / "base", [record("tiny-llama/bf16/s32/gc-off", steps=(1e-5,) * 5, device="cpu")])
    run_dir = tmp_path / "run"
    p = run("harness", "run", "--device", "cpu", "--precision", "bf16", "--seq-len", "32", "--grad-ckpt", "off",
            "--steps", "2", "--run-dir", str(run_dir), "--baseline", str(base))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 ok" in p.stdout and "lora-harness: baseline: REGRESSION: 1 metric regression(s)" in p.stdout
    assert "tiny-llama/bf16/s32/gc-off: tokens_per_s 3,200,000 tokens/s ->" in p.stdout
    assert (run_dir / "compare.md").is_file()
    one_line_error(run("harness", "run", "--device", "cpu", "--baseline", str(tmp_path / "nope")), 2,
                   "lora-harness: error: --baseline: ")


def test_help_texts_render():
    """argparse %-formats help texts: a stray percent sign breaks --help for everyone."""
    p = run("pytest", "--help", "-p", "no:cacheprovider")
    assert p.returncode == 0 and "--baseline-fail" in p.stdout and "tokens_per_s:-5%," in p.stdout, p.stderr[-500:]
    for sub in ("run", "cells", "report", "compare"):
        p = run("harness", sub, "--help")
        assert p.returncode == 0 and "Traceback" not in p.stderr, (sub, p.stderr[-500:])
