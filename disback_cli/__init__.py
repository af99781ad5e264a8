"""disback: distill a diffusion teacher into a one-step generator with DisBack."""

__version__ = "0.1.0"
