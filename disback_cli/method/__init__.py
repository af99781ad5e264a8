"""The method itself: generator losses, denoising score matching, noise levels, target
schedules, EMA and the one-step generator G0."""
