"""What `--dry-run` says a study costs beyond its training: the fixed start-up that Ray Train adds
to each data-parallel trial (study/advice.py), printed under the plan."""

from __future__ import annotations

import os

from helpers import labelled_images, raw_spec, write_shard, write_spec

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


def _planned(spec_path):
    from resnet_ablate.spec import load_spec
    from resnet_ablate.study import RunOptions, plan_study

    spec = load_spec(spec_path)
    return spec, plan_study(spec, RunOptions(runs_dir=spec_path.parent))


def _cores(monkeypatch, count: int) -> None:
    """This process may run on `count` cores, as both the machine and its affinity say."""
    monkeypatch.setattr(os, "cpu_count", lambda: count)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)


def test_the_time_estimate_is_each_trials_start_and_work_at_its_probed_rate(tmp_path,
                                                                            monkeypatch):
    """By hand: each trial takes `start` plus its images x epochs at its seconds per image, the
    line through the two probed architectures' (the most work pending, the lightest) over
    their GFLOPs; trials run `workers` at a time, and the longest trial bounds the study from
    below."""
    from resnet_ablate.study import estimate

    raw = raw_spec("estimate", seeds=3, epochs=4, space={"depth": [8, 20, 32]},
                   model={"family": "cifar"})
    spec, planned = _planned(write_spec(tmp_path, raw))
    by_depth = {p.arch.depth: p for p in planned}
    deep, middle, shallow = by_depth[32], by_depth[20], by_depth[8]
    # Timed: 2 ms an image at depth 32, 1 ms at depth 8.
    timed = {deep.arch: 0.002, shallow.arch: 0.001}
    monkeypatch.setattr(estimate, "_probe",
                        lambda spec, arch, device: (timed[arch], 1 / timed[arch], 1.5))
    _cores(monkeypatch, 8)
    images = spec.train.epochs * estimate._train_images(spec)
    slope = (0.002 - 0.001) / (deep.gflops - shallow.gflops)
    middle_per_image = 0.001 + slope * (middle.gflops - shallow.gflops)
    deep_seconds, shallow_seconds = 1.5 + 0.002 * images, 1.5 + 0.001 * images
    middle_seconds = 1.5 + middle_per_image * images
    assert deep_seconds > middle_seconds > shallow_seconds
    one_each = deep_seconds + middle_seconds + shallow_seconds
    for workers, expected in ((1, 3 * one_each), (3, one_each),
                              (9, max(3 * one_each / 8, deep_seconds)),  # 8 CPUs: 8 at once
                              (99, deep_seconds)):  # nothing less than the longest trial
        if workers == 99:
            _cores(monkeypatch, 99)
        found = estimate.estimate_time(spec, planned, workers)
        assert found.probed == (deep.arch.name, shallow.arch.name)
        assert f"({deep.arch.name} and {shallow.arch.name} timed here, the first at 500 " \
            "training images/s, evaluation included; the others placed between by their " \
            "FLOPs: a rough figure" in found.line(3)
        assert found.parallel == min(workers, 9, 99 if workers == 99 else 8)
        assert abs(found.seconds - expected) < 1e-9 * expected, (workers, found.seconds, expected)
    _cores(monkeypatch, 2)  # 1 CPU a trial: 2 at a time
    assert estimate.estimate_time(spec, planned, 6).parallel == 2
    # Adaptive seeds: the seeds past `min` are "if open", timed apart as the most it may take.
    rule = {"min": 2, "max": 3, "until": {"width": 0.01}}
    spec, planned = _planned(write_spec(tmp_path, {**raw, "study": "open", "seeds": rule}))
    found = estimate.estimate_time(spec, planned, 2)
    assert found.if_open == 3  # one more seed of each depth
    assert abs(found.seconds - one_each) < 1e-9 * found.seconds
    assert abs(found.if_open_seconds - 1.5 * one_each) < 1e-9 * found.if_open_seconds
    assert f"({estimate._duration(found.if_open_seconds)} if the 3 'if open' trials run too)" \
        in found.line(6)
    bounded = {**raw, "study": "bounded", "budget": {"minutes": found.seconds / 120}}
    spec, planned = _planned(write_spec(tmp_path, bounded))
    line = estimate.estimate_time(spec, planned, 2).line(9)
    assert f"budget.minutes stops the run at {found.seconds / 120:g} min" in line, line


