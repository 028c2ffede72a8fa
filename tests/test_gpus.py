"""Issue 8, the pieces under the pool: --gpus parsing, pinning, the NVML index a pinned
cell reads, the scheduler's order rule, a store several writers append to, and the
synthetic checkpoint written once when two workers want it at the same time."""

import json
import multiprocessing
import re
import sys
import threading
import types

import pytest

from harness.plan.gpus import FAKE_ENV, GpuSlot, host_gpus, parse_gpus
from harness.run.pool import ready_index
from harness.core.spec import CellSpec
from harness.core.errors import SpecError
from harness.core.store import RunStore, load_records

TWO = {"has_gpu": True, "gpus": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-aaaa-0000"},
                                 {"index": 1, "name": "NVIDIA H200", "uuid": "GPU-bbbb-1111"}]}
NONE = {"has_gpu": False, "gpus": [], "nvml_error": "NVMLError_LibraryNotFound: NVML Shared Library Not Found"}


def test_gpus_option_selects_slots_in_the_order_given(monkeypatch):
    monkeypatch.delenv(FAKE_ENV, raising=False)
    assert parse_gpus(None, TWO) == ()
    assert [g.index for g in parse_gpus("all", TWO)] == [0, 1]
    assert [g.index for g in parse_gpus("1,0", TWO)] == [1, 0]
    for value, msg in [("0,2", "GPU 2 does not exist on this host (GPUs: 0, 1)"), ("0,0", "given twice"),
                       ("x", "not a GPU index"), (",", "no GPU index given")]:
        with pytest.raises(SpecError, match=re.escape(msg)):
            parse_gpus(value, TWO)
    with pytest.raises(SpecError, match="--device cpu"):
        parse_gpus("0", TWO, device="cpu")
    with pytest.raises(SpecError, match=r"no GPU found on this host \(NVMLError_LibraryNotFound.*--gpus needs NVIDIA GPUs"):
        parse_gpus("0,1", NONE)


def test_pinning_uses_the_uuid_for_real_gpus_and_the_index_for_fake_ones(monkeypatch):
    real = parse_gpus("1", TWO)[0]
    assert real.pin_env() == {"CUDA_VISIBLE_DEVICES": "GPU-bbbb-1111", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                              "LORA_HARNESS_GPU_INDEX": "1", "LORA_HARNESS_GPU_UUID": "GPU-bbbb-1111"}
    monkeypatch.setenv(FAKE_ENV, "3")
    fakes = host_gpus(NONE)
    assert [g.index for g in fakes] == [0, 1, 2] and all(g.fake for g in fakes)
    assert fakes[2].pin_env()["CUDA_VISIBLE_DEVICES"] == "2"
    assert [g.index for g in parse_gpus("all", NONE)] == [0, 1, 2]
    assert host_gpus(TWO) == [GpuSlot(0, "GPU-aaaa-0000", "NVIDIA H200"), GpuSlot(1, "GPU-bbbb-1111", "NVIDIA H200")]


def test_default_without_gpus_option_stays_serial():
    from harness.plan.options import build_config

    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "64"}, NONE)
    assert cfg.gpus == () and "gpus" not in cfg.options


class FakeNvml(types.ModuleType):
    """pynvml with two GPUs whose NVML order is the reverse of their UUIDs' order."""

    UUIDS = ["GPU-ffff-2222", "GPU-1111-aaaa"]

    def __init__(self):
        super().__init__("pynvml")
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.inits -= 1

    def nvmlDeviceGetCount(self):
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.UUIDS[h].encode()  # older bindings return bytes


def test_a_pinned_cell_reads_its_own_gpu_in_nvml(monkeypatch):
    from harness.cell.trackers.memory import nvml_index_for_visible_device

    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvml_index_for_visible_device(0) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvml_index_for_visible_device(0) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1111-aaaa")  # what --gpus pins with
    assert nvml_index_for_visible_device(0) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ffff")  # a prefix, as CUDA accepts
    assert nvml_index_for_visible_device(0) == 0
    assert nvml.inits == 0  # NVML was initialised for the lookup (before any sampler) and released
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0c2b")  # never GPU 0 by default
    with pytest.raises(LookupError, match="matches no NVML device"):
        nvml_index_for_visible_device(0)


