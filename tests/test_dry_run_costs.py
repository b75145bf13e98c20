"""What `--dry-run` says a study costs beyond its training: the fixed start-up that Ray Train adds
to each data-parallel trial (study/advice.py), printed under the plan."""

from __future__ import annotations

from helpers import raw_spec, write_spec

from resnet_ablate.cli import main
from resnet_ablate.study.advice import RAY_TRAIN_START_UP_SECONDS, start_up_cost


def test_each_data_parallel_trial_is_charged_ray_trains_start_up():
    (line,) = start_up_cost(2, 6, (45, 60))
    # 6 trials x 45 s = 4.5 minutes, 6 x 60 s = 6 minutes.
    assert "45-60 s to each data-parallel trial" in line
    assert "6 trials to run spend 4.5-6.0 trial-minutes starting" in line
    assert start_up_cost(1, 6) == []  # one process: a plain Ray task, no Ray Train
    assert start_up_cost(4, 0) == []  # nothing left to run


def test_the_dry_run_prints_the_start_up_for_data_parallel_studies_only(tmp_path, capsys):
    outputs = {}
    for replicas in (1, 2):
        raw = raw_spec(f"dry-{replicas}", seeds=3,
                       resources={"cpus": 1, "replicas": replicas, "workers": 1})
        spec = write_spec(tmp_path, raw)
        assert main(["run", str(spec), "--runs-dir", str(tmp_path), "--dry-run"]) == 0
        outputs[replicas] = capsys.readouterr().out
    low, high = RAY_TRAIN_START_UP_SECONDS
    # 2 shortcuts x 3 seeds, all pending.
    assert f"6 trials to run spend {6 * low / 60:.1f}-{6 * high / 60:.1f} trial-minutes" \
        in outputs[2], outputs[2]
    assert "start-up" not in outputs[1], outputs[1]
    assert not list(tmp_path.glob("*.db"))  # a dry run only reads
