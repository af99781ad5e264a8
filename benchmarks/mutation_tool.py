"""Mechanical mutation testing with mutmut: every mutant mutmut makes of the modules where a
silent bug costs results or safety, each run against the tests that guard its module.

The hand-written list (`benchmarks/mutation.py`) holds bugs someone imagined; this one holds every
operator, constant, comparison and argument mutmut can change, so the tests are judged on bugs
nobody listed. Each module runs in its own copy of the checkout (`mutants/` of mutmut, never the
checkout itself), with mutmut's test selection set to the module's fast tests, and its result is
kept with the sha256 of the module's source: by default only modules whose source changed since
their result run again.

    python benchmarks/mutation_tool.py                     # modules changed since their result
    python benchmarks/mutation_tool.py --all               # every module below
    python benchmarks/mutation_tool.py --module method/noise --module models/precond
    python benchmarks/mutation_tool.py --report            # the stored results, rates as of now

Results: benchmarks/results/mutmut.json, one entry per module: killed (a test failed), timeout (a
test ran past mutmut's time bound: detected), survived (every test passed), untested (no selected
test reaches the function), the kill rate over the mutants not listed as equivalent in
`EQUIVALENT`, and each survivor with its diff. docs/testing.md has the reasons for the
equivalent ones. Not part of the timed suite; a module takes 2 to 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutmut.json"
BIN = Path(sys.executable).parent

# The modules of issue #27's list and the tests that guard each: fast ones, since mutmut runs
# the covering ones for every mutant (the slow end-to-end tests would take hours per module).
# Modules every run uses (file writes, the lifecycle) are guarded by their unit tests and few
# whole runs: with every run-based test, each surviving mutant costs minutes.
# A test that starts disback in a subprocess cannot guard a module that subprocess imports: the
# mutated copy runs only inside mutmut's own processes (mutmut then records nothing at all).
MODULES: dict[str, list[str]] = {
    "method/noise": ["test_noise_levels.py", "test_losses.py", "test_schedule.py"],
    "method/losses": ["test_loss_units.py", "test_losses.py", "test_pins.py", "test_dropout.py"],
    "method/dsm": ["test_dsm_units.py", "test_losses.py", "test_dropout.py"],
    "method/schedule": ["test_schedule_units.py", "test_schedule.py"],
    "method/ema": ["test_schedule_units.py", "test_ema.py"],
    "method/ratio": ["test_ratio_units.py", "test_pins.py", "test_hostile_readers.py"],
    "method/data": ["test_data_sources.py", "test_pins.py"],
    "method/fake_sides": [
        "test_fake_sides.py",
        "test_families.py",
        "test_text_to_image_pipeline.py::test_the_fake_score_starts_as_an_own_copy_of_node_n_on_lora_nodes",
    ],
    "models/precond": ["test_precond_units.py", "test_precond.py", "test_families.py"],
    "models/discrete_ddpm": ["test_ddpm_units.py", "test_pins.py"],
    "models/ratio": ["test_ratio_network.py", "test_fake_sides.py", "test_pins.py"],
    "evaluation/vectors": ["test_vector_units.py", "test_metrics.py", "test_datasets.py"],
    "evaluation/image_metrics": ["test_image_metric_units.py", "test_image_metrics.py"],
    "evaluation/shapes": ["test_shapes.py"],
    "evaluation/mismatch": ["test_mismatch.py"],
    "store/layout": ["test_layout_units.py", "test_file_kinds.py"],
    "store/fileio": ["test_fileio_units.py"],
    "store/archives": ["test_archive_units.py", "test_hostile_readers.py"],
    "store/statefile": ["test_statefile_units.py", "test_checkpoint.py"],
    "store/manifests": [
        "test_manifest_units.py",
        "test_manifest.py",
        "test_file_kinds.py",
        "test_hostile_inputs.py",
    ],
    "stages/lifecycle": ["test_lifecycle_units.py", "test_backtrack.py", "test_pins.py"],
    "config/resolve": ["test_resolve_units.py", "test_resolved_config.py"],
}

# mutmut's exit codes in its .meta files.
KILLED, SURVIVED, UNTESTED = 1, 0, 33
TIMEOUTS = {-24, -9, 36}  # CPU time limit, killed, mutmut's own timeout code

# Mutants no test can tell apart from the original, by name, with the reason (docs/testing.md).
CPU_ONLY = "device=None is the CPU here; on CUDA the draw would be on the wrong device"
CUDA_ONLY = "the CUDA generators' streams: this machine has no CUDA device (their keys are tested)"
ONE_PROCESS = (
    "differs only on ranks > 0 of a torchrun launch (rank 0 alone writes; one process gathers "
    "only its own streams); the distributed tests run in subprocesses, outside mutmut's reach"
)
SAME_LENGTHS = "zip(strict=...) over sequences whose lengths are equal by construction"
NORM_BROADCAST = "a (P,) norm broadcasts over the (d, P) directions just as a (1, P) one does"
EQUIVALENT: dict[str, str] = {
    "disback_cli.method.noise.x_sample_karras_index_sigma__mutmut_7": CPU_ONLY,
    "disback_cli.method.noise.x_sample_karras_index_sigma__mutmut_12": CPU_ONLY,
    "disback_cli.method.noise.x_sample_lognormal_sigma__mutmut_5": CPU_ONLY,
    "disback_cli.method.noise.x_sample_lognormal_sigma__mutmut_8": CPU_ONLY,
    "disback_cli.method.noise.xǁTrainingSigmaǁsample__mutmut_6": CPU_ONLY,
    "disback_cli.method.noise.xǁTrainingSigmaǁsample__mutmut_15": CPU_ONLY,
    "disback_cli.method.noise.xǁTrainingSigmaǁsample__mutmut_24": CPU_ONLY,
    "disback_cli.method.losses.x_generator_step__mutmut_3": CPU_ONLY,
    "disback_cli.method.losses.x_generator_step__mutmut_4": CPU_ONLY,
    "disback_cli.method.losses.x_generator_step__mutmut_23": CPU_ONLY,
    "disback_cli.method.losses.x_generator_step__mutmut_31": CPU_ONLY,
    "disback_cli.method.losses.x_generator_step__mutmut_34": CPU_ONLY,
    "disback_cli.method.losses.xǁDMDLossǁsample_sigma__mutmut_8": CPU_ONLY,
    "disback_cli.method.losses.xǁSiDLossǁsample_sigma__mutmut_5": CPU_ONLY,
    "disback_cli.method.losses.xǁSiDLossǁsample_sigma__mutmut_8": CPU_ONLY,
    "disback_cli.method.losses.xǁVSDLossǁsample_sigma__mutmut_5": CPU_ONLY,
    "disback_cli.method.ratio.x_ratio_step__mutmut_4": CPU_ONLY,
    "disback_cli.method.ratio.x_ratio_step__mutmut_17": CPU_ONLY,
    "disback_cli.method.ratio.x_ratio_step__mutmut_31": CPU_ONLY,
    "disback_cli.method.ratio.x_ratio_step__mutmut_39": CPU_ONLY,
    "disback_cli.method.ratio.x_ratio_step__mutmut_42": CPU_ONLY,
    "disback_cli.method.dsm.x_apply_gradients__mutmut_1": (
        "zero_grad's set_to_none=None is its default, True"
    ),
    "disback_cli.method.dsm.x_apply_gradients__mutmut_2": (
        "zero_grad(set_to_none=False) zeroes the gradients instead of freeing them: the same "
        "numbers, more memory"
    ),
    "disback_cli.method.dsm.x_denoising_step__mutmut_4": CPU_ONLY,
    "disback_cli.method.dsm.x_denoising_step__mutmut_18": CPU_ONLY,
    "disback_cli.method.dsm.x_denoising_step__mutmut_26": CPU_ONLY,
    "disback_cli.method.dsm.x_denoising_step__mutmut_29": CPU_ONLY,
    "disback_cli.method.dsm.x_generator_inputs__mutmut_8": CPU_ONLY,
    "disback_cli.method.dsm.x_generator_inputs__mutmut_11": CPU_ONLY,
    "disback_cli.method.dsm.x_generator_inputs__mutmut_16": CPU_ONLY,
    "disback_cli.method.noise.xǁTrainingSigmaǁof__mutmut_1": (
        "the table of a non-discrete kind is never read (and not compared)"
    ),
    "disback_cli.method.schedule.xǁAdaptiveScheduleǁ_reset__mutmut_5": (
        'float("INF") is float("inf")'
    ),
    "disback_cli.method.schedule.xǁFixedScheduleǁload_state_dict__mutmut_1": (
        "the fixed rule has no state: its source name is never used"
    ),
    "disback_cli.method.schedule.xǁFixedScheduleǁload_state_dict__mutmut_2": (
        "the fixed rule has no state: its source name is never used"
    ),
    "disback_cli.evaluation.vectors.x_mmd2_rbf__mutmut_11": SAME_LENGTHS,
    "disback_cli.evaluation.vectors.x_mmd2_rbf__mutmut_15": SAME_LENGTHS,
    "disback_cli.evaluation.vectors.x_mmd2_rbf__mutmut_43": SAME_LENGTHS,
    "disback_cli.evaluation.vectors.x_mmd2_rbf__mutmut_37": "same=None is falsy like False",
    "disback_cli.evaluation.vectors.x_mode_statistics__mutmut_7": (
        "integer counts give float32 ratios: the same statistics to 1e-7 (the float64 cast "
        "is for large sets)"
    ),
    "disback_cli.evaluation.vectors.x_sliced_wasserstein__mutmut_20": NORM_BROADCAST,
    "disback_cli.evaluation.vectors.x_sliced_wasserstein__mutmut_22": NORM_BROADCAST,
    **{f"disback_cli.method.data.x__image_files__mutmut_{n}": SAME_LENGTHS for n in (25, 28, 29)},
    **{f"disback_cli.method.data.x__labels__mutmut_{n}": SAME_LENGTHS for n in (19, 22, 23)},
    **{
        f"disback_cli.method.data.x__image_files__mutmut_{n}": (
            "the label of open_zip's own check: the zip passed the same check under the same "
            "label while it was hashed a moment before"
        )
        for n in (66, 69, 70)
    },
    "disback_cli.method.data.x__image_files__mutmut_130": (
        "the first image compared with its own size as well"
    ),
    **{
        f"disback_cli.method.data.x__builtin__mutmut_{n}": (
            "the ring's exact draws never read the count, the reader or the label width"
        )
        for n in (34, 35, 36, 43, 44, 45)
    },
    "disback_cli.method.data.x__builtin__mutmut_27": (
        "None classes read as 'no' classes, as 0 does: the same refusal"
    ),
    **{
        f"disback_cli.method.data.xǁDataSourceǁdraw__mutmut_{n}": CPU_ONLY
        for n in (6, 10, 14, 18, 21, 27, 31, 41, 43, 48)
    },
    "disback_cli.method.fake_sides.xǁRatioFakeǁ__init____mutmut_1": (
        "nothing reads the data before open_inputs sets it"
    ),
    "disback_cli.method.fake_sides.xǁRatioFakeǁbuild__mutmut_13": CPU_ONLY,
    **{
        f"disback_cli.store.statefile.x_load_state__mutmut_{n}": CUDA_ONLY
        for n in (76, *range(92, 108), *range(112, 116))
    },
    **{
        f"disback_cli.store.statefile.x_local_rng_state__mutmut_{n}": CUDA_ONLY
        for n in range(5, 11)
    },
    **{
        f"disback_cli.store.statefile.x_load_state__mutmut_{n}": (
            "any kind but 'cpu' names the CUDA stream's key, as 'cuda' does"
        )
        for n in (75, 79, 80)
    },
    "disback_cli.store.statefile.x__unpack_optimizer__mutmut_11": (
        "rpartition and partition split 'INDEX.FIELD' alike (field names have no dot; a name "
        "with more dots is refused either way)"
    ),
    "disback_cli.store.layout.x_foreign_entries__mutmut_14": (
        "owns_temporary(None, ...) reads the root folder as owns_temporary('', ...) does"
    ),
    "disback_cli.evaluation.image_metrics.x_feature_stats__mutmut_9": (
        "rowvar=None is falsy like rowvar=False"
    ),
    "disback_cli.evaluation.image_metrics.x__kth_neighbour_radius__mutmut_19": (
        "kthvalue's default dim (-1) is dim 1 of the 2-D distance matrix"
    ),
    **{
        f"disback_cli.evaluation.image_metrics.x_kernel_inception_distance__mutmut_{n}": (
            "replace=None is falsy like replace=False"
        )
        for n in (30, 38)
    },
    **{
        f"disback_cli.evaluation.image_metrics.x_frechet_distance__mutmut_{n}": (
            "one mean left in float32 meets the other in float64: their difference is taken in "
            "float64, where float32 values are exact"
        )
        for n in (4, 6, 9, 11)
    },
    "disback_cli.evaluation.image_metrics.x_precision_recall__mutmut_2": (
        "the chunk size bounds memory; every distance is the same"
    ),
    **{
        f"disback_cli.models.discrete_ddpm.xǁDiscreteDDPMPrecondǁ__init____mutmut_{n}": (
            "persistent=None is falsy like persistent=False: the table stays out of the state dict"
        )
        for n in (48, 58)
    },
    "disback_cli.models.discrete_ddpm.xǁDiscreteDDPMPrecondǁtimestep__mutmut_11": CPU_ONLY,
    "disback_cli.models.discrete_ddpm.xǁDiscreteDDPMPrecondǁtimestep__mutmut_13": (
        "below the table the unclamped index -1 interpolates from the last entry to the first "
        "with a weight clamped to 1: timestep 0, as clamped"
    ),
    "disback_cli.models.discrete_ddpm.xǁDiscreteDDPMPrecondǁtimestep__mutmut_19": (
        "at a table value > finds the step below with weight 1: the same timestep as >="
    ),
    **{
        f"disback_cli.models.discrete_ddpm.xǁDiscreteSigmaǁsample__mutmut_{n}": CPU_ONLY
        for n in (10, 15, 16)
    },
    **{
        f"disback_cli.models.precond.x_sigma_like__mutmut_{n}": (
            "expanding a per-sample sigma of the batch's size to the batch's size changes nothing"
        )
        for n in (19, 25)
    },
    **{f"disback_cli.models.precond.x_sigma_like__mutmut_{n}": CPU_ONLY for n in (4, 7)},
    **{f"disback_cli.models.precond.xǁPrecondǁforward__mutmut_{n}": CPU_ONLY for n in (13, 16)},
    **{
        f"disback_cli.models.precond.xǁPrecondǁforward__mutmut_{n}": (
            "the raw network's bf16 input, used on CUDA only: on the CPU it runs in float32 either "
            "way"
        )
        for n in (27, 28, 32, 33, 44)
    },
    **{f"disback_cli.models.ratio.x__fourier__mutmut_{n}": CPU_ONLY for n in (4, 8)},
    **{
        f"disback_cli.models.ratio.x__fourier__mutmut_{n}": (
            "integer or float frequencies 1..F/2 times a float32 log sigma: the same float32 angles"
        )
        for n in (5, 9, 12)
    },
    "disback_cli.models.ratio.x_build_ratio__mutmut_12": (
        "fork_rng(devices=None) forks every CUDA device's stream: none here, and the CPU "
        "stream is forked either way"
    ),
    "disback_cli.models.ratio.x_load_ratio__mutmut_49": CPU_ONLY,
    **{
        f"disback_cli.models.ratio.xǁRatioNetworkǁforward__mutmut_{n}": CPU_ONLY
        for n in (6, 9, 44, 47)
    },
    "disback_cli.models.ratio.xǁRatioNetworkǁforward__mutmut_14": (
        "expanding a per-sample sigma of the batch's size to the batch's size changes nothing"
    ),
    "disback_cli.store.fileio.x__umask__mutmut_3": (
        "the umask read back is the one set before, whatever is set meanwhile"
    ),
    **{
        f"disback_cli.store.fileio.x_{name}__mutmut_{n}": (
            "the block size of a hash bounds memory; the digest is the same"
        )
        for name in ("hash_regular_file", "sha256_file")
        for n in (13, 15, 16)
    },
    **{
        f"disback_cli.store.fileio.x_read_regular_file__mutmut_{n}": (
            "reading more of a file that grew during the read: refused all the same"
        )
        for n in (10, 12)
    },
    "disback_cli.stages.lifecycle.xǁRunǁstart_or_resume__mutmut_15": ONE_PROCESS,
    "disback_cli.stages.lifecycle.xǁRunǁsave__mutmut_9": ONE_PROCESS,
    **{f"disback_cli.stages.lifecycle.xǁRunǁsave__mutmut_{n}": ONE_PROCESS for n in (3, 20, 27)},
    "disback_cli.stages.lifecycle.xǁRunǁstart_or_resume__mutmut_28": (
        "whole=None is falsy like whole=False"
    ),
    "disback_cli.evaluation.shapes.x_nearest_mode__mutmut_1": (
        "the chunk size bounds memory; the nearest variant of each image is the same"
    ),
    "disback_cli.evaluation.shapes.x_shapes_scores__mutmut_52": CPU_ONLY,
    **{f"disback_cli.method.dsm.x_denoising_step__mutmut_{n}": CPU_ONLY for n in (45, 48)},
    "disback_cli.method.dsm.x_denoising_step__mutmut_34": (
        "a source without a dropout drops nothing whether the default is 0.0 or None (both falsy)"
    ),
    "disback_cli.method.dsm.x_denoising_step__mutmut_49": (
        "a uniform draw equals the share exactly with probability 2^-24 at most: < and <= drop "
        "the same rows"
    ),
    "disback_cli.evaluation.shapes.x__coverage__mutmut_52": (
        "an (N, 1, 1) index expands to (1, N, H, W) as the (1, N, 1, 1) one does"
    ),
    **{
        f"disback_cli.evaluation.shapes.x_render__mutmut_{n}": (
            "broadcast against the (N, 1, 1) centres, a (64, 1) or (1, 64) grid gives the same "
            "(N, 64, 1) and (N, 1, 64) offsets"
        )
        for n in (39, 58, 59)
    },
    "disback_cli.evaluation.shapes.x_render__mutmut_7": (
        "a (2,) zero offset broadcasts over the batch as (N, 2) zeros do"
    ),
    **{
        f"disback_cli.evaluation.shapes.x_render__mutmut_{n}": (
            "arange's integers plus 0.5 are the same float32 grid"
        )
        for n in (27, 29)
    },
    "disback_cli.evaluation.shapes.x__coverage__mutmut_12": (
        "a sample exactly on the circle needs dy^2 + dx^2 == r^2 in float32: impossible on the "
        "lattice of odd eighths at the radii it can meet exactly (a sum of two odd squares is "
        "2 mod 8), and of probability zero at jittered ones"
    ),
    "disback_cli.evaluation.shapes.x__coverage__mutmut_19": (
        "the apex row dy = -r has zero width: only a sample at ax = 0 would lie in it, and none "
        "does (odd eighths from the centre, or a continuous jitter)"
    ),
}


def source_digest(module: str, root: Path = ROOT) -> str:
    return hashlib.sha256((root / "disback_cli" / f"{module}.py").read_bytes()).hexdigest()


def checkout_copy(where: Path) -> None:
    """The working tree's tracked and new files (what the suite would test), into `where`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, where / name)


