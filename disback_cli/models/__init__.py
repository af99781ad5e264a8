"""Denoisers: networks, preconditioning, conditioning, denoiser files, and the teacher families.

Importing the package registers the teacher families disback ships (`teachers`), so that every
network a file may name (e.g. a diffusers UNet) is known before a file naming it is read.
"""

from disback_cli.models import teachers as _families  # noqa: F401  (registers the families)
