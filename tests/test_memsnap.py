"""benchmarks/memsnap.py on synthetic allocator snapshots: the trace replayed to its peak,
live blocks grouped by the frame that allocated them, the phase of a step."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import memsnap as M  # noqa: E402

SITE = "/usr/lib/python3/site-packages/"
BNB = {"filename": SITE + "bitsandbytes/autograd/_functions.py", "line": 123, "name": "forward"}
LLAMA = {"filename": SITE + "transformers/models/llama/modeling_llama.py", "line": 77, "name": "forward"}
TORCH_LIN = {"filename": SITE + "torch/nn/modules/linear.py", "line": 125, "name": "forward"}
CKPT = {"filename": SITE + "torch/utils/checkpoint.py", "line": 1100, "name": "recompute_fn"}
BACKWARD = {"filename": SITE + "torch/autograd/__init__.py", "line": 353, "name": "backward"}
ADAM = {"filename": SITE + "torch/optim/adamw.py", "line": 10, "name": "step"}


def test_frame_signature_skips_torch_and_shortens_paths():
    assert M.frame_signature([TORCH_LIN, BNB, LLAMA]) == "bitsandbytes/autograd/_functions.py:123 forward"
    assert M.frame_signature([TORCH_LIN]) == "torch/nn/modules/linear.py:125 forward"  # all torch: innermost
    assert M.frame_signature([]) == M.NO_FRAME
    assert M.short_path("/work/x/harness/cell/train.py") == "harness/cell/train.py"
    assert M.collapse_layers("base_model.model.model.layers.12.mlp.down_proj") == "base_model.model.model.layers.*.mlp.down_proj"
    assert M.collapse_layers("model.layers.3") == "model.layers.*"


def test_phase_of_a_stack():
    assert M.phase_of([BNB, LLAMA]) == "forward"
    assert M.phase_of([BNB, LLAMA, CKPT, BACKWARD]) == "recompute"
    assert M.phase_of([TORCH_LIN, BACKWARD]) == "backward"
    assert M.phase_of([ADAM]) == "optimizer"


def test_the_trace_is_replayed_to_its_peak():
    mib = 2 ** 20
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * mib, "frames": [BNB, LLAMA]},
        {"action": "alloc", "addr": 2, "size": 50 * mib, "frames": [TORCH_LIN, LLAMA]},
        {"action": "segment_alloc", "addr": 9, "size": 999 * mib},  # reserved, not allocated
        {"action": "free_requested", "addr": 7, "size": 30 * mib},  # a block from before recording
        {"action": "alloc", "addr": 3, "size": 60 * mib, "frames": [BNB, LLAMA]},  # the peak: 1000+100+50-30+60
        {"action": "free_requested", "addr": 1, "size": 100 * mib},
        {"action": "free_completed", "addr": 1, "size": 100 * mib},
        {"action": "alloc", "addr": 4, "size": 10 * mib, "frames": [ADAM]},
    ]
    r = M.live_at_peak(trace, base_allocated=1000 * mib, top=5)
    assert r["peak_allocated_bytes"] == 1180 * mib and r["peak_entry"] == 4 and r["entries"] == 8
    assert r["actions"]["alloc"] == 4 and r["live_blocks_recorded"] == 3
    rows = {(x["frame"], x["phase"]): (x["bytes"], x["blocks"]) for x in r["top"]}
    assert rows[(M.BEFORE, "-")] == (970 * mib, None)  # 1000 before recording, 30 of it freed before the peak
    assert rows[("bitsandbytes/autograd/_functions.py:123 forward", "forward")] == (160 * mib, 2)
    assert rows[("transformers/models/llama/modeling_llama.py:77 forward", "forward")] == (50 * mib, 1)
    assert sum(b for b, _ in rows.values()) == r["peak_allocated_bytes"]
    assert [x["bytes"] for x in r["top"]] == sorted((x["bytes"] for x in r["top"]), reverse=True)


def test_live_blocks_of_a_snapshot():
    segs = [{"device": 0, "blocks": [{"state": "active_allocated", "size": 1024, "requested_size": 1000, "frames": [BNB]},
                                     {"state": "inactive", "size": 4096, "frames": []},
                                     {"state": "active_allocated", "size": 512, "history": [{"frames": [LLAMA]}]}]},
            {"device": 1, "blocks": [{"state": "active_allocated", "size": 64, "frames": []}]}]
    assert M.live_blocks(segs, 0) == [(1000, [BNB]), (512, [LLAMA])]
    assert len(M.live_blocks(segs)) == 3
    top = M.group(M.live_blocks(segs), top=1)
    assert top == [{"frame": "bitsandbytes/autograd/_functions.py:123 forward", "phase": "forward", "bytes": 1000,
                    "blocks": 1}]
