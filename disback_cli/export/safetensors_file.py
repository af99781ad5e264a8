"""`--format safetensors`: the generator as one disback denoiser file.

The file is self-describing: its metadata holds the network (architecture, constructor
arguments, preconditioning, data shape, classes) and the generator's provenance (sigma_init and
input scale of G(z) = D(input_scale z, sigma_init), the teacher's sha256, what a text-to-image
generator decodes with), so `disback sample --generator FILE` and the loader in the README read
it without the run directory.
"""

from __future__ import annotations

from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError
from disback_cli.export import DTYPES, ExportSource, Usage
from disback_cli.models.denoiser_files import denoiser_file_chunks
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.export_folder import ExportFolder

FILE = "generator.safetensors"


class SafetensorsExport:
    description = "one safetensors file, the network description in its metadata"

    def __init__(self, sample_flags: str = "") -> None:
        self.sample_flags = sample_flags  # what `disback sample` needs besides the file

    def check(self, cfg: ExportConfig, source: ExportSource) -> None:
        if cfg.pipeline:
            raise ConfigError("--pipeline is for --format diffusers; safetensors is one file")

    def write(
        self, cfg: ExportConfig, source: ExportSource, folder: ExportFolder, reporter: Reporter
    ) -> Usage:
        info = {k: v for k, v in source.info.items() if k not in ("file", "sha256")}
        info["exported_from"] = source.info["sha256"]
        chunks = denoiser_file_chunks(
            source.generator.denoiser, source.spec, info, DTYPES[cfg.dtype]
        )
        sha = folder.write_chunks(FILE, *chunks)
        flags = self.sample_flags or (" --class 0" if source.spec.label_dim else "")
        return Usage(
            snippet=f"disback sample --generator {FILE} -n 64{flags} --out samples",
            facts={"file": FILE, "sha256": sha, "dtype": cfg.dtype},
        )
