"""Pure logic of the compatibility and stability suites: which cells, how a record maps to
a verdict, how a loss curve is judged (fabricated records in, verdicts out)."""

import math

import pytest

from harness.report import compat
from harness.report import stability
from harness.plan import suites
from harness.core.axes import PRECISIONS
from harness.core.errors import SpecError

CPU = {"has_gpu": False, "gpus": [], "bitsandbytes_installed": True}
GPU = {"has_gpu": True, "gpu_name": "NVIDIA H200", "compute_capability": "9.0", "bitsandbytes_installed": True}


# -- which cells ---------------------------------------------------------------------------

def test_compat_cells_cover_every_precision_mode_and_both_load_paths():
    cells = suites.cells_for("compat", {}, CPU)
    assert len(cells) == 3 * 3 * 2 + 4 * 3  # 16/32-bit: both load paths; quantised: from_pretrained
    assert {c.resolved_load() for c in cells if c.quantized} == {"pretrained"}
    assert {(c.precision, c.resolved_load()) for c in cells if not c.quantized} == {
        (p, load) for p in ("fp32", "bf16", "fp16") for load in ("config", "pretrained")}
    assert all(c.cell_id.endswith("/compat") and c.seq_len == 64 and c.model == "tiny-llama" for c in cells)
    assert all(c.warmup_steps == 1 and c.steps == 1 for c in cells)
    gpu = suites.cells_for("compat", {"compat_model": "llama-3.1-8b", "compat_load": "config", "compat_seq_len": 128,
                                      "compat_steps": 3}, GPU)
    assert len(gpu) == 7 * 3 and gpu[0].model == "llama-3.1-8b" and gpu[0].seq_len == 128 and gpu[0].steps == 2
    assert suites.cells_for("compat", {}, GPU)[0].model == "llama-3.2-1b"


def test_suite_options_and_shared_options():
    cells = suites.cells_for("compat", {"lh_precision": "nf4,bf16", "lh_grad_ckpt": "on", "lh_lr": 0.01}, CPU)
    assert [c.cell_id for c in cells] == ["tiny-llama/bf16/s64/gc-on/compat",
                                          "tiny-llama/bf16/s64/gc-on/load-pretrained/compat",
                                          "tiny-llama/nf4/s64/gc-on/compat"]
    assert all(c.lr == 0.01 for c in cells)
    # matrix-only options do not leak into the suites
    same = suites.cells_for("stability", {"seq_len": "8192", "steps": "3", "load": "config"}, CPU)
    assert all(c.seq_len == 64 and c.steps == 100 and c.load == "pretrained" for c in same)


def test_stability_cells_always_include_the_fp32_reference():
    cells = suites.cells_for("stability", {"stability_seeds": 1}, CPU)
    assert [c.precision for c in cells] == list(PRECISIONS)
    assert all(c.grad_ckpt == "off" and c.load == "pretrained" and c.warmup_steps == 0 for c in cells)
    assert len({(c.seed, c.lr, c.lora, c.seq_len) for c in cells}) == 1  # the same run but the precision
    only = suites.cells_for("stability", {"precision": "fp16", "stability_steps": 30, "stability_model": "tiny-qwen2",
                                          "stability_seeds": 1}, CPU)
    assert [c.precision for c in only] == ["fp32", "fp16"] and only[0].steps == 30 and only[0].model == "tiny-qwen2"
    assert suites.reference_for(only[1]) == only[0]
    over = suites.cells_for("overflow", {"precision": "nf4", "stability_seeds": 1}, CPU)
    assert [c.model for c in over] == ["tiny-overflow"] * 3 and [c.precision for c in over] == ["fp32", "bf16", "fp16"]
    assert suites.loading_model({}, GPU) == "llama-3.2-1b" and suites.loading_model({"model": "tiny-qwen2"}, GPU) == \
        "tiny-qwen2"


