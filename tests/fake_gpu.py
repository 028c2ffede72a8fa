"""A pytest plugin (``-p tests.fake_gpu``) that lets the GPU suites' own code run on a CPU
host: the parent side sees an H200 (``harness.core.host.quick_facts``) and every cell is
answered by :class:`tests.fakes.FakeHost` and stored like a real record, instead of a
worker. Nothing reaches a device; records carry ``"fake": true``. Used by
tests/test_h200_job.py to run scripts/h200-fit.sh's exact pytest command."""

import harness.core.host
import harness.run.sweep
from harness.core.fingerprint import measurement_opts
from harness.core.record import make_record
from tests.fakes import FakeHost

H200 = {"has_gpu": True, "gpus": [{"index": 0, "name": "NVIDIA H200", "compute_capability": "9.0",
                                   "memory_total_bytes": 150754820096}],
        "driver_version": "fake", "nvml_error": None, "gpu_name": "NVIDIA H200", "compute_capability": "9.0",
        "bf16_supported": True, "bitsandbytes_installed": True}
HOST = FakeHost()

harness.core.host.quick_facts = lambda: dict(H200)


def _fake_run(self, cell):
    stored = self.resumable(cell)
    if stored is not None:  # --resume, as the real Sweep.run does
        return self.commit(dict(stored, resumed=True), resumed=True)
    store = self.open_store()
    worker = {k: v for k, v in HOST.record(cell).items() if k not in ("cell_id", "spec")}
    rec = make_record(cell.to_dict(), cell.cell_id, store.run_id, worker,
                      {"wall_time_s": worker.pop("wall_time_s", 1.0), "fake": True,
                       "fingerprint": self.fingerprint(cell),  # as Sweep.record stores it
                       "measurement_opts": measurement_opts(self.config.worker_opts())})
    return self.commit(rec, elapsed=0.0)


harness.run.sweep.Sweep.run = _fake_run
