"""The worker side: what runs inside a cell's own process (model build and load, the
training loop, precision and checkpointing proofs, trackers). The only package that
imports torch; nothing outside it imports it, except by name as a job target."""
