"""How a run executes: devices, torchrun data parallelism, stop signals, progress reports and the
doctor's self-check."""
