"""The settings fingerprint (what makes two records the same measurement) and the run
folder's lock (one writer at a time)."""

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from harness.core import fingerprint as F
from harness.core.spec import CellSpec, LoraSpec, WindowSpec
from harness.core.store import RunLock, RunStore, StoreError, new_run_id

REFERENCE = Path(__file__).resolve().parent.parent / "reports" / "reference"


def cell(**kw):
    return CellSpec("tiny-llama", "bf16", 64, **kw)


@pytest.mark.parametrize("change", [
    {"lora": LoraSpec(rank=8)}, {"lora": LoraSpec(alpha=8)}, {"lora": LoraSpec(dropout=0.1)},
    {"lora": LoraSpec(target_modules="q_proj,v_proj")}, {"lora": LoraSpec(input_cast=False)},
    {"optimizer": "sgd"}, {"lr": 1e-4}, {"warmup_steps": 1}, {"steps": 3}, {"seed": 1},
    {"window": WindowSpec()}, {"vram_budget_bytes": 2 ** 30}, {"load": "pretrained"},
])
def test_every_setting_that_changes_the_numbers_changes_the_fingerprint(change):
    assert F.fingerprint(cell(**change)) != F.fingerprint(cell())


def test_measurement_settings_count_and_defaults_are_filled():
    base = F.fingerprint(cell())
    assert F.fingerprint(cell(), {}) == base == F.fingerprint(cell(), {"nvml_period_s": 0.005, "device": "cpu"})
    assert F.fingerprint(cell(), {"nvml_period_s": 0}) != base
    assert F.fingerprint(cell(), {"sampler_mode": "process"}) != base
    assert F.fingerprint(cell(), {"int8_prequantized": True}) != base


def test_a_record_without_one_gets_it_from_its_spec_and_the_difference_is_named():
    rec = {"spec": cell().to_dict()}
    assert F.of_record(rec) == F.fingerprint(cell())
    assert F.explain(rec, cell(lora=LoraSpec(rank=8), steps=3), None) == "lora.rank 16 -> 8, steps 5 -> 3"
    assert F.of_record({"spec": {"model": "x/y"}}) is None  # a damaged spec has none


def test_a_spec_written_before_a_setting_existed_keeps_its_fingerprint():
    old = cell().to_dict()
    del old["lora"]["input_cast"], old["window"]  # as records written before those settings
    assert F.of_record({"spec": old}) == F.fingerprint(cell())


def test_committed_reference_records_all_have_fingerprints():
    for results in REFERENCE.glob("*/results.jsonl"):
        for line in results.read_text().splitlines():
            rec = json.loads(line)
            assert F.of_record(rec), f"{results}: {rec.get('cell_id')}"


def test_run_ids_started_in_the_same_second_differ():
    ids = {new_run_id() for _ in range(200)}
    assert len(ids) == 200


def test_new_run_folders_never_share(tmp_path):
    dirs = {RunStore.open(base=tmp_path).dir for _ in range(20)}
    assert len(dirs) == 20


def _hold(path, ready, release):
    with RunLock(path).acquire("lora-harness run --matrix smoke"):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_refused_and_told_who_holds_the_folder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreError, match=rf"in use by another sweep \(pid {p.pid} on .*lora-harness run"):
            RunLock(tmp_path).acquire()
    finally:
        release.set()
        p.join(30)
    RunLock(tmp_path).acquire().release()  # free again once the holder is gone


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, 9)
    p.join(30)
    RunLock(tmp_path).acquire().release()
