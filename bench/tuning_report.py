"""The tuning benchmark's comparison and report: per seed, the epochs each arm needed to reach random search's
best-of-budget validation accuracy, their ratio, and the Markdown page."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import optuna
import torch
from trainer_service.engine.recipe import PreparedData

from bench.machine import cpu_model
from bench.tuning_study import ARMS, RANDOM, TPE_HB, Settings, short_params
from bench.tuning_trials import COMPLETE, CUT, FAILED, PRUNED, ArmRun, FeatureStats, TrialRun

# Each trial in the report's trial log: its epochs and one letter for its state.
_STATE_MARK: Final = {COMPLETE: "c", PRUNED: "p", CUT: "b", FAILED: "f"}


@dataclass(frozen=True)
class SeedComparison:
    seed: int
    random: ArmRun
    tpe_hb: ArmRun

    @property
    def target(self) -> float | None:
        """A_r: random search's best-of-budget validation accuracy."""
        return self.random.best

    def _reach(self, run: ArmRun) -> TrialRun | None:
        return None if self.target is None else run.reached(self.target)

    @property
    def random_reach(self) -> TrialRun | None:
        return self._reach(self.random)

    @property
    def tpe_hb_reach(self) -> TrialRun | None:
        return self._reach(self.tpe_hb)

    @property
    def ratio(self) -> float:
        """Epochs TPE + Hyperband needed to reach A_r over the epochs random search needed; inf: not reached."""
        r, t = self.random_reach, self.tpe_hb_reach
        if r is None:
            return math.nan
        return math.inf if t is None else t.spent / r.spent

    def wall_ratio(self, per_trial: float = 0.0) -> float:
        """The same in wall seconds, each trial charged `per_trial` seconds more (numbers count trials from 0)."""
        r, t = self.random_reach, self.tpe_hb_reach
        if r is None:
            return math.nan
        if t is None:
            return math.inf
        return (t.elapsed + (t.number + 1) * per_trial) / (r.elapsed + (r.number + 1) * per_trial)


def median_ratio(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def format_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "not reached" if math.isinf(value) else f"{value:.2f}"


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.fmean(present):.1%} ± {std:.1%}"


def ratio_line(comparisons: Sequence[SeedComparison]) -> str:
    ratios = [c.ratio for c in comparisons]
    per_seed = ", ".join(f"seed {c.seed}: {format_ratio(c.ratio)}" for c in comparisons)
    return (
        f"Compute ratio TPE + Hyperband / random search (epochs to reach random search's best-of-budget "
        f"validation accuracy): median {format_ratio(median_ratio(ratios))} over {len(comparisons)} seed(s) "
        f"({per_seed})"
    )