def test_stability_cells_repeat_each_run_over_seeds():
    """Each precision runs once per seed (2 on a CPU host, 3 with a GPU by default): the same
    base weights (one synthetic checkpoint), the seed's data and adapter initialisation."""
    cells = suites.cells_for("stability", {"precision": "bf16"}, CPU)
    assert [(c.precision, c.seed) for c in cells] == [("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1)]
    assert [c.cell_id for c in cells[2:]] == ["tiny-llama/bf16/s64/gc-off/load-pretrained/stability",
                                              "tiny-llama/bf16/s64/gc-off/load-pretrained/stability/seed1"]
    assert len({(c.model, c.load, c.lr, c.lora, c.seq_len, c.model_path) for c in cells}) == 1
    assert suites.reference_for(cells[3]) == cells[1]  # each seed against fp32 of the same seed
    assert suites.seed_siblings(cells[3], cells) == list(cells[2:])
    gpu = suites.cells_for("stability", {"precision": "bf16", "seed": 5}, GPU)
    assert [c.seed for c in gpu] == [5, 6, 7] * 2 and gpu[1].cell_id.endswith("/stability/seed6")
    assert len(suites.cells_for("stability", {"stability_seeds": 4}, CPU)) == 4 * len(PRECISIONS)
    assert [c.seed for c in suites.cells_for("overflow", {}, CPU)] == [0, 1] * 3
    with pytest.raises(SpecError, match="--stability-seeds"):
        suites.cells_for("stability", {"stability_seeds": 0}, CPU)


@pytest.mark.parametrize("values, msg", [({"compat_load": "disk"}, "--compat-load"),
                                         ({"compat_steps": 0}, "--compat-steps"),
                                         ({"compat_seq_len": 1}, "--compat-seq-len"),
                                         ({"compat_model": "gpt-17"}, "unknown model")])
def test_suite_option_errors(values, msg):
    with pytest.raises(SpecError, match=msg):
        suites.cells_for("compat", values, CPU)
    with pytest.raises(SpecError, match="--stability-steps"):
        suites.cells_for("stability", {"stability_steps": -1}, CPU)


# -- compatibility verdicts ---------------------------------------------------------------

def _rec(status="ok", supported=True, rule=None, mode="off", precision="bf16", **kw):
    fwd = 4
    ev = {"layer_runs_forward": fwd, "layer_recomputes": 0 if mode == "off" else fwd,
          "offloaded_bytes": 1000 if mode == "offload" else 0,
          "saved_activation_bytes_step0": {"off": 900, "on": 300, "offload": 250}[mode]}
    rec = {"cell_id": f"m/{precision}/s64/gc-{mode}/compat", "model": "m", "precision": precision, "grad_ckpt": mode,
           "status": status, "error": None if status == "ok" else "boom\nmore", "load_path": "config", "device": "cpu",
           "prediction": {"supported": supported, "rule": rule, "reason": None if supported else f"{rule} says no"},
           "grad_ckpt_evidence": ev, "peak_rss_bytes": 2**30, "suite": "compat"}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("status, supported, action, agrees", [
    ("ok", True, "pass", True),
    ("oom", True, "xfail", True),
    ("error", True, "fail", False),  # predicted to work, broke: the rules missed something
    ("unsupported", True, "fail", False),
    ("ok", False, "fail", False),  # predicted unsupported, trained: a rule is too strict
    ("unsupported", False, "skip", True),
    ("error", False, "skip", True),  # cannot run here, as predicted
    ("crash", False, "skip", True),
])
def test_compat_outcomes(status, supported, action, agrees):
    rec = _rec(status, supported, None if supported else "bf16-cc80")
    assert compat.row_for(rec).agrees is agrees
    out = compat.compat_outcome(rec)
    assert out.action == action, out
    if not agrees:
        assert out.message.startswith("prediction contradicted: m/bf16/s64/gc-off/compat: predicted")


def test_a_cell_not_attempted_never_passes():
    rec = _rec("unsupported", False, "bnb-installed", predicted_unsupported=True)
    assert compat.row_for(rec).outcome == "not run"
    assert compat.compat_outcome(rec).action == "skip"


def test_checkpointing_comparison():
    rows = {m: compat.row_for(_rec(mode=m)) for m in ("off", "on", "offload")}
    assert compat.checkpointing_problems(rows) == []
    worse = dict(rows, on=compat.row_for(_rec(mode="on", grad_ckpt_evidence={
        "layer_runs_forward": 4, "layer_recomputes": 0, "offloaded_bytes": 0, "saved_activation_bytes_step0": 950})))
    probs = compat.checkpointing_problems(worse)
    assert any("0 recomputed layer runs, expected 4" in p for p in probs)
    assert any("not fewer than gc-off's" in p for p in probs)
    no_offload = dict(rows, offload=compat.row_for(_rec(mode="offload", grad_ckpt_evidence={
        "layer_runs_forward": 4, "layer_recomputes": 4, "offloaded_bytes": 0, "saved_activation_bytes_step0": 250})))
    assert "the offload mode moved nothing to host memory" in compat.checkpointing_problems(no_offload)
    assert compat.checkpointing_problems({"off": rows["off"]}) == ["mode(s) on, offload not run"]


def test_compat_report_lists_disagreements_and_groups():
    recs = [_rec(mode=m) for m in ("off", "on", "offload")] + [_rec("ok", False, "bf16-cc80", precision="fp16")]
    data = compat.report(recs, host="test host")
    assert len(data["rows"]) == 4 and len(data["disagreements"]) == 1
    assert "predicted unsupported by rule bf16-cc80" in data["disagreements"][0]
    assert "**NO**" in data["markdown"] and "- m/bf16/config: holds" in data["markdown"]
    assert compat.suite_records(recs + [dict(recs[0], suite="stability")], "compat")[0]["suite"] == "compat"


# -- stability judgement ------------------------------------------------------------------

def _curve(n=100, start=6.9, end=4.9):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def _srec(losses, precision="bf16", **kw):
    rec = {"cell_id": f"m/{precision}/stability", "model": "m", "precision": precision, "status": "ok",
           "losses": losses, "spec": {"model": "m", "precision": precision, "seed": 0}}
    rec.update(kw)
    return rec


def test_a_stable_precision_passes_and_is_measured():
    ref = _srec(_curve(), "fp32")
    wobble = [x + (0.05 if i == 40 else 0.0) for i, x in enumerate(_curve())]
    r = stability.judge(_srec(wobble), ref)
    assert r.problems == [] and r.verdict == "stable"
    assert r.final_ratio == pytest.approx(1.0) and r.max_deviation_step == 40 and r.max_abs_deviation == pytest.approx(0.05)
    assert r.drop == pytest.approx((r.first_loss - r.final_loss) / r.first_loss)
    assert stability.judge(ref, None).problems == []


def test_nan_fails_with_the_step_and_the_values():
    losses = _curve()
    losses[37:40] = [math.nan, "inf", math.nan]  # stored records hold "inf" as a string
    r = stability.judge(_srec(losses, "fp16", nonfinite_message="fp16 overflow: activations became inf at step 37 "
                                                                 "in model.layers.0.mlp"), _srec(_curve(), "fp32"))
    assert r.verdict == "non-finite" and r.nonfinite_steps == [37, 38, 39] and r.first_nonfinite == (37, "nan")
    msg = r.problems[0]
    assert "first at step 37" in msg and "37: nan, 38: inf, 39: nan" in msg and "fp16 overflow" in msg


def test_divergence_and_a_flat_loss_fail():
    ref = _srec(_curve(), "fp32")
    diverged = _srec(_curve(end=6.5), "fp16")
    r = stability.judge(diverged, ref)
    assert any(p.startswith("diverged from fp32: final loss") and "ratio 1.3" in p and "largest deviation" in p
               for p in r.problems)
    flat = stability.judge(_srec([6.9] * 100, "fp32"), None)
    assert flat.problems and "did not clearly fall" in flat.problems[0] and "0% drop" in flat.problems[0]
    assert stability.judge(_srec([], "fp32", status="error"), None).verdict == "error"


def test_judge_all_pairs_each_precision_with_its_own_fp32():
    recs = [_srec(_curve(), "fp32"), _srec(_curve(end=6.5), "fp16"),
            _srec(_curve(start=7.0, end=6.0), "fp32", spec={"model": "other", "precision": "fp32"}, model="other"),
            _srec(_curve(start=7.0, end=6.0), "bf16", spec={"model": "other", "precision": "bf16"}, model="other")]
    results = stability.judge_all(recs, stability.Thresholds(min_drop=0.1))
    assert [r.verdict for r in results] == ["stable", "unstable", "stable", "stable"]
    data = stability.report(recs)
    assert set(data["curves"]) == {r["cell_id"] for r in recs} and "| other | bf16 |" in data["markdown"]


def test_compat_report_names_activations_checkpointing_cannot_free():
    held = {"MatMul8bitLt": {"bytes": 3 * 2**20, "tensors": 8}}
    recs = [_rec(mode=m, precision="int8") for m in ("off", "offload")]
    recs.append(_rec(mode="on", precision="int8"))
    recs[-1]["grad_ckpt_evidence"].update(ctx_held_activation_bytes_step0=3 * 2**20, ctx_held_by_function=held)
    recs[0]["grad_ckpt_evidence"]["ctx_held_activation_bytes_step0"] = 3 * 2**20  # gc-off: nothing to free, no finding
    data = compat.report(recs)
    assert data["held_on_autograd_ctx"] == [
        "m/int8/s64/gc-on/compat: 3.00 MiB of layer activations held on autograd contexts through the forward "
        "pass: gc-on cannot free them"]
    assert "## Activations checkpointing cannot free" in data["markdown"] and "3.00 MiB" in data["markdown"]
    assert "None: no custom autograd function" in compat.report(recs[1:2])["markdown"]


def test_report_evidence_column_names_held_activations():
    from harness.report.tables import _evidence
    ev = {"mode": "on", "layer_recomputes": 4, "layer_runs_forward": 4, "ctx_held_activation_bytes_step0": 3 * 2**30}
    assert "3.00 GiB of activations held on autograd contexts" in _evidence(ev)
    assert "held" not in _evidence(dict(ev, mode="off"))
