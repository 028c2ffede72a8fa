"""What to run: options, the matrix, the suites' cells, capability rules, OOM pruning, GPU
selection and budgets. Pure: no torch."""
