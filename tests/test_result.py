import json

import pytest

from harness.core.record import RECORD_FIELDS, Status, dumps, is_oom_message, make_record, outcome_for


@pytest.mark.parametrize("status, action", [
    ("ok", "pass"), ("oom", "xfail"), ("unsupported", "skip"),
    ("error", "fail"), ("crash", "fail"), ("timeout", "fail"), ("weird", "fail"), (None, "fail"),
])
def test_outcome_mapping(status, action):
    assert outcome_for({"status": status, "cell_id": "c"}).action == action


def test_fail_on_oom():
    assert outcome_for({"status": "oom", "cell_id": "c", "error": "CUDA out of memory"}, fail_on_oom=True).action == "fail"
    msg = outcome_for({"status": "oom", "cell_id": "c", "error": "CUDA out of memory. Tried"}).message
    assert msg.startswith("OOM")


def test_oom_messages():
    assert is_oom_message("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_oom_message("RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
    assert is_oom_message("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")
    assert not is_oom_message("ValueError: shapes do not match")


def test_make_record_has_every_schema_field_and_rejects_unknown_status():
    spec = {"model": "m", "precision": "bf16", "seq_len": 8, "batch_size": 1, "grad_ckpt": "off"}
    rec = make_record(spec, "m/bf16/s8/gc-off", "run", {"status": "ok", "losses": [1.0]})
    assert set(RECORD_FIELDS) <= set(rec)
    assert rec["status"] == Status.OK
    bad = make_record(spec, "id", "run", {"status": "great"})
    assert bad["status"] == "error" and "unknown status" in bad["error"]


def test_dumps_never_writes_invalid_json():
    line = dumps({"losses": [1.0, float("nan"), float("inf")], "status": Status.OK})
    assert json.loads(line) == {"losses": [1.0, "nan", "inf"], "status": "ok"}
