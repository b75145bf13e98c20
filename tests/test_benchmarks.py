"""The benchmarks run end to end in their small CPU mode and write the ratios they print."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:  # as when the script runs: its folder is importable
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_batch_norm_benchmark_small_mode_writes_ratios(tmp_path, capsys):
    bench = _load("bench_batch_norm_act")
    out = tmp_path / "bn.csv"
    assert bench.main(["--small", "--no-compile", "--reps", "2", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    # 2 shapes x 2 layouts x 3 passes
    assert len(rows) == 12
    for row in rows:
        ratio = float(row["eager_ms"]) / float(row["fused_ms"])
        assert float(row["speedup_vs_eager"]) == pytest.approx(ratio, rel=1e-2)
        assert row["device"] and row["torch"] and row["triton"]
    assert "vs eager" in capsys.readouterr().out


def test_train_step_benchmark_small_mode_writes_ratios(tmp_path):
    bench = _load("bench_train_step")
    out = tmp_path / "train_step.csv"
    rows = bench.main(["--small", "--models", "resnet56", "--providers", "unfused", "fused",
                       "--iters", "1", "--warmup", "0", "--csv", str(out)])
    written = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in written] == ["unfused", "fused"] == [r.provider for r in rows]
    baseline = float(written[0]["ms_median"])
    for row in written:
        assert float(row["ratio_vs_unfused"]) == pytest.approx(baseline / float(row["ms_median"]),
                                                              rel=1e-2)


def test_trial_benchmark_small_mode_writes_ratios_against_the_plain_loop(tmp_path, capsys):
    bench = _load("bench_trial")
    out = tmp_path / "trial.csv"
    rows = bench.main(["--small", "--repeats", "1", "--variants", "plain", "project",
                       "project+compile", "--compile-backend", "aot_eager", "--csv", str(out)])
    written = list(csv.DictReader(out.open()))
    assert [r["variant"] for r in written] == ["plain", "project", "project+compile"]
    assert [r["variant"] for r in rows] == [r["variant"] for r in written]
    plain = float(written[0]["images_per_second"])
    for row in written:
        assert float(row["ratio_vs_plain"]) == pytest.approx(
            float(row["images_per_second"]) / plain, rel=1e-2)
        assert row["device"].startswith("cpu") and row["precision"] == "fp32"
    assert float(written[2]["compile_seconds"]) > 0
    assert "vs plain" in capsys.readouterr().out


def test_loader_benchmark_writes_loader_and_step_rates_and_their_ratio(tmp_path, capsys):
    bench = _load("bench_loader")
    out = tmp_path / "loader.csv"
    assert bench.main(["--image-size", "32", "--batch-size", "8", "--batches", "2",
                       "--workers", "0", "1", "--csv", str(out)]) == 0
    written = list(csv.DictReader(out.open()))
    assert [int(r["loader_workers"]) for r in written] == [0, 1]
    for row in written:
        ratio = float(row["loader_images_per_s"]) / float(row["step_images_per_s"])
        assert float(row["loader_over_step"]) == pytest.approx(ratio, rel=2e-2)
    assert "loader/step" in capsys.readouterr().out


@pytest.mark.slow
def test_data_parallel_benchmark_times_both_ways_of_running_a_trial(tmp_path, capsys):
    bench = _load("bench_data_parallel")
    out = tmp_path / "data_parallel.csv"
    assert bench.main(["--depth", "8", "--epochs", "1", "--csv", str(out)]) == 0
    one, many = list(csv.DictReader(out.open()))
    assert (int(one["replicas"]), int(many["replicas"])) == (1, 2)
    for row in (one, many):
        overhead = float(row["call_seconds"]) - float(row["training_seconds"])
        assert float(row["overhead_seconds"]) == pytest.approx(overhead, abs=0.02)
        assert 0 <= float(row["final_test_error"]) < 0.9  # trained, not guessing (0.9)
    assert "2 replicas vs one process" in capsys.readouterr().out


def test_quickstart_benchmark_times_the_whole_command_and_the_trials_inside_it(tmp_path, capsys):
    from helpers import raw_spec, write_spec

    bench = _load("bench_quickstart")
    spec = write_spec(tmp_path, raw_spec("bench_quickstart", epochs=1, seeds=1))
    out = tmp_path / "quickstart.csv"
    rows = bench.main([str(spec), "--repeats", "1", "--csv", str(out)])
    (row,) = list(csv.DictReader(out.open()))
    assert int(row["trials"]) == 2 == rows[0]["trials"]  # shortcut A and none, one seed
    command, study, training = (float(row[k]) for k in
                                ("command_seconds", "study_seconds", "training_seconds_sum"))
    # The command holds the study, which holds its trials' training (2 trials over 2 workers).
    assert command > study > training / 2 > 0
    assert "median" in capsys.readouterr().out


def test_adaptive_seeds_benchmark_small_mode_writes_each_design(tmp_path):
    bench = _load("bench_adaptive_seeds")
    out = tmp_path / "adaptive.csv"
    rows = bench.main(["--small", "--csv", str(out)])
    written = list(csv.DictReader(out.open()))
    assert len(written) == len(rows) == 4
    for row in written:
        shares = float(row["differs"]) + float(row["equivalent"]) + float(row["open"])
        assert shares == pytest.approx(1.0)
        seeds = float(row["seeds_per_configuration"])
        assert (seeds == 3) if row["design"] == "fixed 3" else (2 <= seeds <= 10)
