"""The method itself: generator losses, the fake sides (score network, density-ratio network),
denoising score matching, noise levels, target schedules, EMA and the one-step generator G0."""
