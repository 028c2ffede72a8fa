"""``lora-harness compare``: exit codes 0 / 1 / 2 and one-line errors; the CI recipe."""

import pytest

from harness.plan.options import OPTIONS
from tests.report_helpers import FIXTURES, ROOT, one_line_error, record, run, write_run

STEADY = (0.100, 0.101, 0.099, 0.100, 0.102)


def test_compare_exit_codes(tmp_path):
    base = write_run(tmp_path / "base", [record("m/bf16/s512/gc-off", steps=STEADY), record("m/nf4/s512/gc-off")])
    same = write_run(tmp_path / "same", [record("m/bf16/s512/gc-off", steps=STEADY), record("m/nf4/s512/gc-off")])
    slow = write_run(tmp_path / "slow", [record("m/bf16/s512/gc-off", steps=tuple(t * 1.1 for t in STEADY)),
                                         record("m/nf4/s512/gc-off")])
    p = run("harness", "compare", str(base), str(same))
    assert p.returncode == 0 and p.stdout.startswith("no regression: 2 cells compared"), p.stdout + p.stderr
    assert (same / "compare.md").is_file()
    p = run("harness", "compare", str(base), str(slow), "--out", str(tmp_path / "r.md"))
    assert p.returncode == 1 and "REGRESSION: 1 metric regression(s)" in p.stdout
    assert "m/bf16/s512/gc-off: tokens_per_s 5,120 tokens/s -> 4,655 tokens/s (-9.1%; threshold tokens_per_s:-5%)" \
        in p.stdout
    assert "| REGRESSION |" in (tmp_path / "r.md").read_text()
    # a looser threshold lets the same change pass
    p = run("harness", "compare", str(base), str(slow), "--fail", "tokens_per_s:-10%", "--out", str(tmp_path / "x.md"))
    assert p.returncode == 0, p.stdout
    # an absolute threshold in the stored unit (seconds)
    p = run("harness", "compare", str(base), str(slow), "--fail", "step_time_s:+0.005", "--out", str(tmp_path / "y.md"))
    assert p.returncode == 1 and "step_time_s 100.0 ms -> 110.0 ms" in p.stdout, p.stdout


def test_compare_bad_input(tmp_path):
    base = write_run(tmp_path / "base", [record("m/bf16/s512/gc-off")])
    for args, msg in [
        ((str(base), str(tmp_path / "missing")), "no such run folder"),
        ((str(base), str(FIXTURES / "empty")), "no usable records"),
        ((str(base),), "needs a BASELINE and a CURRENT"),
        ((str(base), str(base), "--fail", "tokens_per_sec:-5%"), "unknown metric 'tokens_per_sec'"),
        ((str(base), str(base), "--fail", "tokens_per_s:-five%"), "is not METRIC:+N% / METRIC:-N%"),
        ((str(base), str(FIXTURES / "cpu-mixed")), "no cell in common"),
    ]:
        one_line_error(run("harness", "compare", *args), 2, msg)


def test_compare_truncated_baseline_warns_and_compares(tmp_path):
    out = tmp_path / "c.md"
    p = run("harness", "compare", str(FIXTURES / "truncated"), str(FIXTURES / "cpu-mixed"), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "lora-harness: warning: " in p.stderr and "line 4 is not valid JSON" in p.stderr
    assert "no regression: 3 cells compared" in p.stdout
    assert "48 cells" not in p.stdout and "| tiny-llama/nf4/s64/gc-on | added |" in out.read_text()


def test_the_ci_recipe_uses_real_options_and_a_committed_baseline():
    yaml = pytest.importorskip("yaml")  # PyYAML comes with transformers
    wf = yaml.safe_load((ROOT / "ci" / "github-gpu-regression.yml").read_text())
    job = wf["jobs"]["lora-matrix"]
    assert (ROOT / job["env"]["BASELINE"] / "results.jsonl").is_file()
    script = "\n".join(s.get("run", "") for s in job["steps"])
    flags = {f"--{o.name}" for o in OPTIONS}
    for flag in ("--baseline", "--baseline-fail", "--run-dir", "--precision"):
        assert flag in script and flag in flags
    assert "lora-harness report" in script
    assert any("upload-artifact" in s.get("uses", "") for s in job["steps"])
