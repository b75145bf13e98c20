"""The benchmarks run end to end in their small CPU mode and write the ratios they print; the GPU
check's summary reads those rows into the right ratios, verdicts and Table 6 projection."""

import csv
import importlib.util
import math
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:  # as when the script runs: its folder is importable
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


_HELP_OF_EVERY_SCRIPT = """
import contextlib, io, pathlib, runpy, sys
sys.path.insert(0, "benchmarks")  # as when a script runs: its folder is importable
failed = []
for path in sorted(pathlib.Path("benchmarks").glob("[!_]*.py")):
    if 'if __name__ == "__main__":' not in path.read_text():
        continue  # a helper the scripts import
    sys.argv = [str(path), "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
        failed.append(f"{path}: ran without stopping at --help")
    except SystemExit as stop:
        if stop.code not in (0, None):
            failed.append(f"{path}: exit {stop.code}")
    except Exception as error:
        failed.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports_and_answers_help():
    """calibrate_pivot.py imported `resnet_ablate.pivot`, which 0.3.0 moved into
    `resnet_ablate.stats`, and nothing ran it: every script's --help runs here, in one process."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", _HELP_OF_EVERY_SCRIPT], cwd=BENCHMARKS.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_batch_norm_benchmark_small_mode_writes_ratios(tmp_path, capsys):
    bench = _load("bench_batch_norm_act")
    out = tmp_path / "bn.csv"
    assert bench.main(["--small", "--no-compile", "--reps", "2", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    # 3 shapes (one without a residual) x 2 layouts x 3 passes
    assert len(rows) == 18
    assert {row["residual"] for row in rows} == {"True", "False"}
    for row in rows:
        ratio = float(row["eager_ms"]) / float(row["fused_ms"])
        assert float(row["speedup_vs_eager"]) == pytest.approx(ratio, rel=1e-2)
        assert row["device"] and row["torch"] and row["triton"]
        assert re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?", row["commit"]), row["commit"]
        assert float(row["peak_memory_mb"]) > 0
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
    rows = bench.main(["--small", "--cases", "resnet20-8px", "--repeats", "1", "--variants",
                       "plain", "tuned", "tuned+kernels", "project", "project+compile",
                       "--compile-backend", "aot_eager", "--csv", str(out)])
    written = list(csv.DictReader(out.open()))
    variants = ["plain", "tuned", "tuned+kernels", "project", "project+compile"]
    assert [r["variant"] for r in written] == variants == [r["variant"] for r in rows]
    plain, tuned = (float(written[i]["images_per_second"]) for i in (0, 1))
    # Each row written as its variant ends: plain's, the first, has no tuned rate to compare with
    assert written[0]["ratio_vs_tuned"] == ""
    for row in written:
        rate = float(row["images_per_second"])
        assert float(row["ratio_vs_plain"]) == pytest.approx(rate / plain, rel=1e-2)
        if row is not written[0]:
            assert float(row["ratio_vs_tuned"]) == pytest.approx(rate / tuned, rel=1e-2)
        assert row["device"].startswith("cpu") and row["precision"] == "fp32"
        assert float(row["peak_memory_mb"]) > 0 and row["timed_epochs"] == "1"
    # Only the plain loop is NCHW; the hand-tuned loops are channels_last like the project's.
    assert [r["memory_format"] for r in written] == ["nchw"] + ["channels_last"] * 4
    assert float(written[4]["compile_seconds"]) > 0
    assert "vs plain" in capsys.readouterr().out


def test_a_trials_rate_leaves_out_its_first_epoch_where_there_are_more():
    """The first epoch holds a trial's one-off costs (a CUDA graph's warm-up and capture)."""
    bench = _load("bench_trial")
    assert bench.steady_rate(100, [5.0, 1.0, 1.0]) == pytest.approx(100.0)
    assert bench.steady_rate(100, [4.0]) == pytest.approx(25.0)  # the only one


def test_graph_rounds_replay_the_graphs_in_turn_and_give_milliseconds_per_call(monkeypatch):
    """_gpu_timing's rounds on stand-ins for CUDA events and graphs (a clock each replay
    advances by its graph's milliseconds): each graph's time per captured call, round by round,
    the graphs replayed in turn (so that a cold time's two graphs see the same drift)."""
    timing = _load("_gpu_timing")
    clock, order = [0.0], []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class Graph:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def replay(self):
            order.append(self.name)
            clock[0] += self.ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    flushed, flushes = Graph("flushed", 12.0), Graph("flushes", 10.0)
    rounds = timing._rounds_ms((flushed, flushes))
    assert rounds == [[12.0 / timing.CALLS] * timing.ROUNDS, [10.0 / timing.CALLS] * timing.ROUNDS]
    # One upload each, then each round replays one graph REPLAYS times, then the other
    assert order[:2] == ["flushed", "flushes"]
    round_order = ["flushed"] * timing.REPLAYS + ["flushes"] * timing.REPLAYS
    assert order[2:] == round_order * timing.ROUNDS


def test_loader_benchmark_writes_loader_and_step_rates_and_their_ratio(tmp_path, capsys):
    bench = _load("bench_loader")
    out, decode = tmp_path / "loader.csv", tmp_path / "loader_decode.csv"
    assert bench.main(["--image-size", "32", "--batch-size", "8", "--batches", "2",
                       "--workers", "0", "1", "--csv", str(out), "--decode-seconds", "0.1",
                       "--gpu-images-per-s", "1000", "--decode-csv", str(decode)]) == 0
    # (Where simplejpeg is installed, decode-only rows follow: parts of a crop, no cores per GPU.)
    cases = [r for r in csv.DictReader(decode.open()) if not r["case"].startswith("decode only")]
    assert [r["case"] for r in cases] == ["two-step float", "box-first float", "box-first uint8"]
    for row in cases:  # the cores a GPU at 1,000 images/s needs, from the rate per core
        assert int(row["cores_per_gpu"]) == math.ceil(1000 / float(row["crops_per_s_per_core"]))
        assert int(row["image_size"]) == 224  # at the training size, whatever the loader's
        assert float(row["ms_per_crop"]) == pytest.approx(1000 / float(row["crops_per_s_per_core"]),
                                                          rel=1e-2)
    written = list(csv.DictReader(out.open()))
    assert [int(r["loader_workers"]) for r in written] == [0, 1]
    for row in written:
        ratio = float(row["loader_images_per_s"]) / float(row["step_images_per_s"])
        assert float(row["loader_over_step"]) == pytest.approx(ratio, rel=2e-2)
        fed = float(row["fed_images_per_s"]) / float(row["step_images_per_s"])
        assert float(row["fed_over_step"]) == pytest.approx(fed, rel=2e-2)
        assert row["step_precision"] == "fp32"  # the trial's on a CPU
    printed = capsys.readouterr().out
    assert "loader/step" in printed and "224px crops/s per core" in printed
    assert "training fed by the loader" in printed
    # A pass is timed after its workers' first round: batches must outnumber the workers
    with pytest.raises(SystemExit, match="--batches 2 leaves no batch to time after the 2 of 2"):
        bench.main(["--image-size", "32", "--batch-size", "8", "--batches", "2", "--workers",
                    "2", "--csv", str(out), "--decode-seconds", "0"])


@pytest.mark.slow
def test_data_parallel_benchmark_times_both_ways_of_running_a_trial(tmp_path, capsys,
                                                                     monkeypatch):
    """Its rows and ratios. The 2 replicas' trial is stood in for by the same trial in one process
    (on Ray Train it takes 25 s here, nearly all Ray Train's start; test_data_parallel.py trains
    such trials for real through `run_data_parallel_trial`, called as the driver calls it): the
    stand-in takes the arguments the real one would."""
    import dataclasses
    import inspect

    bench = _load("bench_data_parallel")
    real = bench.run_data_parallel_trial

    class OneProcess:
        @staticmethod
        def remote(task, board):
            inspect.signature(real._function).bind(task, board)
            assert task.replicas == 2 and task.cpus_per_replica == task.threads
            alone = dataclasses.replace(task, replicas=1, threads=task.threads * task.replicas)
            return bench.run_trial.options(num_cpus=alone.threads).remote(alone, board)

    monkeypatch.setattr(bench, "run_data_parallel_trial", OneProcess)
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


# ---------------------------------------------------------------------------------------------
# The GPU check's summary (benchmarks/gpu_summary.py) and the rows it reads.


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_appended_rows_with_new_columns_widen_the_file_and_keep_its_older_rows(tmp_path):
    results = _load("_results")
    path = tmp_path / "figures.csv"
    results.append_rows(path, [{"case": "a", "ms": 1.5}])
    results.append_rows(path, [{"case": "b", "ms": 2.5, "peak_memory_mb": 10.0}])
    results.append_rows(path, [{"case": "c", "ms": 3.5}])  # a column it lacks stays blank
    assert list(csv.DictReader(path.open())) == [
        {"case": "a", "ms": "1.5", "peak_memory_mb": ""},
        {"case": "b", "ms": "2.5", "peak_memory_mb": "10.0"},
        {"case": "c", "ms": "3.5", "peak_memory_mb": ""},
    ]


def test_ratio_verdicts_compare_the_measured_value_with_the_goal_in_its_direction():
    summary = _load("gpu_summary")
    assert summary.Ratio("r", 1.2, ">= 1.1", "").verdict == "met"
    assert summary.Ratio("r", 1.0, ">= 1.1", "").verdict == "missed"
    assert summary.Ratio("r", 25.0, "<= 30", "").verdict == "met"
    assert summary.Ratio("r", 31.0, "<= 30", "").verdict == "missed"
    assert summary.Ratio("r", None, "<= 30", "").verdict == "not measured"
    assert summary.Ratio("r", 2.0, "", "").verdict == "-"


def _count_multiply_adds(model: nn.Module, image: torch.Tensor) -> int:
    """Multiply-adds of every convolution and linear layer, counted from the layers' outputs."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] \
                * module.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(image)
    return total


@pytest.mark.parametrize("depth", [20, 56])
def test_the_closed_form_multiply_adds_match_the_built_cifar_resnet(depth):
    from resnet_ablate import ResNetArch, build

    summary = _load("gpu_summary")
    model = build(ResNetArch(family="cifar", depth=depth, shortcut="A"), num_classes=10)
    assert summary.cifar_resnet_macs(depth) == _count_multiply_adds(model, torch.zeros(1, 3, 32, 32))


def test_table6_is_the_papers_about_1_4e17_flops():
    summary = _load("gpu_summary")
    # 5 depths x 5 seeds x 164 epochs x 50,000 images, 2 FLOPs per multiply-add, x3 for backward
    assert summary.table6_flops() == pytest.approx(1.44e17, rel=0.01)


def test_seconds_per_image_fits_a_line_in_depth_through_the_measured_depths():
    summary = _load("gpu_summary")
    # 1 ms + 0.1 ms per layer: the line holds at every depth, measured or not
    rates = {d: 1 / (1e-3 + 1e-4 * d) for d in (20, 56, 110)}
    for depth in (20, 32, 44, 110):
        assert summary.seconds_per_image(rates, depth) == pytest.approx(1e-3 + 1e-4 * depth)
    assert summary.seconds_per_image({20: 100.0}, 40) == pytest.approx(2 / 100)
    assert summary.seconds_per_image({}, 20) is None


def test_table6_minutes_add_every_depths_images_and_divide_by_the_packing_gain():
    summary = _load("gpu_summary")
    rates = {20: 10_000.0, 56: 10_000.0, 110: 10_000.0}  # one rate: the line is flat
    images = 5 * 164 * 50_000 * 5  # seeds x epochs x images x depths
    assert summary.table6_minutes(rates) == pytest.approx(images / 10_000 / 60)
    assert summary.table6_minutes(rates, packing_gain=2.0) == pytest.approx(images / 20_000 / 60)


def _trial_rows(rates: dict[tuple[str, str], float]) -> list[dict]:
    return [{"case": case, "variant": variant, "images_per_second": str(rate)}
            for (case, variant), rate in rates.items()]


def test_trial_ratios_are_geometric_means_over_the_cases_where_both_ran():
    summary = _load("gpu_summary")
    rows = _trial_rows({("resnet20-cifar", "plain"): 100, ("resnet20-cifar", "project"): 400,
                        ("resnet56-cifar", "plain"): 100, ("resnet56-cifar", "project"): 100,
                        ("resnet110-cifar", "project"): 50})
    assert summary.trial_ratio(rows, "project", "plain") == pytest.approx(2.0)  # sqrt(4 x 1)
    assert summary.trial_ratio(rows, "project+graphs", "project") is None
    # as a study runs it: project+graphs where measured (resnet56 here), else project
    rows += _trial_rows({("resnet56-cifar", "project+graphs"): 900})
    assert summary.trial_ratio(rows, summary.AS_RUN, "plain") == pytest.approx(6.0)  # sqrt(4 x 9)


def test_rates_by_depth_take_the_fastest_variant_on_the_depths_every_variant_ran():
    summary = _load("gpu_summary")
    rows = _trial_rows({("resnet20-cifar", "project"): 300, ("resnet20-cifar", "project+graphs"): 500,
                        ("resnet56-cifar", "project"): 200, ("resnet50-224", "project"): 9,
                        ("resnet20-cifar", "plain"): 1})
    assert summary.rates_by_depth(rows, ("project", "project+graphs")) == {20: 500.0}
    assert summary.rates_by_depth(rows, ("project",)) == {20: 300.0, 56: 200.0}


def test_broken_steps_are_failed_empty_or_missing_ones_but_not_a_skipped_optional_step():
    summary = _load("gpu_summary")

    def step(name, code="0", rows="3"):
        return {"step": name, "exit_code": code, "seconds": "1", "rows": rows}

    ran = [step(name) for name in summary.REQUIRED_STEPS]
    assert summary.broken_steps(ran + [step("host", "skipped", "0")]) == []
    assert summary.broken_steps(ran + [step("host", "2", "0")]) == ["host"]
    assert summary.broken_steps([*ran[:1], step("trial", "124")]) == [
        *summary.REQUIRED_STEPS[2:], "trial"]
    empty_loader = [step(n, rows="0") if n == "loader" else step(n) for n in summary.REQUIRED_STEPS]
    assert summary.broken_steps(empty_loader) == ["loader"]
    assert summary.broken_steps(ran + [step("host", "no time", "0")]) == ["host"]
    # gpu_check.sh --steps: the steps left out are neither run nor broken
    rerun = [ran[0], *(step(n, "not selected", "0") for n in summary.REQUIRED_STEPS[1:])]
    assert summary.broken_steps(rerun) == []


def test_the_pass_table_gives_each_kernels_median_share_and_its_best_variants_gain():
    summary = _load("gpu_summary")

    def row(shape, kernel, us, pct, default=True, waves="", warps="8", small_layer_steps="",
            rounds=("", "")):
        return {"shape": shape, "pass": kernel, "cold_us": str(us), "pct_copy": str(pct),
                "pct_peak": str(pct / 2), "copy_gbps": "4000", "default": str(default),
                "waves": waves, "num_warps": warps, "small_layer_steps": small_layer_steps,
                "cold_us_low": str(rounds[0]), "cold_us_high": str(rounds[1])}

    # The rounds' spreads 20%, 40% and 10% of the time (a low round below zero counts as it is),
    # and a shape whose median round was floored at zero: noise alone, an infinite share
    rows = [row("a", "statistics", 10, 40, waves="1", rounds=(9, 11)),
            row("b", "statistics", 20, 60, waves="1", rounds=(-2, 6)),
            row("c", "statistics", 30, 90, waves="1", rounds=(27, 30)),
            row("d", "statistics", 0, 50, waves="1", rounds=(-3, 3)),
            row("a", "statistics", 5, 80, default=False, waves="2"),  # 2x on the swept shape
            row("a", "normalize", 8, 70), row("a", "normalize", 10, 56, default=False, warps="4")]
    lines = summary.pass_table(rows)
    assert "| statistics | 55 | 27.5 | 2 waves, 8 warps | 2 | 30 |" in lines
    floored = [row("d", "normalize", 0, 50, rounds=(-3, 3))]
    assert summary.pass_table(floored)[4] == "| normalize | 50 | 25 | - | - | inf |"
    # the planned launch was the best; rows from before the rounds were recorded show no spread
    assert "| normalize | 70 | 35 | 8 warps | 1 | - |" in lines
    assert "4,000 GB/s" in lines[0]
    assert summary.pass_table([]) == []
    # The statistics pass of a small layer at one wave, as before SMALL_LAYER_STEPS, is named so
    one_wave = [row("a", "statistics", 10, 40, waves="1", small_layer_steps="2"),
                row("a", "statistics", 8, 50, default=False, waves="1", small_layer_steps="1")]
    lines = summary.pass_table(one_wave)
    assert ("| statistics | 40 | 20 | 1 wave, 8 warps, whatever the layer's size | 1.25 | - |"
            in lines)
    assert ("The statistics pass of a small layer at one wave whatever its size takes 0.8x the "
            "time of its planned fewer programs (SMALL_LAYER_STEPS; median over 1 shape: a "
            "0.8x).") in lines


def test_summary_reads_a_runs_csvs_into_ratios_verdicts_and_the_packing_to_set(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "machine.txt").write_text("NVIDIA H200, 143771 MiB, 580.159.03\ntorch 2.11.0\n")
    cases = {"resnet20-cifar": 1.0, "resnet56-cifar": 2.8, "resnet110-cifar": 5.4}
    _write_csv(tmp_path / "trial.csv", [
        {"case": case, "variant": variant, "images_per_second": rate / cost}
        for case, cost in cases.items()
        for variant, rate in (("plain", 5_000), ("tuned", 20_000), ("tuned+kernels", 24_000),
                              ("project", 24_000), ("project+graphs", 48_000))])
    _write_csv(tmp_path / "packing.csv", [
        {"trials_per_device": n, "aggregate_images_per_s": rate, "speedup_vs_one_trial": rate / 100}
        for n, rate in ((1, 100), (2, 180), (4, 250), (8, 240))])
    _write_csv(tmp_path / "steps.csv", [
        {"step": name, "exit_code": "0", "seconds": "10", "rows": "4", "file": ""}
        for name in summary.REQUIRED_STEPS])
    figures = {r.name: r for r in summary.ratios(tmp_path)}
    assert figures["tuned / plain"].value == pytest.approx(4.0)
    assert figures["tuned+kernels / tuned"].value == pytest.approx(1.2)
    assert figures["tuned+kernels / tuned"].verdict == "met"
    assert figures["project+graphs / project"].value == pytest.approx(2.0)
    assert figures["packing: best aggregate / one trial"].value == pytest.approx(2.5)
    # project+graphs at 48,000 / cost images/s, packed 2.5x; the plain loop at 5,000 / cost
    per_image = {d: summary.seconds_per_image({20: 48_000, 56: 48_000 / 2.8, 110: 48_000 / 5.4}, d)
                 for d in summary.TABLE6_DEPTHS}
    expected = sum(per_image.values()) * 5 * 164 * 50_000 / 2.5 / 60
    assert figures["Table 6, project (minutes)"].value == pytest.approx(expected)
    assert figures["Table 6, plain loop (minutes)"].value == pytest.approx(expected * 2.5 * 48 / 5)
    text = summary.summary_markdown(tmp_path)
    assert text.startswith("# GPU check: NVIDIA H200")
    assert "| tuned+kernels / tuned | 1.2 | >= 1.1 | met |" in text
    assert "PackingMeasurement('NVIDIA H200', 4, 2.50, cuda_graphs=False)" in text
    # 50,000 images per epoch: ResNet-20's project+graphs at 48,000 images/s, its plain at 5,000
    assert "| project (fastest of project, project+graphs) | 1.04 (m) |" in text
    assert "| plain loop | 10 (m) |" in text
    assert "Every step wrote its rows." in text


def test_the_dry_run_recommends_the_fastest_packing_measured_for_small_gpu_trials():
    from resnet_ablate.study.advice import PackingMeasurement, fastest_packing, packing_advice

    assert fastest_packing({1: 100.0, 2: 180.0, 4: 250.0, 8: 240.0}) == 4
    assert fastest_packing({1: 100.0, 2: 100.0}) == 1  # no gain: the fewest
    with pytest.raises(ValueError, match="no packing measured"):
        fastest_packing({})
    h200 = PackingMeasurement("NVIDIA H200", 4, 2.5, cuda_graphs=False)
    h200_graphs = PackingMeasurement("NVIDIA H200", 2, 1.2, cuda_graphs=True)
    (line,) = packing_advice(1.0, 1, 1, 32, False, [h200, h200_graphs])
    assert "4 ResNet-56 trials per GPU of 1 CPU thread each (without CUDA graphs" in line
    assert "resources.gpus: 0.25 and workers: 4 per GPU (this spec has 1)" in line
    assert line.endswith("(this spec has 1)")  # its CPUs as measured: nothing said of them
    (line,) = packing_advice(1.0, 1, 1, 32, True, [h200, h200_graphs])  # the trials' own kind
    assert "2 ResNet-56 trials per GPU of 1 CPU thread each (with CUDA graphs" in line
    assert "resources.gpus: 0.5" in line
    # Through MPS or not, each line says which, and the MPS one how to start its daemon
    through_mps = PackingMeasurement("NVIDIA H200", 4, 3.0, cuda_graphs=True, mps=True)
    lines = packing_advice(1.0, 1, 1, 32, True, [h200_graphs, through_mps])
    assert len(lines) == 2 and "; without MPS)" in lines[0]
    assert ("; through CUDA's MPS, whose daemon must run on the node: nvidia-cuda-mps-control -d)"
            in lines[1] and "3.00x" in lines[1])
    assert "as this spec has" in packing_advice(0.25, 1, 1, 32, False, [h200])[0]
    # A spec whose trials run more threads than the measured ones is told what their CPUs add
    # up to on a GPU; 1.5 CPUs run one thread, as measured: nothing said
    (line,) = packing_advice(0.25, 4, 1, 32, False, [h200])
    assert line.endswith("workers: 4 per GPU (as this spec has); this spec's cpus: 4 make 16 "
                         "CPUs a GPU for 4 trials, where they were measured at 1 each")
    assert packing_advice(0.25, 1.5, 1, 32, False, [h200])[0].endswith("(as this spec has)")
    wider = PackingMeasurement("NVIDIA H100", 8, 2.0, cuda_graphs=False, cpus=2, model="ResNet-20")
    (line,) = packing_advice(1.0, 2, 1, 32, False, [wider])
    assert "8 ResNet-20 trials per GPU of 2 CPU threads each" in line and "CPUs a GPU" not in line
    assert "no packing of trials with CUDA graphs is measured yet" in packing_advice(
        1.0, 1, 1, 32, True, [h200])[0]
    # CPU trials, data-parallel trials and large images get no packing advice
    assert packing_advice(0.0, 1, 1, 32, False, [h200]) == []
    assert packing_advice(2.0, 1, 2, 32, False, [h200]) == []
    assert packing_advice(1.0, 1, 1, 224, False, [h200]) == []


def _mps_control_stand_in(tmp_path, monkeypatch, starts=True):
    """A stand-in for the driver's control program on the PATH: logs its arguments, stdin and
    pipe folder; `-d` (start) makes the pipe and a server log the daemon would make (or fails,
    with `starts=False`), `quit` removes the pipe."""
    log = tmp_path / "calls"
    control = tmp_path / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir()
    start = ('touch "$CUDA_MPS_PIPE_DIRECTORY/control"; '
             'echo "server: no GPU here" > "$CUDA_MPS_LOG_DIRECTORY/server.log"'
             if starts else "exit 1")
    control.write_text(f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY" >> {log}\n'
                       f'if [ "$1" = -d ]; then {start}; '
                       f'else cat >> {log}; rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"; fi\n')
    control.chmod(0o755)
    monkeypatch.setenv("PATH", f"{control.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    return log


def test_packing_through_mps_starts_the_daemon_for_the_trials_and_stops_it(tmp_path, monkeypatch):
    bench = _load("bench_packing")
    log = _mps_control_stand_in(tmp_path, monkeypatch)
    folder = str(tmp_path / "mps")
    probed = []
    with bench.mps_daemon(folder=folder, probe=lambda env: probed.append(env) or True) as running:
        assert running
        assert probed[0]["CUDA_MPS_PIPE_DIRECTORY"] == folder  # the probe goes through it
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == folder  # what the spawned trials inherit
        assert log.read_text() == f"args=-d pipe={folder}\n"
    assert log.read_text() == f"args=-d pipe={folder}\nargs= pipe={folder}\nquit\n"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(folder)
    monkeypatch.setenv("PATH", str(tmp_path))  # no control program: one clear error
    with pytest.raises(SystemExit, match="nvidia-cuda-mps-control is not on the PATH"):
        with bench.mps_daemon(folder=folder):
            pass


@pytest.mark.parametrize("starts", [True, False], ids=["probe-fails", "daemon-fails"])
def test_a_daemon_left_behind_is_stopped_first_and_one_that_fails_is_not_used(
        tmp_path, monkeypatch, capsys, starts):
    """Every command names the run's own pipe folder (never the system's daemon, whose pipe is
    the default), a daemon a killed run left is stopped first, and a daemon that does not start,
    or through which no process starts CUDA, is stopped (once) and its log printed; the trials
    then run without MPS."""
    bench = _load("bench_packing")
    log = _mps_control_stand_in(tmp_path, monkeypatch, starts=starts)
    folder = tmp_path / "mps"
    folder.mkdir()
    (folder / "control").touch()  # the pipe of a daemon that a killed run left
    with bench.mps_daemon(folder=str(folder), probe=lambda env: False) as running:
        assert not running and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    stopped_then_started = [f"args= pipe={folder}", "quit", f"args=-d pipe={folder}"]
    stopped_again = [f"args= pipe={folder}", "quit"] if starts else []
    assert log.read_text().splitlines() == stopped_then_started + stopped_again
    err = capsys.readouterr().err
    assert "the trials share the GPU without it" in err
    assert ("server: no GPU here" if starts else "(no log written)") in err


def test_a_run_ended_by_sigterm_still_stops_the_daemon(tmp_path, monkeypatch):
    """gpu_check.sh ends a step past its limit with SIGTERM: the daemon, in a session of its own,
    would outlive the run unless `quit` is sent then too."""
    import signal
    import subprocess

    log = _mps_control_stand_in(tmp_path, monkeypatch)
    folder = tmp_path / "mps"
    script = (f"import sys, time; sys.path.insert(0, {str(BENCHMARKS)!r}); import bench_packing\n"
              f"with bench_packing.mps_daemon(folder={str(folder)!r}, probe=lambda env: True):\n"
              f"    print('running', flush=True); time.sleep(60)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "running\n"
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert log.read_text().splitlines()[-2:] == [f"args= pipe={folder}", "quit"]
    assert not folder.exists()


def test_the_summarys_packing_entry_names_the_threads_and_model_its_trials_ran():
    summary = _load("gpu_summary")
    rows = [{"trials_per_device": "1", "model": "resnet20", "threads_per_trial": "2"},
            {"trials_per_device": "4", "model": "resnet20", "threads_per_trial": "2"}]
    assert summary.packing_entry("NVIDIA H100 80GB HBM3", rows, (4, 2.5), True, True) == (
        "    PackingMeasurement('NVIDIA H100 80GB HBM3', 4, 2.50, cuda_graphs=True, mps=True, "
        "cpus=2, model='ResNet-20')")
    # Rows from before the threads column, of ResNet-56: the entry's defaults, left unsaid
    older = [{"trials_per_device": "8", "model": "resnet56"}]
    assert summary.packing_entry("NVIDIA H200", older, (8, 1.1), False, False) == (
        "    PackingMeasurement('NVIDIA H200', 8, 1.10, cuda_graphs=False)")


def test_the_summary_keeps_packing_through_mps_apart_and_projects_with_the_better(tmp_path):
    summary = _load("gpu_summary")
    (tmp_path / "machine.txt").write_text("NVIDIA H200, 143771 MiB, 580.159.03\n")
    _write_csv(tmp_path / "trial.csv", [
        {"case": f"resnet{d}-cifar", "variant": "project+graphs", "images_per_second": 10_000}
        for d in (20, 56, 110)])
    _write_csv(tmp_path / "packing.csv", [
        {"trials_per_device": n, "aggregate_images_per_s": rate, "speedup_vs_one_trial": gain,
         "cuda_graphs": "True", "mps": mps}
        for mps, points in (("False", ((1, 100, 1.0), (8, 110, 1.1))),
                            ("True", ((1, 100, 1.0), (4, 300, 3.0), (8, 250, 2.5))))
        for n, rate, gain in points])
    figures = {r.name: r for r in summary.ratios(tmp_path)}
    assert figures["packing: best aggregate / one trial"].value == pytest.approx(1.1)
    assert figures["packing through MPS: best aggregate / one trial"].value == pytest.approx(3.0)
    table6 = figures["Table 6, project (minutes)"]
    assert table6.value == pytest.approx(summary.table6_minutes({20: 1e4, 56: 1e4, 110: 1e4}) / 3)
    assert "through MPS" in table6.meaning
    text = summary.summary_markdown(tmp_path)
    assert "PackingMeasurement('NVIDIA H200', 8, 1.10, cuda_graphs=True)" in text
    assert "PackingMeasurement('NVIDIA H200', 4, 3.00, cuda_graphs=True, mps=True)" in text


def test_the_summary_takes_each_loader_ratio_at_its_best_workers_for_each_decode(tmp_path):
    """loader / step and training fed by the loader / step alone, each the best over workers,
    for decode cpu (rows from before the decode column count as cpu) and gpu apart; rows from
    before the fed column leave it out."""
    summary = _load("gpu_summary")
    (tmp_path / "machine.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    _write_csv(tmp_path / "loader.csv", [
        {"decode": "", "loader_over_step": "1.4", "fed_over_step": ""},  # an older row
        {"decode": "cpu", "loader_over_step": "0.8", "fed_over_step": "0.7"},
        {"decode": "cpu", "loader_over_step": "1.2", "fed_over_step": "0.9"},
        {"decode": "gpu", "loader_over_step": "2.0", "fed_over_step": "0.97"},
        {"decode": "gpu", "loader_over_step": "1.5", "fed_over_step": "0.99"}])
    ratios = summary.ratios(tmp_path)
    figures = {r.name: r.value for r in ratios}
    # (With no single trials packed, the project's Table 6 row says it assumes none.)
    table6 = next(r for r in ratios if r.name == "Table 6, project (minutes)")
    assert table6.meaning == "projected, one trial at a time (no packing of single trials measured)"
    assert figures["loader / step (best workers)"] == 1.4
    assert figures["training fed by the loader / step alone (best workers)"] == 0.9
    assert figures["loader / step, decode: gpu (best workers)"] == 2.0
    assert figures["training fed by the loader / step alone, decode: gpu (best workers)"] == 0.99


def test_a_spec_expects_cuda_graphs_where_its_gpu_trials_would_resolve_them():
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study.advice import trials_use_cuda_graphs

    def spec(gpus=0.5, **train):
        return parse_spec({"study": "s", "space": {"depth": [20]}, "resources": {"gpus": gpus},
                           "train": {"epochs": 1, **train}})

    assert trials_use_cuda_graphs(spec())  # auto: a digits trial on a GPU captures its steps
    assert not trials_use_cuda_graphs(spec(cuda_graphs=False))
    assert not trials_use_cuda_graphs(spec(compile=True))  # torch.compile's own business
    assert not trials_use_cuda_graphs(spec(precision="fp16"))  # a gradient scaler's state
    assert not trials_use_cuda_graphs(spec(gpus=0))  # CPU trials


def test_a_packing_row_counts_every_trials_images_over_the_span_they_trained_together():
    bench = _load("bench_packing")
    config = bench.TrialConfig(device="cpu", depth=20, image_size=8, train_images=64, batch=16,
                               epochs=1, cuda_graphs=False, threads=1, lr=0.01)
    timings = [bench.TrialTiming(10.0, 12.0, 64, 40.0, 100.0),
               bench.TrialTiming(10.5, 14.0, 64, 20.0, 120.0)]
    row = bench.packing_row(config, 2, timings, one_trial_rate=16.0)
    assert row["aggregate_images_per_s"] == pytest.approx(128 / 4)  # 10.0 to 14.0
    assert row["speedup_vs_one_trial"] == pytest.approx(2.0)
    assert row["per_trial_images_per_s"] == pytest.approx(30.0)
    assert (row["gpus_per_trial"], row["peak_memory_mb"]) == (0.5, 120.0)


def test_a_packed_trial_is_timed_from_its_first_epochs_end_over_the_later_epochs():
    """timed_run: a stack of 2 seeds, 3 epochs of 64 images a seed; the first epoch (12 s of
    training, a graph's capture in it) left out: 2 seeds x 2 epochs x 64 images over the later
    epochs' 2 + 2 s of training, from the first epoch's end."""
    import types

    from resnet_ablate.record import EpochRecord

    bench = _load("bench_packing")
    history = tuple(EpochRecord(epoch=e, lr=0.1, train_loss=1.0, train_error=0.5, test_loss=1.0,
                                test_error=0.5, seconds=s + 1, train_seconds=s)
                    for e, s in ((1, 12.0), (2, 2.0), (3, 2.0)))
    seed_rate = 3 * 64 / 16.0  # each seed's images/s over the whole run, as train_seeds gives
    trained = [types.SimpleNamespace(history=history, images_per_second=seed_rate)] * 2
    timing = bench.timed_run(trained, first_epoch_end=113.0, started=100.0, finished=120.0,
                             peak_memory=5.0)
    assert (timing.started, timing.finished, timing.images) == (113.0, 120.0, 2 * 2 * 64)
    assert timing.images_per_second == pytest.approx(256 / 4.0)
    one_seed = bench.timed_run(trained[:1], first_epoch_end=113.0, started=100.0,
                               finished=120.0, peak_memory=5.0)
    assert (one_seed.images, one_seed.images_per_second) == (2 * 64, 32.0)
    # One epoch only: all of it, from the start
    alone = bench.timed_run([types.SimpleNamespace(history=history[:1], images_per_second=4.0)],
                            first_epoch_end=0.0, started=100.0, finished=120.0, peak_memory=5.0)
    assert (alone.started, alone.images, alone.images_per_second) == (100.0, 48, 4.0)


def test_host_figures_pair_each_layers_fused_and_eager_rows():
    summary = _load("gpu_summary")
    layer = {"model": "resnet56", "layout": "channels_last", "dtype": "bf16", "residual": "True"}
    rows = [{**layer, "shape": "128x16x32x32", "provider": "fused", "host_us_fwd_bwd": "30"},
            {**layer, "shape": "128x16x32x32", "provider": "eager", "host_us_fwd_bwd": "60"},
            {**layer, "shape": "128x64x8x8", "provider": "eager", "host_us_fwd_bwd": "50"},
            {**layer, "shape": "128x64x8x8", "provider": "fused", "host_us_fwd_bwd": "100"},
            {**layer, "shape": "128x64x8x8", "provider": "python_function_floor",
             "host_us_fwd_bwd": "1"},
            {**layer, "shape": "128x64x8x8", "provider": "fused_jit_launches",
             "host_us_fwd_bwd": "250"}]
    fused, fused_over_eager, jit_over_direct = summary.host_figures(rows)
    assert fused == [30.0, 100.0] and fused_over_eager == [0.5, 2.0]
    assert jit_over_direct == [2.5]  # only the layer that has both


def test_the_summary_projects_table6_with_each_depths_seeds_stacked(tmp_path):
    """The stacking gain measured at each depth multiplies the trial's own rate there; depths
    measured by the trial but not stacked are left to the line through the stacked ones."""
    summary = _load("gpu_summary")
    (tmp_path / "machine.txt").write_text("NVIDIA H200, 143771 MiB, 580.159.03\n")
    rates = {20: 48_000.0, 56: 18_000.0, 110: 9_000.0}
    _write_csv(tmp_path / "trial.csv", [
        {"case": f"resnet{d}-cifar", "variant": "project+graphs", "images_per_second": rate}
        for d, rate in rates.items()])
    gains = {20: 4.0, 56: 3.0, 110: 2.0}
    # Dense block-diagonal convolutions measured faster: a measurement only, reported apart and
    # left out of the projection (resources.stack_seeds runs grouped ones).
    _write_csv(tmp_path / "seed_stack.csv", [
        {"depth": d, "seeds": 1, "convolutions": "", "ratio_vs_one_seed": 1.0}
        for d in (20, 56, 110)] + [
        {"depth": d, "seeds": 5, "convolutions": convolutions,
         "ratio_vs_one_seed": gains[d] * (1.5 if convolutions == "dense" else 1.0)}
        for d in (20, 56, 110) for convolutions in ("grouped", "dense")])
    # Stacks of 5 packed 4 to the GPU trained 2x one stack; single trials packed gained 1.5x:
    # each kind's gain applies to its own projection only.
    _write_csv(tmp_path / "packing.csv", [
        {"mps": "True", "cuda_graphs": "True", "stack_seeds": stack, "trials_per_device": n,
         "aggregate_images_per_s": rate, "speedup_vs_one_trial": rate / base}
        for stack, base, gains_by_n in ((5, 100.0, {1: 1.0, 2: 1.6, 4: 2.0}),
                                        ("", 100.0, {1: 1.0, 4: 1.5}))
        for n, gain in gains_by_n.items() for rate in [base * gain]])
    figures = {r.name: r for r in summary.ratios(tmp_path)}
    assert figures["stacks packed: best aggregate / one stack"].value == pytest.approx(2.0)
    assert figures["packing through MPS: best aggregate / one trial"].value == pytest.approx(1.5)
    assert figures["seeds stacked: 5 as one / one seed (median over depths)"].value == 3.0
    assert figures["seeds stacked: dense block-diagonal / grouped convolutions (median)"
                   ].value == pytest.approx(1.5)
    stacked = figures["Table 6, project, 5 seeds stacked (minutes)"].value
    # By hand: 5 seeds x 164 epochs x 50,000 images at each depth's stacked rate; ResNet-32 and
    # -44 on the least-squares line of seconds per image through 20, 56 and 110.
    per_image = {d: 1 / (rates[d] * gains[d]) for d in rates}
    xs, ys = list(per_image), list(per_image.values())
    slope = statistics.linear_regression(xs, ys).slope
    intercept = statistics.linear_regression(xs, ys).intercept
    for depth in (32, 44):
        per_image[depth] = max(intercept + slope * depth, min(ys))
    expected = sum(per_image.values()) * 5 * 164 * 50_000 / 60 / 2.0  # the stacks' packing
    assert stacked == pytest.approx(expected)
    assert figures["Table 6, project (minutes)"].value > stacked
    # The entry that makes --dry-run advise stacking on this GPU: the median grouped gain.
    (tmp_path / "steps.csv").write_text("step,seconds,status,rows\n")
    assert "StackingMeasurement('NVIDIA H200', 5, 3.00)" in summary.summary_markdown(tmp_path)


def test_the_dry_run_advises_stacking_from_the_gain_measured_on_a_gpu():
    from resnet_ablate.study.advice import StackingMeasurement, stacking_advice

    h200 = StackingMeasurement("NVIDIA H200", 5, 2.4)
    lines = stacking_advice(0.5, 1, 32, 5, 1, [h200])
    assert len(lines) == 1 and "2.40x" in lines[0]
    assert "recommended resources.stack_seeds: 5 (this spec stacks 1" in lines[0]
    assert "recommended resources.stack_seeds: 3" in stacking_advice(0.5, 1, 32, 3, 1, [h200])[0]
    slower = stacking_advice(0.5, 1, 32, 5, 1, [StackingMeasurement("NVIDIA H200", 5, 0.8)])
    assert "not recommended" in slower[0]
    assert "not measured on a GPU yet" in stacking_advice(1, 1, 32, 5, 5, [])[0]
    # CPU trials, data-parallel ones, large images and single seeds get no advice.
    for args in ((0, 1, 32, 5, 1), (2, 2, 32, 5, 1), (1, 1, 224, 5, 1), (1, 1, 32, 1, 1)):
        assert stacking_advice(*args, [h200]) == []


def test_the_dense_block_diagonal_variant_computes_the_stacked_model_and_keeps_its_zeros():
    """bench_seed_stack.py --convolutions dense: the same outputs as the grouped stacked model,
    and after SGD steps with momentum and weight decay its off-diagonal blocks are still zero.
    Made dense before the model moves, as the benchmark does (to the GPU there): the gradients'
    masks move with it."""
    bench = _load("bench_seed_stack")
    from resnet_ablate.models import cifar_resnet
    from resnet_ablate.seed_stack import stack_models

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(cifar_resnet(8, num_classes=4))
    grouped = stack_models(models).double()
    dense = bench.block_diagonal_(stack_models(models)).double()
    masked = [m for m in dense.modules() if hasattr(m, "block_mask")]
    assert len(masked) == sum(isinstance(m, nn.Conv2d) and m.groups > 1
                              for m in grouped.modules()) > 0
    assert all(m.block_mask.dtype == m.weight.dtype == torch.float64
               and m.block_mask.device == m.weight.device for m in masked)
    # The hooks read the masks the model holds: with a mask of ones, gradients pass off the
    # diagonal too (a third of the weight is on it)
    probe, kept = masked[0], masked[0].block_mask
    probe.block_mask = torch.ones_like(kept)
    nn.functional.cross_entropy(dense(torch.randn(5, 9, 8, 8, dtype=torch.float64)),
                                torch.randint(0, 4, (5, 3))).backward()
    assert probe.weight.grad.count_nonzero() > probe.weight.numel() // 3
    probe.block_mask = kept
    dense.zero_grad(set_to_none=True)
    x = torch.randn(5, 9, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 3))
    for model in (grouped, dense):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for _ in range(2):
            optimizer.zero_grad()
            (3 * nn.functional.cross_entropy(model(x), y)).backward()
            optimizer.step()
    torch.testing.assert_close(dense(x), grouped(x), rtol=1e-9, atol=1e-12)
    weight = dense.layer2[0].conv1.weight  # 3 seeds x (32 out, 16 in)
    assert weight.shape[:2] == (96, 48)
    off_diagonal = torch.ones_like(weight, dtype=torch.bool)
    for seed in range(3):
        off_diagonal[seed * 32:(seed + 1) * 32, seed * 16:(seed + 1) * 16] = False
    assert weight[off_diagonal].abs().max() == 0 and weight[~off_diagonal].abs().max() > 0


def test_results_benchmark_times_both_frames_and_finds_them_equal(tmp_path):
    bench = _load("bench_results")
    out = tmp_path / "results_frame.csv"
    rows = bench.main(["--small", "--csv", str(out)])
    (written,) = list(csv.DictReader(out.open()))
    assert int(written["trials"]) == 8 == rows[0]["trials"]
    assert float(written["typed_columns_ms"]) > 0 and float(written["cast_after_ms"]) > 0
    assert float(written["speedup"]) == pytest.approx(
        float(written["cast_after_ms"]) / float(written["typed_columns_ms"]), rel=0.01)
