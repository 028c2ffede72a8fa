"""Training stacks in the cell (worker side): which code loads the model and adds LoRA,
and the proof that the stack asked for is the one that trained.

- ``hf`` (``harness.cell.stacks.hf``): transformers + peft as they come;
- ``liger`` (``.liger``): the same model with Liger's kernels applied before LoRA;
- ``unsloth`` (``.unsloth``): Unsloth's ``FastLanguageModel`` loader and ``get_peft_model``.

Each module offers ``load(build) -> (model, info)``, ``wrap(build, model) -> (model,
evidence)``, ``prove(build, model) -> stack_proof or None`` (raises StackProofError) and
``check_step(proof, first_step_output) -> problems``; ``harness.cell.setup.prepare``
picks one by ``spec.stack``. What they share (errors, the cell environment, the import
of a stack's package) is in ``harness.cell.stacks.base``.
"""

from __future__ import annotations

from harness.cell.stacks.base import (Build, StackProofError, StackUnavailable, cell_environment,  # noqa: F401
                                      describe_output, import_stack, versions)


def get(name: str):
    """The module of stack ``name``."""
    if name == "liger":
        from harness.cell.stacks import liger

        return liger
    if name == "unsloth":
        from harness.cell.stacks import unsloth

        return unsloth
    from harness.cell.stacks import hf

    return hf