def current_guards(module: str) -> list[str]:
    """The module's guard tests as this script lists them now: a batch takes hours, and tests
    written meanwhile count from the next module on."""
    return runpy.run_path(str(Path(__file__).resolve()))["MODULES"][module]


def configure(where: Path, module: str, tests: list[str]) -> None:
    tests = [f"tests/{name}" for name in tests]
    settings = {
        "source_paths": ["disback_cli"],
        "only_mutate": [f"disback_cli/{module}.py"],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-q", "-p", "no:cacheprovider", "-x"],
        # CPU seconds a mutant may use: (its tests' time + 5) x 15 x 2; a mutant that loops forever
        # costs that much (at 60, half an hour each)
        "timeout_constant": 5.0,
        # torch is not fork-safe once its thread pools run: fork workers from a clean server
        "process_isolation": "forkserver",
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    with open(where / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def run_module(module: str) -> dict | None:
    """The module's result, or None (said on stderr) when mutmut could not test it at all."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="disback-mutmut-") as folder:
        where = Path(folder)
        checkout_copy(where)
        measured = source_digest(module, where)  # the checkout may change while mutmut runs
        guards = current_guards(module)
        configure(where, module, guards)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [str(BIN / "mutmut"), "run", "--max-children", "2"],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
        )
        meta = where / "mutants" / "disback_cli" / f"{module}.py.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        if all(code is None for code in codes.values()):  # e.g. its clean run of the tests failed
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            print(f"{module}: mutmut tested nothing ({last[0][-200:]})", file=sys.stderr)
            return None
        survivors = [key for key, code in codes.items() if code in (SURVIVED, UNTESTED)]
        diffs = {key: show(where, key) for key in survivors}
    return {
        "source_sha256": measured,
        "tests": guards,
        "exit_codes": codes,
        "survivors": diffs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def summary(result: dict) -> dict:
    """Counts and the kill rate of a module's result, with `EQUIVALENT` as it is now."""
    codes = result["exit_codes"]
    counted = {k: c for k, c in codes.items() if k not in EQUIVALENT}
    detected = sum(c == KILLED or c in TIMEOUTS for c in counted.values())
    return {
        "mutants": len(codes),
        "killed": sum(c == KILLED for c in counted.values()),  # the columns add up to mutants
        "timeout": sum(c in TIMEOUTS for c in counted.values()),
        "survived": sum(c == SURVIVED and k not in EQUIVALENT for k, c in codes.items()),
        "untested": sum(c == UNTESTED and k not in EQUIVALENT for k, c in codes.items()),
        "equivalent": sum(k in EQUIVALENT for k in codes),
        "kill_rate": detected / len(counted) if counted else None,
    }


def report(module: str, result: dict) -> None:
    counts = summary(result)
    rate = "-" if counts["kill_rate"] is None else f"{counts['kill_rate']:.1%}"
    print(
        f"{module:26s} {counts['mutants']:4d} mutants  killed {counts['killed']:3d}  timeout "
        f"{counts['timeout']:3d}  survived {counts['survived']:3d}  untested "
        f"{counts['untested']:3d}  equivalent {counts['equivalent']:3d}  kill rate {rate}",
        flush=True,
    )


def markdown_row(module: str, result: dict) -> str:
    counts = summary(result)
    rate = "-" if counts["kill_rate"] is None else f"{counts['kill_rate']:.1%}"
    stale = "" if result["source_sha256"] == source_digest(module) else " (source changed since)"
    cells = [counts[k] for k in ("mutants", "killed", "timeout", "survived", "untested")]
    return (
        f"| `{module}`{stale} | "
        + " | ".join(map(str, cells))
        + (f" | {counts['equivalent']} | {rate} |")
    )


def show(where: Path, key: str) -> str:
    done = subprocess.run(
        [str(BIN / "mutmut"), "show", key], cwd=where, capture_output=True, text=True
    )
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every module, changed or not")
    parser.add_argument("--module", action="append", choices=sorted(MODULES), default=[])
    parser.add_argument("--report", action="store_true", help="print the stored results only")
    parser.add_argument("--markdown", action="store_true", help="the results as docs' table")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.markdown:
        print(
            "| module | mutants | killed | timeout | survived | untested | equivalent | kill rate |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for module in sorted(results):
            print(markdown_row(module, results[module]))
        return
    if args.report:
        for module, result in results.items():
            if "exit_codes" in result:
                report(module, result)
        return
    if args.module:
        todo = args.module
    elif args.all:
        todo = list(MODULES)
    else:  # incremental: what changed since its result
        todo = [m for m in MODULES if results.get(m, {}).get("source_sha256") != source_digest(m)]
    for module in todo:
        result = run_module(module)
        if result is None:
            continue
        # Read again after the run (minutes): another run may have stored its modules meanwhile.
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[module] = result
        partial = RESULTS.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        partial.replace(RESULTS)
        report(module, result)
    if not todo:
        print("every module's result is up to date (--all runs them again)")


if __name__ == "__main__":
    main()
