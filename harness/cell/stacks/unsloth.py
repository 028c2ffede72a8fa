"""The unsloth stack: Unsloth's loader and LoRA (unsloth 2026.10.9 on its GPU path).

``FastLanguageModel.from_pretrained`` reads the synthetic checkpoint folder (with a
tokenizer written beside the weights: its loader always loads one) with the cell's
precision (``load_in_4bit`` for nf4-dq: Unsloth's 4-bit is NF4 with double quantisation;
``load_in_8bit`` for int8; neither for 16-bit), then ``FastLanguageModel.get_peft_model``
adds LoRA with its fused kernels and its checkpointing: gc off / on / offload are
``use_gradient_checkpointing`` False / True / "unsloth" (its offload to host memory).

Proof (a failure is an error record): the layer census every cell gets (a silent 4-bit
load when 16-bit was asked fails it), ``unsloth.DEVICE_TYPE == "cuda"``, its patched
forwards on the architecture's classes and every module on its fast path, the fused LoRA
kernels on every layer, its attention dispatch's choice, and for gc-offload its own
checkpoint function in place. The harness's layer-recompute counters still run (Unsloth
calls the layers' attention and MLP modules, so their hooks fire in the recomputation);
the offloaded bytes of its offload mode are Unsloth's own and are not counted.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from harness.cell.stacks import hf
from harness.cell.stacks.base import Build, StackProofError, StackUnavailable
from harness.core.axes import STACK_BY_NAME, get_mode

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GC_ARG = {"off": False, "on": True, "offload": "unsloth"}
MODELING = {"llama": ("transformers.models.llama.modeling_llama", "Llama"),
            "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
            "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral")}


def load(b: Build):
    """(model, load info) from Unsloth's loader on the checkpoint folder."""
    import torch
    from unsloth import FastLanguageModel

    spec = b.spec
    if spec.precision not in (STACK_BY_NAME["unsloth"].precisions or ()):
        raise StackUnavailable(f"Unsloth's loader offers {', '.join(STACK_BY_NAME['unsloth'].precisions)}, "
                               f"not {spec.precision}")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"load_path": "pretrained"}
    folder = _checkpoint(b, info)
    mode = get_mode(spec.precision)
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(folder), max_seq_length=spec.seq_len, dtype=getattr(torch, mode.weight_dtype or b.compute),
        load_in_4bit=spec.precision == "nf4-dq", load_in_8bit=spec.precision == "int8", full_finetuning=False,
        local_files_only=True, use_gradient_checkpointing=GC_ARG[spec.grad_ckpt], random_state=spec.seed)
    info.update(checkpoint=str(folder), load_time_s=time.perf_counter() - t0,
                loaded_in_training_mode=bool(model.training))
    return model, info


