"""How a run executes: devices, torchrun data parallelism, stop signals, progress reports and
experiment trackers."""
