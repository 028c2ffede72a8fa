"""Will it fit: VRAM budgets, the longest-context search, the memory model and the seed's
claims. Parent side (no torch)."""