def _checkpoint(b: Build, info: dict[str, Any]) -> Path:
    if b.spec.model_path:
        folder = Path(b.spec.model_path)
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise StackUnavailable(f"Unsloth's loader needs a tokenizer in {folder}; it has none")
        return folder
    from harness.cell.build import ensure_checkpoint

    t1 = time.perf_counter()
    folder = ensure_checkpoint(b.preset, device=str(b.device), cache_dir=b.opts.get("cache_dir"), log=b.log)
    write_tokenizer(folder, int(b.preset["config"]["vocab_size"]))
    info["checkpoint_prepare_s"] = time.perf_counter() - t1
    return folder


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer of the model's vocabulary size with a pad token, written
    once beside the synthetic weights (without a pad token Unsloth adds one and resizes
    the embeddings). Other workers wait on the lock, then find it written."""
    if (folder / "tokenizer.json").is_file():
        return
    with open(folder.parent / f".{folder.name}.tokenizer.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (folder / "tokenizer.json").is_file():
            return
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = {f"t{i}": i for i in range(vocab - 3)}
        words.update({"<s>": vocab - 3, "</s>": vocab - 2, "<pad>": vocab - 1})
        tok = Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tmp = folder.parent / f".{folder.name}.tokenizer-{os.getpid()}"
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="t0").save_pretrained(str(tmp))
        # tokenizer.json last: its presence is what says the tokenizer is complete
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):
            os.replace(f, folder / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


def wrap(b: Build, model):
    """Unsloth's get_peft_model (its LoRA kernels and checkpointing), then the harness's
    layer counters on the result (no checkpointing of the harness's own)."""
    from unsloth import FastLanguageModel

    from harness.cell import checkpointing

    spec = b.spec
    targets = PROJECTIONS if spec.lora.target_modules == "all-linear" else hf.lora_target(spec.lora.target_modules)
    model = FastLanguageModel.get_peft_model(
        model, r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout, target_modules=targets,
        bias="none", use_gradient_checkpointing=GC_ARG[spec.grad_ckpt], random_state=spec.seed)
    hf.input_cast(model, spec.lora.input_cast, b.out)
    model.train()
    evidence = checkpointing.Evidence(model)
    if spec.grad_ckpt == "offload":
        # its own offload: checkpointing.verify leaves the offloaded counts to the stack proof
        evidence.offload_variant = evidence.proof = "unsloth"
    return model, evidence


def census(model) -> dict[str, Any]:
    """What shows Unsloth's GPU path in ``model`` (a PeftModel from get_peft_model)."""
    import torch.utils.checkpoint as torch_ckpt
    import transformers.modeling_utils as modeling_utils
    import unsloth
    from unsloth.utils import attention_dispatch

    base = model.get_base_model()
    kind = getattr(base.config, "model_type", None)
    module, prefix = MODELING.get(kind, (None, None))
    classes = importlib.import_module(module) if module else None
    patched = {f"{prefix}{c}": getattr(getattr(getattr(classes, f"{prefix}{c}", None), "forward", None), "__name__", None)
               for c in ("Attention", "DecoderLayer", "Model", "ForCausalLM")} if classes else {}
    # the patched classes' gated forwards run Unsloth's code only on modules so marked
    mods = [m for m in base.modules() if type(m).__name__ in patched]
    layers = list(base.model.layers)

    def fn_name(obj) -> str | None:
        obj = getattr(obj, "func", obj)  # a functools.partial of the checkpoint function
        return getattr(getattr(obj, "__func__", obj), "__name__", None)

    return {"proof": "unsloth", "device_type": str(getattr(unsloth, "DEVICE_TYPE", None)), "patched_forwards": patched,
            "fast_path_modules": sum(getattr(m, "_unsloth_fast_path", False) is True for m in mods), "modules": len(mods),
            "fused_lora": {"qkv": sum(fn_name(getattr(l.self_attn, "apply_qkv", None)) == "apply_lora_qkv" for l in layers),
                           "o": sum(fn_name(getattr(l.self_attn, "apply_o", None)) == "apply_lora_o" for l in layers),
                           "mlp": sum(fn_name(l.mlp.forward) == "apply_lora_mlp_swiglu" for l in layers),
                           "layers": len(layers)},
            "checkpoint_function": torch_ckpt.CheckpointFunction.__name__,
            "transformers_checkpoint": fn_name(getattr(modeling_utils, "checkpoint", None)),
            "layer_checkpoint_functions": sorted({str(fn_name(getattr(l, "_gradient_checkpointing_func", None)))
                                                  for l in layers}),
            "attention_backend": str(attention_dispatch.select_attention_backend()),
            "has_flash_attention": bool(getattr(attention_dispatch, "HAS_FLASH_ATTENTION", False)),
            "has_xformers": bool(getattr(attention_dispatch, "HAS_XFORMERS", False))}


def problems(proof: dict[str, Any], grad_ckpt: str, fused_expected: bool, attn: str) -> list[str]:
    out = []
    if proof["device_type"] != "cuda":
        out.append(f"unsloth.DEVICE_TYPE is {proof['device_type']}: its GPU path (and every patch) is not in effect")
    slow = {c: f for c, f in proof["patched_forwards"].items() if not str(f).endswith("fast_forward")}
    if not proof["patched_forwards"] or slow:
        out.append(f"forwards not Unsloth's: {slow or 'architecture not patched'}")
    if proof["fast_path_modules"] != proof["modules"]:
        out.append(f"{proof['fast_path_modules']} of {proof['modules']} modules on Unsloth's fast path")
    fused = proof["fused_lora"]
    if fused_expected and min(fused["qkv"], fused["o"], fused["mlp"]) < fused["layers"]:
        out.append(f"fused LoRA kernels on {fused['qkv']} q/k/v, {fused['o']} o and {fused['mlp']} MLP of "
                   f"{fused['layers']} layers")
    offloading = proof["checkpoint_function"] == "UnslothCheckpointFunction" \
        and proof["transformers_checkpoint"] == "unsloth_checkpoint"
    if grad_ckpt == "offload" and not offloading:
        out.append(f"Unsloth's offloaded checkpointing is not in effect (CheckpointFunction "
                   f"{proof['checkpoint_function']}, transformers' checkpoint {proof['transformers_checkpoint']})")
    if grad_ckpt == "on" and proof["checkpoint_function"] == "UnslothCheckpointFunction":
        out.append("Unsloth's offloaded checkpointing is in effect, but plain checkpointing was asked for")
    if proof["attention_backend"] != attn:
        out.append(f"Unsloth's attention dispatch chose {proof['attention_backend']}, not {attn}")
    return out


def prove(b: Build, model) -> dict[str, Any]:
    proof = census(model)
    proof["gc_asked"] = str(GC_ARG[b.spec.grad_ckpt])
    lora = b.spec.lora
    # its fused kernels need no dropout, no bias and every projection adapted
    fused = lora.dropout == 0 and lora.target_modules == "all-linear"
    found = problems(proof, b.spec.grad_ckpt, fused, b.spec.attn_implementation)
    if found:
        raise StackProofError("Unsloth proof failed: " + "; ".join(found))
    return proof


def check_step(proof: dict[str, Any] | None, first: dict[str, str]) -> list[str]:
    return []  # its fused loss returns an EmptyLogits sentinel (recorded, not required)
