"""lora-harness: real LoRA training cells over precision x sequence length x gradient
checkpointing, measured, isolated and stored.

The parent side (spec, matrix, options, runner, store, sweep, result, tables) imports no
torch; the worker side (workload, models.build, checkpointing, trackers, env.collect)
does, and runs in the worker processes only.
"""

__version__ = "0.1.0"
