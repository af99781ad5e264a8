"""Metrics: ground truth for vectors, digits and shapes, FID-style image metrics, the CLIP score,
detectors, image IO, the score-mismatch diagnostics, and the catalog and plots of runs."""

FID_MODES = ("legacy_tensorflow", "clean")  # clean-fid's names; EDM's reference files are legacy