def test_the_dry_run_times_a_trials_training_here_and_prints_the_estimate(tmp_path, capsys):
    raw = raw_spec("estimated", seeds=2)
    assert main(["run", str(write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path),
                 "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "timing the training of resnet8-cifar-A here for the estimate" in err
    (line,) = [line for line in out.splitlines() if line.startswith("time: ")]
    assert "for the 4 trials to run, 2 at a time" in line and "training images/s" in line, line
    # One architecture timed: no "first" of one, nothing "between".
    assert "(resnet8-cifar-A timed here at " in line and "; the others scaled by their FLOPs: " \
        "a rough figure" in line and "first" not in line, line
    assert not list(tmp_path.glob("*.db"))  # a dry run only reads


def test_a_crowded_dry_run_warns_as_run_would_and_says_the_trials_share_the_cores(
        tmp_path, capsys, monkeypatch):
    """4 workers of 4 CPUs on 2 cores: `run` starts all 4 (its Ray holds workers x cpus CPUs)
    and warns; the dry run printed "1 at a time" and no warning (an audit)."""
    _cores(monkeypatch, 2)
    raw = raw_spec("crowded", seeds=2, resources={"cpus": 4, "workers": 4})
    assert main(["run", str(write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("warning: 4 worker(s) x resources.cpus=4 = 16 CPUs on a machine with 2 core(s): "
            "trials will share cores") in out
    (line,) = [line for line in out.splitlines() if line.startswith("time: ")]
    assert "for the 4 trials to run, 4 at once, timed as if 1 at a time (trials sharing cores " \
        "or a GPU not counted faster), on this machine's 2 CPUs (" in line, line
    # Within the cores: no warning, and as many at a time as start
    raw = raw_spec("roomy", seeds=2, resources={"cpus": 1, "workers": 2})
    assert main(["run", str(write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "2 at a time on this machine's 2 CPUs" in out, out


def test_the_estimate_and_the_warning_count_the_cores_this_process_may_use(tmp_path, capsys,
                                                                        monkeypatch):
    """A machine of 16 cores of which this process may use 2 (taskset, a container's cpuset):
    both the estimate and the warning count 2 (the estimate counted 16)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    raw = raw_spec("pinned", seeds=2, resources={"cpus": 2, "workers": 4})
    assert main(["run", str(write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "= 8 CPUs on a machine with 2 core(s)" in out
    assert "timed as if 1 at a time" in out and "on this machine's 2 CPUs" in out, out


def test_trials_packed_on_gpus_start_as_many_at_once_as_their_shares_hold(tmp_path,
                                                                          monkeypatch):
    import torch

    from resnet_ablate.spec import load_spec
    from resnet_ablate.study import estimate

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # (A fraction of a GPU shares one GPU: 0.4 holds 2 on each, 4 on two GPUs, not 5.)
    for gpus, workers, trials, at_once in ((0.25, 16, 20, 8), (0.25, 3, 20, 3), (0.5, 8, 3, 3),
                                           (1, 8, 20, 2), (0.4, 8, 20, 4), (0.3, 16, 20, 6)):
        raw = raw_spec(f"packed-{workers}-{trials}-{str(gpus).replace('.', '-')}",
                       resources={"cpus": 1, "gpus": gpus, "workers": workers})
        spec = load_spec(write_spec(tmp_path, raw))
        assert estimate._at_once(spec, workers, trials, on_gpu=True) == at_once, (gpus, workers)


def test_the_estimate_says_why_where_it_is_not_made(tmp_path, monkeypatch):
    """Streamed data (the loader is not probed), data-parallel trials, GPU trials on a machine
    without one, a probe too large for a CPU, nothing left to run: one line saying so."""
    import torch

    from resnet_ablate.study import estimate

    from resnet_ablate.spec import load_spec

    shard = write_shard(tmp_path / "train-000.tar", labelled_images("x", 3, 2))
    cases = {
        "streamed data set": raw_spec("streamed", dataset={
            "name": "webdataset", "image_size": 24, "loader_workers": 0,
            "shards": {"train": str(shard), "val": str(shard), "num_classes": 3}}),
        "data-parallel": raw_spec("dp", resources={"cpus": 1, "replicas": 2, "workers": 1}),
        "on GPUs": raw_spec("gpu", resources={"cpus": 1, "gpus": 1, "workers": 1}),
        "would take minutes": raw_spec("big", model={"family": "cifar", "depth": 110},
                                       train={"epochs": 2, "batch_size": 4096}),
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for reason, raw in cases.items():
        # (A GPU study is planned only where Ray finds GPUs: its CPU twin's plan stands in.)
        cpu_twin = {**raw, "study": f"{raw['study']}-cpu", "resources": {"cpus": 1}}
        _, planned = _planned(write_spec(tmp_path, cpu_twin))
        spec = load_spec(write_spec(tmp_path, raw))
        found = estimate.estimate_time(spec, planned, 1)
        assert isinstance(found, str) and found.startswith("time: not estimated") \
            and reason in found, (reason, found)
    spec, planned = _planned(write_spec(tmp_path, raw_spec("none-left")))
    assert estimate.estimate_time(spec, [], 1) == "time: nothing to run"
    assert estimate.estimate_time(spec, planned, 1, cluster=True).startswith(
        "time: not estimated for a cluster (--address)")
