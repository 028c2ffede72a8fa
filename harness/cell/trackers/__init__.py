"""Measurement trackers wrapped around a cell's training steps (worker side)."""
