"""Options that used to be accepted silently and measure something other than what was
asked: each is now a one-line error with exit code 2."""

import subprocess
import sys

import pytest

from harness.core.errors import SpecError
from harness.plan.options import build_config

CPU = {"has_gpu": False}


@pytest.mark.parametrize("option", ["precision", "seq_len", "grad_ckpt", "model", "batch_size", "steps"])
def test_an_empty_list_option_is_an_error_not_the_presets_values(option):
    with pytest.raises(SpecError, match="is empty"):
        build_config({option: ""}, CPU)
    with pytest.raises(SpecError, match="is empty"):
        build_config({option: " , "}, CPU)


def test_a_length_over_the_models_context_is_an_error():
    with pytest.raises(SpecError, match="maximum context of 65,536"):
        build_config({"model": "tiny-llama", "seq_len": "100000000"}, CPU)
    assert build_config({"model": "tiny-llama", "seq_len": "65536", "precision": "bf16", "grad_ckpt": "off"},
                        CPU).cells[0].seq_len == 65536


def test_a_local_checkpoints_context_comes_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 4096}')
    with pytest.raises(SpecError, match="maximum context of 4,096"):
        build_config({"model": str(tmp_path), "seq_len": "8192"}, CPU)


def test_the_cli_says_it_in_one_line():
    p = subprocess.run([sys.executable, "-m", "harness", "cells", "--precision", ""], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["lora-harness: error: --precision is empty: give a value (see --help) "
                                             "or leave the option out"]


def test_a_gpu_sweep_on_a_host_without_a_gpu_is_refused_not_recorded_as_unsupported():
    with pytest.raises(SpecError, match="--device cuda: this host has no CUDA device"):
        build_config({"device": "cuda"}, {"has_gpu": False, "nvml_error": "NVML Shared Library Not Found"})
    p = subprocess.run([sys.executable, "-m", "harness", "run", "--device", "cuda"], capture_output=True, text=True)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
