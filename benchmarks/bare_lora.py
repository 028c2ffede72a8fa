"""A bare LoRA training loop: no harness worker, no trackers, no proofs, no records.

The reference the harness's own overhead is measured against (benchmarks/overhead.py).
It does the work of a harness cell (``harness/cell/setup.py`` and ``harness/cell/loop.py``)
step for step, written out plainly:

- the model: the preset's config (``harness/core/model_presets/<model>.json``) built with
  ``from_config`` on the device after ``torch.manual_seed(seed)`` for 16/32-bit
  precisions; for quantised ones ``from_pretrained`` of the checkpoint folder
  (``--checkpoint``: the harness's synthetic checkpoint, same base weights) with the
  harness's ``BitsAndBytesConfig`` (every field set the same way; ``lm_head`` kept
  unquantised), compute dtype bf16 where supported, else fp16;
- gradient checkpointing ``on``: transformers' non-reentrant checkpointing and
  ``enable_input_require_grads``, before LoRA (as the harness does);
- LoRA: ``torch.manual_seed(seed)`` then peft's ``get_peft_model`` with r / alpha /
  dropout, ``all-linear`` targets, no bias; ``model.train()``;
- AdamW (weight decay 0) on the LoRA parameters; ``GradScaler`` only where the compute
  dtype is fp16; ``torch.autocast`` in the cell's dtype (none for fp32);
- the same tokens: batch i comes from ``harness.cell.data.make_batches`` (the one harness
  import: a pure numpy function, called before the loop), ``input_ids`` = ``labels``;
- the step: forward, loss, backward, optimizer step, ``zero_grad(set_to_none=True)``,
  timed on the host clock between two device synchronisations; warm-up steps excluded
  from the median; ``loss.item()`` after each step, outside the timed region.

With ``--gate GO,DONE`` (``benchmarks/interleaved.py``) every step first waits for a
driver's word at a step gate (``harness/trackers/gate.py``), outside the timer, so this
loop and a harness cell, both alive, can take turns step by step; the driver ends the
loop early with ``stop``, and a ``profile`` step runs under the GPU-busy profiler
(``harness/trackers/gpu_busy.py``) and is left out of the median.

It prints one JSON line (and writes it to ``--json-out``): tokens/s from the median
step, every step time, the losses, and the torch allocator's peak allocated / reserved
bytes since the loop started (``null`` on a CPU: there is no allocator peak there).

    python benchmarks/bare_lora.py --model llama-3.1-8b --precision bf16 --seq-len 2048 --grad-ckpt on
    python benchmarks/bare_lora.py --model llama-3.1-8b --precision nf4 --seq-len 2048 --grad-ckpt on \\
        --checkpoint ~/.cache/lora-harness/checkpoints/llama-3.1-8b-<key>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "harness" / "core" / "model_presets"
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b", help="a text model preset")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-ckpt", default="off", choices=["off", "on"])
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--checkpoint", help="checkpoint folder (quantised precisions)")
    p.add_argument("--json-out", help="also write the JSON result here")
    p.add_argument("--gate", help="GO,DONE: FIFOs of a step gate (harness/trackers/gate.py): every step waits for "
                                  "the driver's word (benchmarks/interleaved.py)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from harness.cell.data import make_batches  # tokens only (numpy), so both loops see the same batches

    import peft  # noqa: F401 - imported before the clock stops, as the harness's worker has it
    import torch
    import transformers  # noqa: F401

    t_imported = time.perf_counter()
    if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", 0)
    model, config, amp = _build_model(a, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    n = a.warmup_steps + a.steps
    batches = [torch.from_numpy(x) for x in make_batches(config.vocab_size, a.seq_len, a.batch_size, n, a.seed)]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_loop = time.perf_counter()

    def step(ids):
        if amp is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.autocast(dev.type, dtype=amp):
                loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses, gated = _loop(step, batches, dev, sync, a)
    t_end = time.perf_counter()
    gate = gated.pop("gate", None)
    measured = [t for i, t in enumerate(times) if i >= a.warmup_steps and i not in gated["profiled_steps"]]
    med = statistics.median(measured) if measured else None
    cuda = dev.type == "cuda"
    result = {
        "kind": "bare", "model": a.model, "precision": a.precision, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "grad_ckpt": a.grad_ckpt, "warmup_steps": a.warmup_steps, "steps": a.steps, "seed": a.seed,
        "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "step_time_s": med, "tokens_per_s": a.seq_len * a.batch_size / med if med else None,
        "step_times_s": measured, "warmup_step_times_s": times[:a.warmup_steps], "losses": losses,
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
        "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(dev)) if cuda else None,
        "imports_s": t_imported - t_start, "setup_s": t_loop - t_imported, "loop_s": t_end - t_loop,
    }
    if a.gate:
        result["step_gate"] = gated
    line = json.dumps(result)
    print(line, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(line + "\n")
    if gate is not None:  # after the JSON: the driver reads it once the side has said its last word
        gate.end()
    return 0


def _build_model(a, dev):
    """The preset's model as the harness cell builds or loads it, checkpointing before LoRA,
    LoRA from the seed, training mode; (model, config, autocast dtype or None)."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    preset = json.loads((PRESETS / f"{a.model}.json").read_text())
    if preset.get("init_overrides") or "vision_config" in preset["config"]:
        raise SystemExit(f"{a.model}: the bare loop covers plain text presets only")
    cfg_data = dict(preset["config"])
    config = AutoConfig.for_model(cfg_data.pop("model_type"), **cfg_data)
    bf16_ok = dev.type == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
    compute = torch.bfloat16 if bf16_ok else torch.float16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    skip = ["lm_head"] + list(preset.get("keep_unquantized", ()))
    if a.precision in dtypes:
        torch.manual_seed(a.seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dtypes[a.precision], attn_implementation="sdpa")
        amp = None if a.precision == "fp32" else dtypes[a.precision]
    else:
        if not a.checkpoint:
            raise SystemExit("quantised precisions need --checkpoint (the harness's synthetic checkpoint folder)")
        if a.precision == "int8":
            q = BitsAndBytesConfig(load_in_8bit=True, load_in_4bit=False, llm_int8_skip_modules=skip)
        else:
            q = BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=False,
                                   bnb_4bit_quant_type="fp4" if a.precision == "fp4" else "nf4",
                                   bnb_4bit_use_double_quant=a.precision == "nf4-dq", bnb_4bit_compute_dtype=compute,
                                   bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip)
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, device_map={"": str(dev)}, attn_implementation="sdpa",
                                                     dtype=compute, quantization_config=q)
        amp = compute
    if a.grad_ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(a.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha,
                                                       lora_dropout=a.lora_dropout, target_modules="all-linear",
                                                       bias="none", task_type="CAUSAL_LM"))
    model.train()
    return model, config, amp


