"""Denoisers: networks, EDM preconditioning, conditioning, teachers and denoiser files."""
