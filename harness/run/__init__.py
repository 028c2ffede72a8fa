"""Running cells from the parent process: the sweep, its progress, and the launchers (fork
server, torchrun, the GPU pool). Imports no torch."""
