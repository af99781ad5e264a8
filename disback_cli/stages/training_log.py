"""The log of a backtrack run: metrics.jsonl lines (means over the last `log_every` iterations),
the ground-truth evaluation of the EMA generator, the score-mismatch diagnostics, and the
experiment trackers that mirror them."""

from __future__ import annotations

import torch

from disback_cli.config import BacktrackConfig
from disback_cli.evaluation.datasets import get_dataset
from disback_cli.evaluation.ground_truth import training_evaluator
from disback_cli.evaluation.mismatch import ScoreMismatch
from disback_cli.models.teachers import Teacher
from disback_cli.runtime.devices import peak_memory_gib
from disback_cli.runtime.tracking import open_trackers
from disback_cli.stages.lifecycle import Run
from disback_cli.store.layout import METRICS, check_no_links
from disback_cli.store.metrics_log import MetricsLog


class TrainingLog:
    """metrics.jsonl of a run: means of the logged values over the last `log_every` iterations
    (averaged over ranks, kept on the device between lines), and with `eval_every` the
    ground-truth metrics of the EMA generator."""

    def __init__(self, run: Run, cfg: BacktrackConfig, teacher: Teacher) -> None:
        self.run, self.cfg = run, cfg
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.evaluate = None
        if cfg.eval_every and run.ex.is_main:
            self.evaluate = training_evaluator(
                teacher.dataset,
                cfg.eval_samples,
                teacher.spec.data_shape,
                teacher.conditions,
                run.ex.device,
                cfg.batch,
            )
        self.mismatch = None
        if cfg.mismatch_every and run.ex.is_main:
            self.mismatch = ScoreMismatch(get_dataset(teacher.dataset), run.ex.device)
        self.path = check_no_links(run.directory, METRICS)
        self.log = MetricsLog(self.path, run.ex.is_main)
        self.trackers = []
        if run.ex.is_main:
            self.trackers = open_trackers(
                cfg.log_to, run.directory, cfg.model_dump(mode="json"), run.manifest.created_at
            )

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def _means(self) -> dict[str, float]:
        keys = list(self.sums)
        values = self.run.ex.mean(torch.stack([self.sums[k] for k in keys]) / self.count)
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist(), strict=True))

    def first(self, start: int, generator_ema) -> None:
        """With `eval_every`, the line of iteration 0: G0 measured (the EMA before the first
        step is G0), so curves start where training did. Only when the run starts at iteration
        0 and its log has no line yet (a resumed run keeps its line 0), so that a resumed run's
        metrics.jsonl equals an uninterrupted one."""
        if start or not self.evaluate or self.path.stat().st_size:
            return
        # `seconds` as on every log line (of training: none yet), for readers that expect it
        line = {"seconds": self.run.manifest.elapsed_seconds, "eval": self.evaluate(generator_ema)}
        self.run.note(
            "G0 (iteration 0): " + ", ".join(f"{k} {v:.4g}" for k, v in line["eval"].items())
        )
        self.log.write(0, line)
        for tracker in self.trackers:
            tracker.log(0, line)

    def line(self, step: int, target_node: int, generator_ema, networks: tuple) -> None:
        """The log line of `step`, if one is due; `networks`: (generator, fake, target) for the
        score-mismatch diagnostics."""
        cfg, line = self.cfg, {}
        last = step == cfg.iters
        if step % cfg.log_every == 0 or last:
            line.update(target_node=target_node, **self._means(), seconds=self.run.elapsed())
            switched = self.run.state.loop["targets"].take_switch()
            if switched is not None:  # the target moved after this many iterations
                line["target_switch_at"] = switched
            peak = peak_memory_gib(self.run.ex.device)
            if peak is not None:  # this GPU's peak so far (rank 0's)
                line["peak_memory_gib"] = peak
        if self.evaluate and (step % cfg.eval_every == 0 or last):
            self.run.reporter.phase(f"iteration {step}: evaluating the EMA generator")
            line["eval"] = self.evaluate(generator_ema)
        if "loss_g" in line or "eval" in line:  # progress: the losses, and metrics when measured
            losses = (
                {"loss_g": line["loss_g"], "gap": line["score_gap"]} if "loss_g" in line else {}
            )
            self.run.reporter.advance(step, **losses, **line.get("eval", {}))
        if self.mismatch and (step % cfg.mismatch_every == 0 or last):
            line["mismatch"] = self.mismatch(*networks)
        if line:
            self.log.write(step, line)
            for tracker in self.trackers:
                tracker.log(step, line)

    def close(self) -> None:
        self.log.close()
        for tracker in self.trackers:
            tracker.close()
