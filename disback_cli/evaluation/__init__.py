"""Metrics: ground truth for vectors and digits, FID-style image metrics, detectors, image IO,
plots."""