def render_report(
    s: Settings,
    comparisons: Sequence[SeedComparison],
    features: FeatureStats,
    data: PreparedData,
    command: str,
    total_seconds: float,
    load: tuple[tuple[float, float, float], tuple[float, ...]],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = {arm.name: [c.random if arm.name == RANDOM else c.tpe_hb for c in comparisons] for arm in ARMS}
    brackets = math.floor(math.log(s.max_epochs, s.reduction_factor)) + 1 if s.max_epochs > 1 else 1
    test_count = len(data.test) if data.test is not None else 0
    lines = [
        "# Tuning: TPE + Hyperband vs random search at the same compute budget",
        "",
        f"Fashion-MNIST stratified subset (data seed {s.data_seed}): {len(data.train)} train ({s.per_class}/class) "
        f"and {len(data.val)} validation ({s.val_per_class}/class) from the train file, {test_count} test "
        f"({s.test_per_class}/class) from t10k; {s.size}x{s.size}, grey replicated to RGB. MobileNetV2, ImageNet "
        f"weights, frozen base: stage 1 only (the head on cached bottleneck features), cosine LR schedule, "
        f"R = {s.max_epochs} epochs per trial, through `recipe.train`. Searched (a `StudySpec` checked by "
        f"`validate_study`; values from `suggest`, applied with `apply_params`): `classifier.learning_rate` "
        f"log-uniform [1e-5, 1e-1], `model.classifier_dim` {{32, 64, 128, 256}}, `model.dropout` [0, 0.7], "
        f"`classifier.optimizer.type` {{Adam, SGD}}, `classifier.batch_size` {{16, 32, 64}}.",
        "",
        f"Arms: **random search** (`make_sampler`: RandomSampler, no pruner, every trial R epochs) and **TPE + "
        f"Hyperband** (`make_sampler` / `make_pruner`: multivariate TPE, HyperbandPruner with min_resource 1, "
        f"max_resource R = {s.max_epochs}, reduction factor {s.reduction_factor}: {brackets} bracket(s); a trial "
        f"reports validation accuracy after every epoch and stops when pruned). Compute is counted in training "
        f"epochs actually run; each arm gets B = {s.budget_epochs} epochs ({s.budget_epochs / s.max_epochs:g} full "
        f"trials), trials one after another, sampler seeds 0..{s.seeds - 1}. Only completed trials count as "
        f'"best", as in a study\'s result. c_random: epochs random search had spent when it first reached its '
        f"best-of-budget validation accuracy A_r; c_tpe_hb: epochs TPE + Hyperband had spent when a completed "
        f"trial first scored >= A_r. Ratio = c_tpe_hb / c_random (below 1: TPE + Hyperband needs less compute).",
        "",
        f"**{ratio_line(comparisons)}.**",
        "",
    ]
    # Stage 1's feature pass over the train and validation images: what each trial job pays in the product.
    per_trial_features = 2 * features.seconds / max(features.passes, 1)
    estimate = s.share_features
    header = (
        "| seed | A_r (random best) | c_random | TPE + HB best | c_tpe_hb | ratio (epochs) | c_tpe_hb / B "
        "| ratio (wall time, as run) |"
    )
    lines += [
        header + (" ratio (wall time, each trial paying its feature pass; estimate) |" if estimate else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if estimate else ""),
    ]
    for c in comparisons:
        r, t = c.random_reach, c.tpe_hb_reach
        lines.append(
            f"| {c.seed} | {format_percent(c.target)} | {'-' if r is None else f'{r.spent} (trial {r.number})'} | "
            f"{format_percent(c.tpe_hb.best)} | {'not reached' if t is None else f'{t.spent} (trial {t.number})'} | "
            f"{format_ratio(c.ratio)} | {'-' if t is None else f'{t.spent / s.budget_epochs:.2f}'} | "
            f"{format_ratio(c.wall_ratio())} |"
            + (f" {format_ratio(c.wall_ratio(per_trial_features))} |" if estimate else "")
        )
    wall_estimates = [c.wall_ratio(per_trial_features if estimate else 0.0) for c in comparisons]
    lines += [
        "",
        f"Median wall-time ratio{' (each trial paying its feature pass, estimated)' if estimate else ''}: "
        f"{format_ratio(median_ratio(wall_estimates))}.",
    ]
    lines += [
        "",
        "| arm | trials (complete / pruned / cut by budget / failed) | epochs spent | epochs per trial | "
        "trials drawn by TPE's model | best val acc (mean ± std) | test acc of the best config, retrained "
        "(mean ± std) | wall time per seed | of which outside epochs, per trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        arm_runs = runs[arm.name]
        trials = [t for run in arm_runs for t in run.trials]
        n = len(trials)
        counts = " / ".join(str(sum(t.state == st for t in trials)) for st in (COMPLETE, PRUNED, CUT, FAILED))
        spent = sum(run.spent for run in arm_runs)
        overhead = sum(t.seconds - t.epoch_seconds for t in trials) / max(n, 1)
        wall = statistics.fmean(run.seconds for run in arm_runs)
        modelled = [run.model_sampled for run in arm_runs]
        drawn = "-" if any(m is None for m in modelled) else str(sum(m for m in modelled if m is not None))
        lines.append(
            f"| {arm.name} | {n} ({counts}) | {spent} | {spent / max(n, 1):.1f} | {drawn} | "
            f"{_mean_std([run.best for run in arm_runs])} | {_mean_std([run.test_accuracy for run in arm_runs])} | "
            f"{wall:.0f} s | {overhead:.2f} s |"
        )
    lines += ["", "Best configuration of each arm and seed (validation accuracy; test accuracy when retrained):", ""]
    lines += ["| seed | arm | trial | configuration | val acc | test acc |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        for run in (c.random, c.tpe_hb):
            best = run.best_trial()
            if best is None:
                lines.append(f"| {c.seed} | {run.arm.name} | - | no trial completed | - | - |")
                continue
            lines.append(
                f"| {c.seed} | {run.arm.name} | {best.number} | {short_params(best.params)} | "
                f"{format_percent(best.value)} | {format_percent(run.test_accuracy)} |"
            )
    if s.share_features:
        trials_each = {arm.name: sum(len(r.trials) for r in runs[arm.name]) / len(comparisons) for arm in ARMS}
        feature_note = (
            f"Bottleneck features were computed {features.passes} time(s) ({features.images} images, "
            f"{features.seconds:.1f} s in all) and reused {features.reused} time(s): the bench memoises the "
            f"engine's `compute_features` across trials (exact here; the engine has no cache shared across runs). "
            f"In a study of trial jobs every trial pays stage 1's feature pass of the train and validation images, "
            f"about {per_trial_features:.1f} s here: add that per trial to the wall times above "
            f"({trials_each[RANDOM]:.0f} trials per seed for random search, {trials_each[TPE_HB]:.0f} for "
            f"TPE + Hyperband), as the estimated wall-time ratio does. Epoch counts do not depend on it."
        )
    else:
        feature_note = (
            f"Every trial computed its own bottleneck features, as a trial job does "
            f"({features.passes} passes, {features.seconds:.1f} s in all)."
        )
    test_note = ""
    if s.retrain and test_count:
        test_note = (
            f" Test accuracy: each arm's best configuration trained once more with the test split attached "
            f"(the same seed, so the same validation accuracy), evaluated once; {test_count} test images, "
            f"so ± about {100 * math.sqrt(0.25 / test_count):.1f} points of binomial noise per run."
        )
    lines += [
        "",
        "TPE draws at random until 10 trials have finished (optuna's `n_startup_trials`, which `make_sampler` "
        "leaves at its default), and under Hyperband it counts only the trials of the asking trial's bracket, "
        f"so with {brackets} bracket(s) about {10 * brackets} trials are random draws before the model is used "
        'everywhere; the "trials drawn by TPE\'s model" column counts the others. Its random draws come from a '
        "RandomSampler with the same seed as the random-search arm's, so the two arms start with the same "
        "configurations (a paired comparison: early on, the difference is Hyperband's pruning).",
        "",
        f"Wall time counts everything a trial does (building the model, the epochs, the final evaluation); the last "
        f"column is what is not epochs. {feature_note}{test_note}",
        "",
        "<details><summary>Epochs of every trial, in order (c complete, p pruned, b cut by the budget, "
        "f failed)</summary>",
        "",
    ]
    for c in comparisons:
        for run in (c.random, c.tpe_hb):
            marks = " ".join(f"{t.epochs}{_STATE_MARK[t.state]}" for t in run.trials)
            lines.append(f"- seed {c.seed}, {run.arm.name} ({len(run.trials)} trials, {run.spent} epochs): {marks}")
    failures = [
        (c.seed, run.arm.name, t) for c in comparisons for run in (c.random, c.tpe_hb) for t in run.trials if t.error
    ]
    lines += ["", "</details>", ""]
    if failures:
        lines += ["Failed trials:", ""]
        lines += [f"- seed {seed}, {name}, trial {t.number}: {t.error}" for seed, name, t in failures]
        lines.append("")
    lines += [
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, {s.threads} torch thread(s), no GPU used; "
        f"load average {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f} (1/5/15 min) at the start, "
        f"{load[1][0]:.2f} at the end; Python {platform.python_version()}, torch {torch.__version__}, optuna "
        f"{optuna.__version__}; {platform.platform()}. Total wall time {total_seconds / 60:.1f} min. Date: {now}.",
        "",
    ]
    return "\n".join(lines)