def _cells(*specs):
    return [CellSpec(model="tiny-llama", precision=p, seq_len=s, grad_ckpt=g) for p, s, g in specs]


def test_a_rows_cells_start_in_ascending_length_whatever_gpu_is_free():
    a64, a256, a1k, b64 = _cells(("bf16", 64, "off"), ("bf16", 256, "off"), ("bf16", 1024, "off"), ("fp32", 64, "off"))
    # the shorter cell of a row is running on the other GPU: take another row's cell
    assert ready_index([a256, a1k, b64], [a64], prune=True) == 2
    # nothing else to do: wait for it (None), rather than start a cell pruning might skip
    assert ready_index([a256, a1k], [a64], prune=True) is None
    assert ready_index([a256, a1k], [], prune=True) == 0
    # a longer cell listed first still waits for the shorter one
    assert ready_index([a1k, a256], [], prune=True) == 1
    # without pruning any order goes
    assert ready_index([a256, a1k], [a64], prune=False) == 0
    assert ready_index([], [a64], prune=True) is None


def _append_many(path, writer, n):
    store = RunStore(path)
    for i in range(n):
        store.append({"cell_id": f"w{writer}/c{i}", "status": "ok", "pad": "x" * 5000})


def test_store_appends_from_threads_and_processes_never_interleave(tmp_path):
    run = tmp_path / "run"
    RunStore(run)
    (run / "results.jsonl").write_text('{"cell_id": "cut", "status"')  # a run killed mid-write
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(run, w, 40)) for w in range(2)]
    threads = [threading.Thread(target=_append_many, args=(run, w, 40)) for w in range(2, 4)]
    for t in (*procs, *threads):
        t.start()
    for t in (*procs, *threads):
        t.join()
    assert all(p.exitcode == 0 for p in procs)
    with pytest.warns(UserWarning, match="line 1 is not valid JSON"):
        recs = load_records(run / "results.jsonl")
    assert sorted(r["cell_id"] for r in recs) == sorted(f"w{w}/c{i}" for w in range(4) for i in range(40))
    assert all(len(r["pad"]) == 5000 for r in recs)


def test_two_workers_wanting_the_same_checkpoint_write_it_once(tmp_path):
    from harness.core.models import get_preset
    from harness.cell.build import checkpoint_dir, ensure_checkpoint

    preset = get_preset("tiny-llama")
    logs: list[str] = []
    barrier = threading.Barrier(2)

    def want():
        barrier.wait()
        ensure_checkpoint(preset, device="cpu", cache_dir=str(tmp_path), log=logs.append)

    threads = [threading.Thread(target=want) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("writing synthetic checkpoint" in m for m in logs) == 1, logs
    assert sum("written by another worker" in m for m in logs) == 1, logs
    final = checkpoint_dir(preset, str(tmp_path))
    assert json.loads((final / ".complete").read_text())["preset"] == "tiny-llama"
    assert not list(final.parent.glob(".*.tmp-*"))


def test_gpus_and_torchrun_cells_are_not_mixed_in_one_sweep(monkeypatch):
    from harness.plan.options import build_config

    monkeypatch.delenv(FAKE_ENV, raising=False)
    with pytest.raises(SpecError, match="--world-size above 1 take the host's GPUs through torchrun"):
        build_config({"lh_precision": "bf16", "lh_seq_len": "64", "lh_gpus": "0,1", "lh_world_size": "1,2",
                      "lh_model": "tiny-llama"}, TWO)
    cfg = build_config({"lh_precision": "bf16", "lh_seq_len": "64", "lh_gpus": "0,1", "lh_model": "tiny-llama"}, TWO)
    assert len(cfg.gpus) == 2
