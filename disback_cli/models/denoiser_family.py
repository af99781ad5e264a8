"""The family of teachers stored as one network file: built-in teachers, disback denoiser files
(.safetensors) and NVIDIA EDM pickles, conditioned on class labels or nothing."""

from __future__ import annotations

from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.models.conditioning import condition_source
from disback_cli.models.denoiser_files import build_with_weights, load_denoiser
from disback_cli.models.edm_pickle import read_edm_pickle
from disback_cli.models.family import EDM_DEFAULT_SIGMA, Teacher, TeacherFamily
from disback_cli.store.fileio import hash_regular_file
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES

MAX_TEACHER_BYTES = MAX_SAFETENSORS_BYTES  # EDM pickles are smaller than their safetensors


class DenoiserFileFamily(TeacherFamily):
    """Every file no other family claims; the behaviour is `TeacherFamily`'s own."""

    description = "denoiser files (builtin:NAME, .safetensors, EDM .pkl)"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return True

    @classmethod
    def claims_generator(cls, info: dict) -> bool:
        return True

    @classmethod
    def open(cls, source, path, device, expected_sha256, recorded_in) -> Teacher:
        """EDM pickles are read with a restricted unpickler (no code from the file runs) into our
        own network implementation, loaded strictly; a named teacher is hashed before parsing."""
        if expected_sha256 is not None:
            digest = hash_regular_file(path, MAX_TEACHER_BYTES, "teacher")
            if digest != expected_sha256:
                raise DisbackError(
                    f"teacher {source} is not the one {recorded_in} was recorded with "
                    "(sha256 differs)"
                )
        if path.suffix == ".pkl":
            edm = read_edm_pickle(path)
            denoiser = build_with_weights(edm.spec, edm.state_dict, str(path))
            edm_info = {
                "class_name": edm.class_name,
                "model_type": edm.model_type,
                "module_src_sha256": edm.module_src_sha256,
            }
            denoiser = denoiser.to(device).eval().requires_grad_(False)
            return Teacher(
                denoiser=denoiser,
                spec=edm.spec,
                source=source,
                sha256=edm.sha256,
                dataset=None,
                train_sigma=EDM_DEFAULT_SIGMA,
                info={"role": "teacher", "edm": edm_info},
                family=cls(),
                conditions=condition_source(edm.spec.label_dim),
            )
        loaded = load_denoiser(path, device)
        return Teacher(
            denoiser=loaded.denoiser,
            spec=loaded.spec,
            source=source,
            sha256=loaded.sha256,
            dataset=loaded.info.get("dataset"),
            train_sigma=loaded.info.get("train_sigma") or EDM_DEFAULT_SIGMA,
            info=loaded.info,
            family=cls(),
            conditions=condition_source(loaded.spec.label_dim),
        )
