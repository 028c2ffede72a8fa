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
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from harness.cell.data import make_batches  # tokens only (numpy), so both loops see the same batches

    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    t_imported = time.perf_counter()
    if a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available()):
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", 0)
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
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    n = a.warmup_steps + a.steps
    batches = [torch.from_numpy(x) for x in make_batches(config.vocab_size, a.seq_len, a.batch_size, n, a.seed)]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_loop = time.perf_counter()
    times, losses = [], []
    for i in range(n):
        ids = batches[i].to(dev, non_blocking=True)
        sync()
        t0 = time.perf_counter()
        if amp is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.autocast(dev.type, dtype=amp):
                loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float().item()))
    t_end = time.perf_counter()
    measured = times[a.warmup_steps:]
    med = statistics.median(measured)
    cuda = dev.type == "cuda"
    result = {
        "kind": "bare", "model": a.model, "precision": a.precision, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "grad_ckpt": a.grad_ckpt, "warmup_steps": a.warmup_steps, "steps": a.steps, "seed": a.seed,
        "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "step_time_s": med, "tokens_per_s": a.seq_len * a.batch_size / med,
        "step_times_s": measured, "warmup_step_times_s": times[:a.warmup_steps], "losses": losses,
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
        "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(dev)) if cuda else None,
        "imports_s": t_imported - t_start, "setup_s": t_loop - t_imported, "loop_s": t_end - t_loop,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
