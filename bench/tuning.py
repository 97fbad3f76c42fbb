"""Tuning: TPE + Hyperband against random search at the same compute budget, on a small real task.

    python -m bench.tuning             # defaults: 3 seeds x 2 arms, about 3 minutes on 2 CPU cores
    python -m bench.tuning --quick     # tiny (1 seed, a few epochs): the smoke test's run
    python -m bench.tuning --help      # --seeds, --budget-epochs, --max-epochs, --per-class, --size, ...

Task: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the data of bench/transfer_learning.py: a
stratified subset, resized, grey replicated to RGB), MobileNetV2 with ImageNet weights and a frozen base, stage 1
only, so the head trains on cached bottleneck features through `trainer_service.engine.recipe.train`.

The search goes through the product's tuning code: a `StudySpec` built here is checked by `validate_study`; the
sampler and pruner come from `make_sampler` / `make_pruner`; each trial's values come from `suggest` and become its
TrainingSpec with `apply_params`, checked by `validate_spec` as the study runner does. Searched:
`classifier.learning_rate` (log), `model.classifier_dim`, `model.dropout`, `classifier.optimizer.type` (Adam or
SGD) and `classifier.batch_size`; `classifier.epochs` is fixed at R (`--max-epochs`, cosine LR schedule).

Arms, each run with sampler seeds 0 .. N-1 (`--seeds`), trials one after another, asked and told in memory:

  random search      RandomSampler, no pruner: every trial trains R epochs.
  TPE + Hyperband    TPESampler + HyperbandPruner(min_resource 1, max_resource R, reduction factor 3). A trial
                     reports validation accuracy after every epoch and stops when the pruner says so, as a
                     trial job does (trainer_service/worker.py).

Compute is counted in training epochs actually run. Each arm gets the same budget B (`--budget-epochs`): it
starts trials until B epochs are spent, and the trial running when the budget ends is stopped there. A trial's
value is the objective the study runner reads (validation accuracy of the finished run); only COMPLETE trials
count for "best", as in a study's result. For every seed:

  A_r       random search's best validation accuracy over the whole budget (its best-of-budget);
  c_random  the epochs random search had spent when its best trial completed (when it first reached A_r);
  c_tpe_hb  the epochs TPE + Hyperband had spent when a completed trial first reached >= A_r (or not reached);
  ratio     c_tpe_hb / c_random; the headline is the median over seeds (below 1: TPE + Hyperband got there
            with less compute; "not reached" counts as infinite).

Each arm's final best validation accuracy (mean +- std over seeds) is reported too, and the test accuracy of each
arm's best configuration, retrained once with the test set attached (`--no-retrain` skips it).

The engine computes stage 1's bottleneck features at the start of every run, and has no cache shared across
runs: in the product every trial job pays that feature pass. With 1000-odd images it costs more than a whole
trial's epochs, which would make the benchmark slow without changing the epoch counts, so by default the bench
memoises the engine's `compute_features` for the run (exact: the base is frozen, in eval mode, and the same for
every trial; only the dataset rows are the key). The report gives the feature pass's cost, so the wall time a
study of trial jobs would take can be read off; `--no-share-features` runs every trial as the product does.

What the arms share: TPE (as `make_sampler` builds it) draws at random until 10 trials have finished, counting
under Hyperband only the trials of the asking trial's bracket, so with R = 9 and reduction factor 3 (3 brackets)
about 30 trials are random draws; and those draws come from a RandomSampler seeded like the random-search arm's,
so both arms start with the same configurations. The report counts the trials TPE drew from its model.

Exit status: 0 when the run completed (whatever the ratio), 1 when a trial failed, 2 when the data is missing or
the settings are bad.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import optuna
import torch
from trainer_service.spec.validate import SpecInvalid
from trainer_service.tuning.study_config import validate_study

from bench.transfer_learning import APT_PACKAGE, DATA_DIR, DatasetMissing, imagenet_base_state, prepare_data
from bench.tuning_report import SeedComparison, format_percent, format_ratio, ratio_line, render_report
from bench.tuning_study import ARMS, BUCKET, RANDOM, TPE_HB, Settings, study_spec
from bench.tuning_trials import FAILED, retrain_best, run_arm, shared_features

__all__ = ["APT_PACKAGE", "ARMS", "DATA_DIR", "main"]

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "tuning.md"

DEFAULTS: Final = {
    "seeds": 3,
    "budget_epochs": 180,
    "max_epochs": 9,
    "per_class": 100,
    "val_per_class": 50,
    "test_per_class": 100,
    "size": 32,
}
QUICK: Final = {
    "seeds": 1,
    "budget_epochs": 18,
    "max_epochs": 3,
    "per_class": 20,
    "val_per_class": 10,
    "test_per_class": 10,
    "size": 32,
}


# -- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = DEFAULTS
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for the smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--seeds", type=int, help=f"sampler seeds per arm, 0..N-1 (default {d['seeds']})")
    parser.add_argument(
        "--budget-epochs",
        type=int,
        help=f"B: training epochs each arm may spend per seed (default {d['budget_epochs']})",
    )
    parser.add_argument(
        "--max-epochs",
        type=int,
        help=f"R: epochs of a full trial, Hyperband's max resource (default {d['max_epochs']})",
    )
    parser.add_argument("--reduction-factor", type=int, default=3, help="Hyperband's reduction factor (default 3)")
    parser.add_argument("--per-class", type=int, help=f"training images per class (default {d['per_class']})")
    parser.add_argument("--val-per-class", type=int, help=f"validation images per class (default {d['val_per_class']})")
    parser.add_argument(
        "--test-per-class",
        type=int,
        help=f"test images per class, from t10k (default {d['test_per_class']}; 0: no test)",
    )
    parser.add_argument("--size", type=int, help=f"image side in pixels, >= 32 (default {d['size']})")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the subset and of every trial's run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads oversubscribe)",
    )
    parser.add_argument(
        "--no-retrain", action="store_true", help="skip retraining each arm's best configuration for its test accuracy"
    )
    parser.add_argument(
        "--no-share-features",
        action="store_true",
        help="every trial computes its own bottleneck features, as a trial job does (slower)",
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 when it ran (whatever the ratio), 1 when a trial failed, 2 for missing data or bad
    settings."""
    args = parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench.tuning", *map(shlex.quote, raw)])
    s = Settings(
        seeds=args.seeds,
        budget_epochs=args.budget_epochs,
        max_epochs=args.max_epochs,
        reduction_factor=args.reduction_factor,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        data_seed=args.data_seed,
        threads=args.threads,
        retrain=not args.no_retrain,
        share_features=not args.no_share_features,
    )
    try:
        s.check()
        for arm in ARMS:  # the study spec itself, before any data is loaded
            validate_study(study_spec(s, arm, 0), default_bucket=BUCKET)
    except (ValueError, SpecInvalid) as err:
        print(f"bad settings: {err}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    torch.set_num_threads(s.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        data = prepare_data(s.per_class, s.val_per_class, s.test_per_class, s.size, s.data_seed, args.data_dir)
    except DatasetMissing as err:
        print(err, file=sys.stderr)
        return 2
    search_data = replace(data, test=None)  # the same train/val splits (so the same feature cache), no test
    base_state = imagenet_base_state()
    started = time.perf_counter()
    comparisons = []
    with shared_features(s.share_features) as features:
        for seed in range(s.seeds):
            runs = {}
            for arm in ARMS:
                print(f"{arm.name}, seed {seed}: budget {s.budget_epochs} epochs, R = {s.max_epochs}", flush=True)
                run, config = run_arm(arm, seed, s, search_data, base_state)
                if s.retrain:
                    retrain_best(run, config, data, base_state)
                print(
                    f"{arm.name}, seed {seed}: {len(run.trials)} trials, {run.spent} epochs, best val "
                    f"{format_percent(run.best)}, test {format_percent(run.test_accuracy)}, {run.seconds:.0f} s",
                    flush=True,
                )
                runs[arm.name] = run
            comparison = SeedComparison(seed=seed, random=runs[RANDOM], tpe_hb=runs[TPE_HB])
            print(f"seed {seed}: ratio {format_ratio(comparison.ratio)}", flush=True)
            comparisons.append(comparison)
    report = render_report(
        s, comparisons, features, data, command, time.perf_counter() - started, (load_start, os.getloadavg())
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print()
    print(report)
    print(ratio_line(comparisons))
    print(f"written to {args.output}")
    failed = any(t.state == FAILED for c in comparisons for run in (c.random, c.tpe_hb) for t in run.trials)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
