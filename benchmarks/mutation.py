"""Mutation testing of the numerical and safety-critical modules: does the suite catch real bugs?

Each mutant below is one realistic single-line bug (a wrong constant, a swapped term, a check
dropped). For each, a copy of the checkout gets that one change and the test files of its module
run (`pytest -x`): a failing test kills the mutant; a mutant that passes every test survives.
Mutants that cannot change any observable result in a test (for example a dropped fsync, which
only matters on power loss) are listed with the reason and left out of the kill rate.

The checkout itself is never modified. Not part of the timed suite (about 30 minutes on 2 CPU
cores):

    make mutation                                     # all mutants, results in benchmarks/results
    python benchmarks/mutation.py --only ema          # the mutants whose name contains "ema"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str  # module:short-description
    before: str  # exact text in the module (must occur once)
    after: str
    equivalent: str = ""  # why no test can tell it apart (then it does not count)

    @property
    def module(self) -> str:
        return self.name.split(":")[0]


# The test files that guard each module.
TESTS = {
    "method/losses": ["test_losses.py", "test_dropout.py", "test_backtrack.py", "test_record.py"],
    "method/dsm": ["test_losses.py", "test_dropout.py", "test_backtrack.py", "test_record.py"],
    "method/noise": ["test_losses.py", "test_backtrack.py", "test_record.py"],
    "models/precond": ["test_precond.py", "test_edm.py"],
    "method/ema": ["test_ema.py", "test_backtrack.py"],
    "method/sampling": ["test_sample.py", "test_teacher.py"],
    "evaluation/image_metrics": ["test_image_metrics.py", "test_fid.py"],
    "evaluation/vectors": ["test_metrics.py"],
    "method/schedule": ["test_schedule.py", "test_backtrack.py"],
    "runtime/parallel": ["test_compute.py", "test_distributed.py"],
    "method/adversarial": ["test_adversarial.py"],
    "store/export_folder": ["test_export.py"],
    "stages/evaluation_record": ["test_export.py"],
    "stages/lifecycle": ["test_adversarial.py", "test_lifecycle_units.py"],
    "store/statefile": [
        "test_backtrack.py",
        "test_record.py",
        "test_recovery.py",
        "test_kill_resume.py",
        "test_hostile_inputs.py",
        "test_dropout.py",
    ],
    "store/fileio": ["test_recovery.py", "test_rundir.py", "test_hostile_inputs.py"],
    "models/edm_pickle": ["test_unpickler.py", "test_edm.py", "test_hostile_inputs.py"],
    "models/edm_unpickler": ["test_unpickler.py", "test_edm.py", "test_hostile_inputs.py"],
}

M = Mutant
MUTANTS = [
    # --- losses: noise levels, EDM weighting, the three generator losses -------------------
    M(
        "method/noise:lognormal-mean-std-swapped",
        "* p_std + p_mean).exp()",
        "* p_mean + p_std).exp()",
    ),
    M(
        "method/noise:karras-reversed",
        "return (lo + t * (hi - lo)) ** rho",
        "return (hi + t * (lo - hi)) ** rho",
    ),
    M(
        "method/noise:karras-index-denominator",
        "index.float() / (KARRAS_LEVELS - 1)",
        "index.float() / KARRAS_LEVELS",
    ),
    M(
        "method/dsm:edm-weight-one",
        "return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2",
        "return torch.ones_like(sigma)",
    ),
    M(
        "method/dsm:edm-weight-unsquared",
        "return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2",
        "return (sigma**2 + sigma_data**2) / (sigma * sigma_data)",
    ),
    M(
        "method/dsm:dsm-unnoised",
        "denoiser(x0 + sigma * noise, sigma, **cond)",
        "denoiser(x0 + noise, sigma, **cond)",
    ),
    M(
        "method/dsm:fake-samples-with-dropout",
        "with torch.no_grad(), eval_mode(generator):",
        "with torch.no_grad():",
    ),
    M(
        "method/losses:vsd-sign",
        "gap = fake(x_t, sigma, **cond) - target(x_t, sigma, **cond)",
        "gap = target(x_t, sigma, **cond) - fake(x_t, sigma, **cond)",
    ),
    M(
        "method/losses:vsd-batch-sum",
        "return GeneratorLossOutput(per_sample.mean(), gap.abs().mean())",
        "return GeneratorLossOutput(per_sample.sum(), gap.abs().mean())",
    ),
    M(
        "method/losses:dmd-scale-signed",
        "scale = (x - d_target).abs().flatten(1).mean(dim=1)",
        "scale = (x - d_target).flatten(1).mean(dim=1).abs()",
    ),
    M(
        "method/losses:dmd-scale-multiplied",
        "direction = gap / sigma_like(scale, x)",
        "direction = gap * sigma_like(scale, x)",
    ),
    M(
        "method/losses:dmd-half-dropped",
        "loss = 0.5 * ((x - (x - direction).detach()) ** 2).mean()",
        "loss = ((x - (x - direction).detach()) ** 2).mean()",
    ),
    M(
        "method/losses:dmd-sum-per-sample",
        "loss = 0.5 * ((x - (x - direction).detach()) ** 2).mean()",
        "loss = 0.5 * ((x - (x - direction).detach()) ** 2).flatten(1).sum(dim=1).mean()",
    ),
    M(
        "method/losses:dmd-all-indices",
        "low, high = round(self.low * KARRAS_LEVELS), round(self.high * KARRAS_LEVELS)",
        "low, high = 0, KARRAS_LEVELS",
    ),
    M(
        "method/losses:sid-alpha-sign",
        "((d_target - x) - self.alpha * diff)",
        "((d_target - x) + self.alpha * diff)",
    ),
    M(
        "method/losses:sid-scale-not-detached",
        "scale = (x - d_target).detach().abs()",
        "scale = (x - d_target).abs()",
    ),
    M(
        "method/losses:sid-t-max-dropped",
        "torch.rand(n, generator=rng, device=device) * self.t_max",
        "torch.rand(n, generator=rng, device=device)",
    ),
    M(
        "method/losses:sid-fake-weights-trained",
        "p.requires_grad_(False)",
        "p.requires_grad_(True)",
    ),
    M(
        "method/losses:dmd-trains-lognormal",
        '"dmd": "karras",',
        '"dmd": "lognormal",',
    ),
    M(
        "method/dsm:clip-ignored",
        "torch.nn.utils.clip_grads_with_norm_(params, clip, norm)",
        "pass",
    ),
    # --- preconditioning: Karras et al. 2022, Table 1 --------------------------------------
    M(
        "models/precond:edm-c-skip",
        "c_skip = sd**2 / (sigma**2 + sd**2)",
        "c_skip = sd / (sigma**2 + sd**2)",
    ),
    M(
        "models/precond:edm-c-out",
        "c_out = sigma * sd / (sigma**2 + sd**2).sqrt()",
        "c_out = sigma / (sigma**2 + sd**2).sqrt()",
    ),
    M(
        "models/precond:edm-c-in",
        "c_in = 1 / (sd**2 + sigma**2).sqrt()",
        "c_in = 1 / (sd**2 + sigma**2)",
    ),
    M("models/precond:edm-c-noise", "sigma.log() / 4", "sigma.log() / 2"),
    M(
        "models/precond:vp-c-noise-M",
        "(self.M - 1) * self.sigma_inv(sigma)",
        "self.M * self.sigma_inv(sigma)",
    ),
    M("models/precond:vp-c-out-sign", "return 1, -sigma, c_in,", "return 1, sigma, c_in,"),
    M(
        "models/precond:vp-sigma-half",
        "(0.5 * self.beta_d * t**2 + self.beta_min * t).exp()",
        "(self.beta_d * t**2 + self.beta_min * t).exp()",
    ),
    M(
        "models/precond:vp-sigma-inv",
        "2 * self.beta_d * (1 + sigma**2).log()",
        "2 * self.beta_d * (1 + sigma).log()",
    ),
    M("models/precond:ve-c-noise", "(0.5 * sigma).log()", "sigma.log()"),
    M(
        "models/precond:c-in-skipped",
        "x_in, labels = (c_in * x).to(dtype), c_noise.flatten()",
        "x_in, labels = x.to(dtype), c_noise.flatten()",
    ),
    # --- EMA ----------------------------------------------------------------------------------
    M(
        "method/ema:beta-swapped",
        "torch._foreach_lerp_(ema_params, params, 1 - beta)",
        "torch._foreach_lerp_(ema_params, params, beta)",
    ),
    M(
        "method/ema:rampup-max",
        "halflife = min(halflife, images_seen * rampup)",
        "halflife = max(halflife, images_seen * rampup)",
    ),
    M(
        "method/ema:exponent-inverted",
        "return 0.5 ** (batch / max(halflife, 1e-8))",
        "return 0.5 ** (max(halflife, 1e-8) / batch)",
    ),
    M("method/ema:kimg-1024", "halflife = halflife_kimg * 1000", "halflife = halflife_kimg * 1024"),
    # --- Heun sampler (Karras et al. 2022, Algorithm 1) ---------------------------------------
    M(
        "method/sampling:schedule-off-by-one",
        "+ step / (num_steps - 1) * (sigma_min",
        "+ step / num_steps * (sigma_min",
    ),
    M("method/sampling:last-correction", "if i < num_steps - 1:", "if i < num_steps - 2:"),
    M("method/sampling:heun-average", "(0.5 * d_cur + 0.5 * d_prime)", "d_prime"),
    M(
        "method/sampling:latents-unscaled",
        "x_next = latents.to(torch.float64) * t_steps[0]",
        "x_next = latents.to(torch.float64)",
    ),
    M(
        "method/sampling:seed-stream-shared",
        "rng = torch.Generator().manual_seed(seed)\n        z.append",
        "rng = torch.Generator().manual_seed(seeds[0])\n        z.append",
    ),
    # --- image metrics: KID, Fréchet distance, precision/recall --------------------------------
    M("evaluation/image_metrics:kid-biased", "/ (m * (m - 1))", "/ (m * m)"),
    M(
        "evaluation/image_metrics:kid-cross-term",
        "total += within - 2 * kxy.mean()",
        "total += within - kxy.mean()",
    ),
    M("evaluation/image_metrics:kid-kernel-scale", "(x @ y.T / d + 1) ** 3", "(x @ y.T + 1) ** 3"),
    M(
        "evaluation/image_metrics:fd-cross-term",
        "np.trace(s2) - 2 * trace_sqrt)",
        "np.trace(s2) - trace_sqrt)",
    ),
    M(
        "evaluation/image_metrics:fd-product",
        "cross = np.linalg.eigvalsh(root @ s2 @ root)",
        "cross = np.linalg.eigvalsh(s1 @ s2)",
    ),
    M(
        "evaluation/image_metrics:cov-rowvar",
        "np.cov(features, rowvar=False)",
        "np.cov(features.T, rowvar=False)",
    ),
    M(
        "evaluation/image_metrics:knn-self",
        "dist.kthvalue(k + 1, dim=1)",
        "dist.kthvalue(k, dim=1)",
    ),
    M(
        "evaluation/image_metrics:coverage-all",
        "(dist <= radii[None, :]).any(dim=1)",
        "(dist <= radii[None, :]).all(dim=1)",
    ),
    M(
        "evaluation/image_metrics:precision-recall-swapped",
        "return precision, recall",
        "return recall, precision",
    ),
    # --- vector metrics -----------------------------------------------------------------------
    M("evaluation/vectors:mmd-biased", "total += xx / (n * (n - 1))", "total += xx / (n * n)"),
    M(
        "evaluation/vectors:mmd-block-diagonal",
        "kernel.diagonal(offset=start)",
        "kernel.diagonal(offset=0)",
    ),
    M(
        "evaluation/vectors:rbf-bandwidth",
        "torch.exp(-squared / (2 * h * h))",
        "torch.exp(-squared / (2 * h))",
    ),
    M(
        "evaluation/vectors:sliced-w2-no-root",
        "((qx - qy) ** 2).mean().sqrt().item()",
        "((qx - qy) ** 2).mean().item()",
    ),
    M(
        "evaluation/vectors:mode-tv-half",
        "tv = 0.5 * (counts / counts.sum() - weights)",
        "tv = (counts / counts.sum() - weights)",
    ),
    # --- target schedules ---------------------------------------------------------------------
    M("method/schedule:node-steps-short", "for i in range(nodes + 1)]", "for i in range(nodes)]"),
    M(
        "method/schedule:target-starts-at-N",
        "max(last_node - 1 - iteration // interval, 0)",
        "max(last_node - iteration // interval, 0)",
    ),
    M(
        "method/schedule:adaptive-starts-at-N",
        "self.node = max(last_node - 1, 0)",
        "self.node = last_node",
    ),
    M(
        "method/schedule:adaptive-tolerance-sign",
        "(1 - self.tolerance) * self.best",
        "(1 + self.tolerance) * self.best",
    ),
    M(
        "method/schedule:adaptive-smoothing-swapped",
        "self.smoothing * self.smoothed + (1 - self.smoothing) * gap",
        "(1 - self.smoothing) * self.smoothed + self.smoothing * gap",
    ),
    M(
        "method/schedule:adaptive-patience-off-by-one",
        "if self.since_best >= self.patience",
        "if self.since_best > self.patience",
    ),
    M(
        "method/schedule:resume-drops-patience",
        "self.since_best, self.on_node = since_best, on_node",
        "self.since_best, self.on_node = 0, on_node",
    ),
    M(
        "method/schedule:resume-drops-best",
        "self.best = math.inf if best is None else float(best)",
        "self.best = math.inf",
    ),
    # --- data-parallel averaging --------------------------------------------------------------
    M("runtime/sharding:gradients-summed", "            flat /= self.world_size\n", ""),
    M(  # every process of a host reads the whole teacher at once
        "runtime/sharding:teacher-read-all-at-once",
        "            if turn == mine:\n",
        "            if turn == 0:\n",
    ),
    M(  # the targets kept in float32 whatever --frozen-dtype says
        "runtime/sharding:frozen-dtype-ignored",
        "            self.frozen.dtype = frozen_dtype\n",
        "",
    ),
    M(
        "runtime/parallel:same-slice-every-rank",
        "return x[self.rank * n : (self.rank + 1) * n]",
        "return x[:n]",
    ),
    M(
        "runtime/parallel:mean-summed",
        "        return values / self.world_size\n",
        "        return values\n",
    ),
    M(
        "runtime/parallel:global-batch-local",
        "return per_rank * self.world_size",
        "return per_rank",
    ),
    # --- training-state files -----------------------------------------------------------------
    M("store/statefile:sampler-stream-not-restored", '    rng.set_state(tensors["rng"])\n', ""),
    M(
        "store/statefile:dropout-stream-not-restored",
        "    torch.set_rng_state(tensors[cpu_key])\n",
        "",
    ),
    M(
        "store/statefile:step-unchecked",
        'if metadata.get("step") != str(expected_step):',
        "if False:",
    ),
    M(
        "store/statefile:negative-moments-accepted",
        'field != "exp_avg" and bool((value < 0).any())',
        'field == "exp_avg" and bool((value < 0).any())',
    ),
    M(
        "store/statefile:incomplete-optimiser-accepted",
        "if any(set(fields) != set(OPTIMIZER_TENSORS) for fields in state.values()):",
        "if False:",
    ),
    M(
        "store/statefile:moments-dropped",
        'opt.load_state_dict({"state": state,',
        'opt.load_state_dict({"state": {},',
    ),
    # --- atomic writes ------------------------------------------------------------------------
    M("store/fileio:temp-left-on-failure", "        Path(tmp).unlink(missing_ok=True)\n", ""),
    M("store/fileio:no-space-check", "    ensure_free_space(path.parent, size, path.name)\n", ""),
    M("store/fileio:private-mode", "        os.fchmod(fd, 0o666 & ~_umask())", "        pass"),
    M(
        "store/fileio:file-fsync-dropped",
        "            if durable:\n                os.fsync(f.fileno())",
        "            if False:\n                os.fsync(f.fileno())",
    ),
    M(
        "store/fileio:rename-not-replace",
        "os.replace(tmp, path)",
        "os.rename(tmp, path)",
        equivalent="os.rename replaces the target atomically on POSIX too",
    ),
    # --- the restricted EDM unpickler ---------------------------------------------------------
    M(
        "models/edm_unpickler:torch-fallback",
        "            return self.allowed[(module, name)]\n",
        "            if module.startswith('torch') and (module, name) not in self.allowed:\n"
        "                return super().find_class(module, name)\n"
        "            return self.allowed[(module, name)]\n",
    ),
    M(
        "models/edm_unpickler:view-end-unchecked",
        "if numel and (numel > flat.numel() or last >= flat.numel()):",
        "if numel and numel > flat.numel():",
    ),
    M(
        "models/edm_unpickler:budget-in-elements",
        "self.budget -= numel * flat.element_size()",
        "self.budget -= numel",
    ),
    M(
        "models/edm_unpickler:storage-bytes-at-least",
        "if len(data) - stream.tell() != nbytes:",
        "if len(data) - stream.tell() < nbytes:",
    ),
    M(
        "models/edm_unpickler:dtype-state-unchecked",
        "if state != NUMPY_STATES[self.name]:",
        "if state is None:",
    ),
    M(
        "models/edm_unpickler:depth-unbounded",
        "MAX_PICKLE_DEPTH = 1000",
        "MAX_PICKLE_DEPTH = 10**9",
    ),
    M(
        "models/edm_pickle:kwargs-int-unbounded",
        "if abs(value) >= 2**31:",
        "if abs(value) >= 2**63:",
    ),
    M("models/edm_pickle:kwargs-nan-accepted", "if math.isnan(value):", "if False:"),
    M(
        "models/edm_pickle:module-cycle",
        "if id(record) in seen or len(seen) > MAX_MODULES:",
        "if len(seen) > MAX_MODULES:",
    ),
    M(
        "models/edm_unpickler:hooks-accepted",
        "if hooks is not None and not (",
        "if False and not (",
    ),
    M(
        "models/edm_unpickler:negative-strides",
        "all(type(v) is int and v >= 0 for v in integers)",
        "all(type(v) is int for v in integers)",
    ),
    M(
        "method/adversarial:dmd2-labels-swapped",
        "F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()",
        "F.softplus(-fake_logits).mean() + F.softplus(real_logits).mean()",
    ),
    M(
        "method/adversarial:ratio-unclipped",
        ".clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp().clamp(*RATIO_CLIP)",
        ".clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp()",
    ),
    M(
        "method/adversarial:h-not-normalised",
        "return h / (ex.mean(h.mean()) + 1e-6)",
        "return h",
    ),
    M(
        "method/adversarial:sida-scale-ignored",
        "return (per_sample / scale).mean()",
        "return per_sample.mean()",
    ),
    M(
        "method/adversarial:stream-not-reseeded",
        "self.rng.manual_seed(int(mixed[0]) >> 1)",
        "pass",
    ),
    M(
        "stages/lifecycle:warmup-from-zero",
        'group["lr"] = group["peak_lr"] * min(1.0, step / warmup)',
        'group["lr"] = group["peak_lr"] * min(1.0, (step - 1) / warmup)',
    ),
    M(
        "store/export_folder:replaces-foreign-files",
        "if exists and name not in self.written and not self._still_ours(name, path):",
        "if False:",
    ),
    M(
        "stages/evaluation_record:any-weights-match",
        'if ref is not None and ref.sha256 == sha256 and ref.file == f"{CHECKPOINTS}/{path.name}":',
        "if ref is not None:",
    ),
    M(
        "store/export_folder:deletes-changed-files",
        "return recorded is not None and path.is_file() and sha256_file(path) == recorded",
        "return path.is_file()",
    ),
]


def checkout_files() -> list[str]:
    """Files of the checkout as git sees them (tracked and new), without build or run output."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def copy_checkout(dest: Path) -> None:
    for name in checkout_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, last output line)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        *[f"tests/{t}" for t in tests],
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "timeout", time.perf_counter() - started, ""
    seconds = time.perf_counter() - started
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    outcome = {0: "passed", 1: "failed"}.get(process.returncode, "error")
    return outcome, seconds, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="", help="comma-separated: run the mutants whose names contain one"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    wanted = args.only.split(",")
    mutants = [m for m in MUTANTS if any(w in m.name for w in wanted)]
    if args.list:
        for m in mutants:
            print(f"{m.name:45} {' '.join(TESTS[m.module])}")
        return

    with tempfile.TemporaryDirectory(prefix="disback-mutation-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        sources = {m.module: (copy / "disback_cli" / f"{m.module}.py") for m in mutants}
        originals = {module: path.read_text() for module, path in sources.items()}
        for m in mutants:  # every mutant must still apply to today's code, and compile
            count = originals[m.module].count(m.before)
            if count != 1:
                sys.exit(f"mutant {m.name}: its text occurs {count} times in {m.module}.py")
            compile(originals[m.module].replace(m.before, m.after), m.module, "exec")

        # Unmutated, every test set must pass, or a "kill" would mean nothing. Its time sets
        # the timeout for the mutants (a mutant that hangs a test counts as killed).
        baseline = {}
        for module in sorted({m.module for m in mutants}):
            outcome, seconds, last = run_tests(copy, TESTS[module], timeout=3600)
            print(f"baseline {module:24} {outcome:7} {seconds:6.1f} s  {last}", flush=True)
            if outcome != "passed":
                sys.exit(f"the tests of {module} fail without a mutation: {last}")
            baseline[module] = seconds

        results = []
        for m in mutants:
            path = sources[m.module]
            path.write_text(originals[m.module].replace(m.before, m.after))
            try:
                timeout = 3 * baseline[m.module] + 60
                outcome, seconds, last = run_tests(copy, TESTS[m.module], timeout)
            finally:
                path.write_text(originals[m.module])
            status = "survived" if outcome == "passed" else "killed"
            results.append(
                {
                    **asdict(m),
                    "status": status,
                    "outcome": outcome,
                    "seconds": round(seconds, 1),
                    "last_line": last[:200],
                }
            )
            note = f" (equivalent: {m.equivalent})" if m.equivalent else ""
            print(f"{status:8} {m.name:45} {seconds:6.1f} s  {last[:80]}{note}", flush=True)

    counted = [r for r in results if not r["equivalent"]]
    killed = sum(r["status"] == "killed" for r in counted)
    rate = killed / len(counted) if counted else float("nan")
    print(
        f"\n{killed} of {len(counted)} non-equivalent mutants killed ({rate:.0%}); "
        f"{len(results) - len(counted)} listed as equivalent"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-some" if args.only else ""
    summary = {
        "killed": killed,
        "counted": len(counted),
        "kill_rate": rate,
        "baseline_seconds": baseline,
        "mutants": results,
    }
    (args.out / f"mutation{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