def _loop(step, batches, dev, sync, a):
    """The steps, each timed between two synchronisations; behind a step gate each one
    waits for the driver's word first (outside the timer), ``stop`` ends the loop and
    ``profile`` runs that step under the GPU-busy profiler (left out of the median)."""
    from contextlib import nullcontext

    gate = None
    if a.gate:
        from harness.cell.trackers.gate import PROFILE, STOP, StepGate

        gate = StepGate(*a.gate.split(",", 1))
    times, losses, info = [], [], {"profiled_steps": [], "busy": None, "stopped_by_driver": False}
    for i, batch in enumerate(batches):
        ids = batch.to(dev, non_blocking=True)
        cmd = gate.wait_turn() if gate else "go"
        if gate and cmd == STOP:
            info["stopped_by_driver"] = True
            break
        prof = nullcontext()
        if gate and cmd == PROFILE:
            from harness.cell.trackers.gpu_busy import BusyProfile

            prof = BusyProfile(dev)
        with prof:
            sync()
            t0 = time.perf_counter()
            loss = step(ids)
            sync()
            dt = time.perf_counter() - t0
        times.append(dt)
        extra = {}
        if gate and cmd == PROFILE:
            info["profiled_steps"].append(i)
            info["busy"] = extra["busy"] = prof.result()
        losses.append(float(loss.detach().float().item()))
        if gate:
            gate.step_done(i, dt, **extra)
    if gate is not None:
        info["gate_wait_s"] = round(gate.waited_s, 6)
        info["gate"] = gate
    return times, losses, info


if __name__ == "__main__":
    sys.exit(main())
