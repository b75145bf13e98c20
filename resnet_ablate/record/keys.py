"""The stored names of a study and its trials: a trial's user attributes (`TrialKey`), a study's
(`StudyKey`), and why a failed trial failed (`FailureKind`). Optuna keeps a trial's swept
parameters and objective values; everything else a trial records is one of these attributes."""

from __future__ import annotations

from typing import Any


# The toolkit's name among a trial's library versions (TrialKey.VERSIONS).
TOOLKIT = "resnet-ablate"


class TrialKey:
    """A trial's user attributes."""

    SEED = "seed"
    # What was trained: set by the driver when the trial is launched.
    ARCH = "arch"  # the full architecture description (ResNetArch.to_dict())
    ARCH_NAME = "arch_name"
    ARCH_DIGEST = "arch_digest"
    PARAMS = "params"
    FLOPS = "flops"  # forward multiply-adds of one image (see FLOPS_CONVENTION)
    FLOPS_CONVENTION = "flops_convention"
    RECIPE = "recipe"  # TrainRecipe.to_dict() as this architecture was trained
    # Where and how it ran, and what it measured: from the worker's TrialOutcome.
    DEVICE = "device"
    HOST = "host"
    PID = "pid"
    NODE_ID = "node_id"
    VERSIONS = "versions"  # {library: version}, the toolkit's own under TOOLKIT
    CURVES = "curves"  # one dict per epoch (EpochRecord's fields)
    WALL_SECONDS = "wall_seconds"
    IMAGES_PER_SECOND = "images_per_second"
    COMPILE_SECONDS = "compile_seconds"
    EXECUTION = "execution"  # precision, memory format, compilation, CUDA graphs as run
    EPOCHS_COMPLETED = "epochs_completed"
    FINAL_TEST_ACCURACY = "final_test_accuracy"
    BEST_TEST_ACCURACY = "best_test_accuracy"
    FINAL_TRAIN_ACCURACY = "final_train_accuracy"
    WARMUP_STEPS = "warmup_steps"
    EVAL_SPLIT = "eval_split"
    # The final evaluation, for honest statistics (resnet_ablate/stats/intervals.py): the test set's
    # size, the images it got wrong, and which ones (`pack_outcomes`; in-memory data sets in one
    # process only). Stores written before these were kept lack them; analyses say so.
    TEST_IMAGES = "test_images"
    TEST_WRONG = "test_wrong"
    TEST_OUTCOMES = "test_outcomes"
    # Data-parallel trials only: replicas, backend, sync_bn, and the epochs it resumed after.
    DATA_PARALLEL = "data_parallel"
    # How it ended.
    FAILURE_KIND = "failure_kind"  # one of FailureKind
    FAILURE = "failure"  # one line, for people
    TRACEBACK = "traceback"
    PRUNED = "pruned"  # why the pruner stopped it
    WEIGHTS = "weights"  # kept weights: a path relative to the study's runs folder, or why not
    # The state the driver was about to tell ("completed", "pruned", "failed"), written once the
    # rest of its record was (weights aside): a driver killed before telling leaves the trial
    # RUNNING with it, and the next run ends the trial as recorded instead of training it again.
    RECORDED = "recorded"


class StudyKey:
    """A study's user attributes."""

    SPEC = "spec"  # the spec sections that define the study, as written (see study/opening.py)
    SPEC_SOURCE = "spec_source"
    QUESTION = "question"
    OBJECTIVES = "objectives"
    SEEDS = "seeds"
    # The adaptive-seed rule as the spec writes it (spec.AdaptiveSeeds), set by every run so
    # that readers judge by the rule the trials were run under.
    SEED_RULE = "seed_rule"
    DRIVER = "driver"  # the live driver's lease: host, pid, renewed
    # The sampler the study was created with: a grid study's trials and a sampler's do not mix
    # (a sampler would train seeds the grid already has).
    SAMPLER = "sampler"


class FailureKind:
    """Why a failed trial failed; it decides whether its grid point is tried again."""

    ERROR = "error"  # an exception in the trial
    WORKER_LOST = "worker_lost"  # the worker process or its node died
    DIVERGED = "diverged"  # the loss blew up (train/divergence.py: how it is judged)
    OVER_BUDGET = "over_budget"  # its FLOPs exceed the spec's budget.max_gflops
    INTERRUPTED = "interrupted"  # the driver stopped (Ctrl-C, SIGTERM, killed) before it ended
    # Its data set's folder or a shard is missing or unreachable, found when the trial started,
    # or a split had no decodable image (found by the epoch reading it): the same input fails
    # again, so it is not retried, nor settled (a rerun after the fix runs it).
    DATA_UNAVAILABLE = "data_unavailable"
    # A random or TPE sampler's draw of a configuration whose seeds are all spent: a draw not
    # trained (`untrained_draw`), as is a draw over budget.max_gflops.
    REPEAT = "repeat"

    RETRYABLE = (ERROR, WORKER_LOST)  # count as an attempt of the grid point
    FINAL = (DIVERGED, OVER_BUDGET)  # settle the grid point


# The state shown for a trial a stop left unfinished: stored as Optuna's FAIL (Optuna has no
# state of its own for it), run again when the study resumes, and not a failure of the trial.
INTERRUPTED_STATE = "INTERRUPTED"
# The states shown for a random or TPE sampler's draws not trained (study/draws.py): of a
# configuration with every seed spent, or over budget.max_gflops. Stored as FAIL with that
# failure kind and no seed, recorded so that the store says what the sampler drew; no trial of
# the results (left out wherever trials are read or counted) nor of budget.trials.
UNTRAINED_DRAW_STATES = {FailureKind.REPEAT: "REPEAT", FailureKind.OVER_BUDGET: "OVER_BUDGET"}


def untrained_draw(trial: Any) -> bool:
    """Whether `trial` (an Optuna FrozenTrial) is a sampler's draw that was not trained."""
    return trial.state.name == "FAIL" and TrialKey.SEED not in trial.user_attrs \
        and trial.user_attrs.get(TrialKey.FAILURE_KIND) in UNTRAINED_DRAW_STATES


def shown_state(trial: Any) -> str:
    """A trial's state as listings show it (an Optuna FrozenTrial): Optuna's, but INTERRUPTED
    for a trial a stop left unfinished, and REPEAT or OVER_BUDGET for a sampler's draw not
    trained."""
    if untrained_draw(trial):
        return UNTRAINED_DRAW_STATES[trial.user_attrs[TrialKey.FAILURE_KIND]]
    if (trial.state.name == "FAIL"
            and trial.user_attrs.get(TrialKey.FAILURE_KIND) == FailureKind.INTERRUPTED):
        return INTERRUPTED_STATE
    return trial.state.name
