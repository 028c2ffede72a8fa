"""The memory models' predictions against the committed H200 fit answers: the table in the
fit run's README is what scripts/memmodel-check.py computes from the committed records."""

import re
import subprocess
import sys
from pathlib import Path

from harness.fit import memmodel

ROOT = Path(__file__).resolve().parent.parent
RUNS = ["reports/reference/h200-core-2026-11-29", "reports/reference/h200-fit-claims-2026-11-29",
        "reports/reference/h200-fit-40-80-2026-12-05"]


def test_the_committed_table_is_current():
    out = subprocess.run([sys.executable, "scripts/memmodel-check.py", *RUNS], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    readme = (ROOT / RUNS[-1] / "README.md").read_text()
    table = re.search(r"<!-- memmodel-check -->\n(.*)<!-- /memmodel-check -->", readme, re.S).group(1)
    assert table == out


def test_the_reserved_model_is_an_upper_bound_of_the_need():
    alloc = memmodel.MemModel("a", fixed_bytes=10.0, per_token_bytes=1.0)
    res = memmodel.MemModel("r", fixed_bytes=11.0, per_token_bytes=1.5)
    full, half = memmodel.NeedModel(alloc, res), memmodel.NeedModel(alloc, res, 0.5)
    assert full.predict(100) == res.predict(100) and half.predict(100) == (alloc.predict(100) + res.predict(100)) / 2
    assert full.longest_within(161.0, granularity=10) == 100  # 11 + 1.5 * 100 = 161
    assert half.longest_within(161.0, granularity=10) > 100


def test_calibration_reads_fits_and_ooms_under_a_cap():
    alloc = memmodel.MemModel("a", fixed_bytes=0.0, per_token_bytes=1.0)
    res = memmodel.MemModel("r", fixed_bytes=0.0, per_token_bytes=2.0)
    recs = [{"seq_len": 100, "status": "ok", "allocator_limit_bytes": 180},   # needed <= 0.8 of the gap
            {"seq_len": 120, "status": "oom", "allocator_limit_bytes": 180}]  # needed > 0.5 of it
    assert memmodel.calibrate_gap(alloc, res, recs) == (0.5 + 0.8) / 2
    assert memmodel.calibrate_gap(alloc, res, []) == 1.0
