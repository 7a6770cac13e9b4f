"""`bench tune` for real (bench/commands/tune.py, bench/tuning.py): its options, the command line it
prints read back by `bench run`'s own parser, a dry run at 64 GPUs, and a measured tune of a small
space on 2 CPU workers (real processes), interrupted and resumed."""
import json
from types import SimpleNamespace

import pytest
import typer

from bench.config import RunConfig
from bench.tuning import Anchors, family_mesh, run_command

from conftest import bench, invoke


def test_budget_durations_and_a_bad_one():
    from bench.commands.tune import parse_duration

    assert parse_duration("20m") == 1200 and parse_duration("90s") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ValueError, match="--budget 20 minutes: give a duration like 20m"):
        parse_duration("20 minutes")


@pytest.mark.parametrize("cfg", [
    RunConfig(strategy="fsdp", devices=8, tp=2, precision="bf16", ac="full", grad_accum=2, batch_size=16,
              model="wav2vec2-base", sequence_parallel=False),
    RunConfig(strategy="pipeline", devices=4, pp=2, schedule="interleaved-1f1b", stages_per_rank=2, model="transformer"),
    RunConfig(strategy="ddp", devices=2, compile=True, model_size="small", size="tiny"),
])
def test_the_winning_command_line_reads_back_as_the_same_configuration(cfg):
    """The oracle is `bench run`'s own parser: every setting the printed line carries comes back."""
    from bench.cli import app

    run = typer.main.get_command(app).commands["run"]
    argv = run_command(cfg).split()[2:]
    params = run.make_context("run", argv).params
    for name in ("strategy", "devices", "tp", "pp", "precision", "ac", "grad_accum", "batch_size", "model",
                 "model_size", "schedule", "compile", "sequence_parallel", "size"):
        assert params[name] == getattr(cfg, name), name


def test_single_step_time_between_and_beyond_the_anchors():
    a = Anchors({("fp32", 16): 0.10, ("fp32", 64): 0.34}, {}, None, None, 8, "measured")
    assert a.step_s("fp32", 32) == pytest.approx(0.18)  # on the line a + b x batch: 0.02 + 0.005 x 32
    assert a.step_s("fp32", 64) == pytest.approx(0.34)
    assert a.step_s("bf16", 16) is None
    one = Anchors({("fp32", 16): 0.10}, {}, None, None, 8, "measured")
    assert one.step_s("fp32", 32) == pytest.approx(0.20)  # one anchor: in proportion


def test_the_mesh_a_prediction_reads_is_the_one_a_result_records():
    """family_mesh against bench predict's reading of a result's config (its recorded degrees)."""
    from bench.lifecycle import config_record
    from bench.predict import mesh_of

    for cfg in (RunConfig(strategy="fsdp", devices=8, tp=2, dp_replicate=2), RunConfig(strategy="hsdp", devices=8, nodes=2,
                                                                                       rdzv_endpoint="h:1"),
                RunConfig(strategy="pipeline", devices=4, pp=2), RunConfig(strategy="ddp", devices=4),
                RunConfig(strategy="tp", devices=2)):
        assert family_mesh(cfg) == mesh_of(config_record(cfg, "cuda", cfg.devices, "nccl")), cfg.strategy


def test_bad_options_are_one_line_before_anything_runs(capsys, tmp_path):
    code, out = invoke(["tune", "--objective", "energy", "--device", "cpu", "--out", tmp_path], capsys)
    assert code == 2 and "NVML" in out and "devices are cpu" in out and "Traceback" not in out
    code, out = invoke(["tune", "--objective", "speed", "--out", tmp_path], capsys)
    assert code == 2 and "--objective speed: not one of throughput, energy, time-to-f1" in out
    code, out = invoke(["tune", "--objective", "time-to-f1", "--f1-tolerance", "2", "--device", "cpu",
                        "--out", tmp_path], capsys)
    assert code == 2 and "--f1-tolerance 2: give a macro-F1 difference" in out
    code, out = invoke(["tune", "--space", "nosuch", "--out", tmp_path], capsys)
    assert code == 2 and "no such file or preset" in out
    code, out = invoke(["tune", "--budget", "soon", "--out", tmp_path], capsys)
    assert code == 2 and "give a duration" in out
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_resume_of_another_objective_is_refused_in_one_line(capsys, tmp_path):
    (tmp_path / "tune-state.json").write_text(json.dumps({"windows": {}, "parity": {}, "trials": [], "losses": 0,
                                                          "objective": "throughput"}))
    code, out = invoke(["tune", "--objective", "time-to-f1", "--device", "cpu", "--resume", "--out", tmp_path], capsys)
    assert code == 2 and "the tune in" in out and "measured --objective throughput" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune-state.json"]  # nothing else written, nothing lost


def test_a_resume_with_another_tolerance_or_anchors_of_another_objective_is_refused(capsys, tmp_path):
    state = {"windows": {}, "parity": {}, "trials": [], "losses": 0, "objective": "time-to-f1"}
    (tmp_path / "tune-state.json").write_text(json.dumps(state))
    (tmp_path / "f1-target.json").write_text(json.dumps({"tolerance": 0.05, "target": 0.7}))
    code, out = invoke(["tune", "--objective", "time-to-f1", "--device", "cpu", "--resume", "--out", tmp_path], capsys)
    assert code == 2 and "with --f1-tolerance 0.05" in out
    (tmp_path / "f1-target.json").unlink()
    (tmp_path / "anchors.json").write_text(json.dumps({"objective": "throughput"}))
    code, out = invoke(["tune", "--objective", "time-to-f1", "--device", "cpu", "--resume", "--out", tmp_path], capsys)
    assert code == 2 and "measured --objective throughput" in out


def test_anchors_keep_their_power_and_objective_for_a_resume(tmp_path):
    from bench.predict import Link
    from bench.tuning import anchors_cached

    link = Link(1.3, 243.0, "fit", (("all_gather", 0.9, 160.0),))
    made = Anchors({("bf16", 16): 0.1}, {2: 1.1}, link, link, 8, "measured", {"k": 2.5}, 310.0)
    anchors_cached(tmp_path / "a.json", False, lambda: made, "energy")
    back = anchors_cached(tmp_path / "a.json", True, lambda: pytest.fail("measured again on resume"))
    assert (back.power_w, back.windows, back.contention, back.intra) == (310.0, {"k": 2.5}, {2: 1.1}, link)
    assert json.loads((tmp_path / "a.json").read_text())["objective"] == "energy"


def test_an_energy_figure_is_samples_per_joule_and_its_prediction_the_anchors_power():
    """The oracle is arithmetic: 0.5 J a sample is 2 samples/J; a prediction of 300 samples/s on 2
    devices at 150 W each is 1 sample/J; a run that read no energy fails, in words."""
    from bench.tune import Failed
    from bench.tuning import score

    result = {"throughput": {"samples_per_s": 300.0}, "utilization": {"gpu_energy_j_per_sample": 0.5}}
    assert score(result, "energy") == 2.0 and score(result, "throughput") == score(result, "time-to-f1") == 300.0
    with pytest.raises(Failed, match="read no GPU energy"):
        score({"throughput": {"samples_per_s": 1.0}, "utilization": {"gpu_energy_j_per_sample": None}}, "energy")
    a = Anchors({("bf16", 16): 16 / 150.0}, {}, None, None, 8, "measured", power_w=150.0)
    a.predict = lambda cfg: 300.0  # the throughput prediction is bench predict's, tested elsewhere
    assert a.figure(RunConfig(strategy="ddp", devices=2, precision="bf16", batch_size=16), "energy") == pytest.approx(1.0)
    assert a.figure(RunConfig(strategy="ddp", devices=2), "throughput") == 300.0
    a.power_w = None
    assert a.figure(RunConfig(strategy="ddp", devices=2), "energy") is None


class FakeWindows:
    """Whole training runs of a planted F1 curve per strategy: val macro-F1 by epoch, and the seconds of
    training after which each epoch ends (10 s an epoch)."""

    CURVES = {"single": [0.40, 0.70, 0.80, 0.82], "ddp": [0.30, 0.60, 0.80, 0.81], "fsdp": [0.2, 0.3, 0.4, 0.5]}

    def __init__(self):
        self.runs = []

    def record(self, cfg, **changes):
        self.runs.append((cfg.strategy, changes))
        curve = self.CURVES[cfg.strategy][:changes["epochs"]]
        target = changes["target_f1"]
        hit = next((i for i, f in enumerate(curve) if target is not None and f >= target), None)
        return {"quality": {"val_macro_f1_by_epoch": curve, "time_to_target_s": None if hit is None else 10.0 * (hit + 1),
                            "epochs_to_target": None if hit is None else hit + 1}}


def test_the_f1_target_is_single_best_less_the_tolerance_measured_once_and_kept(tmp_path):
    from bench.tuning import F1Target

    runs, said = FakeWindows(), []
    ref = RunConfig(strategy="single", epochs=4)
    check = F1Target(runs, ref, 0.02, tmp_path / "f1-target.json", said.append)
    assert check(RunConfig(strategy="ddp", devices=2, epochs=4)) == 30.0  # 0.80 >= 0.82 - 0.02 at epoch 3
    assert check(RunConfig(strategy="fsdp", devices=2, epochs=4)).startswith(
        "did not reach val macro-F1 0.800 in 4 epochs (best 0.500)")
    assert [s for s, _ in runs.runs] == ["single", "ddp", "fsdp"]  # the reference once, first
    assert runs.runs[0][1]["target_f1"] is None and runs.runs[1][1]["eval_each_epoch"] is True
    assert json.loads((tmp_path / "f1-target.json").read_text())["target"] == pytest.approx(0.80)
    again = FakeWindows()
    check = F1Target(again, ref, 0.02, tmp_path / "f1-target.json", said.append)
    assert check(RunConfig(strategy="ddp", devices=2, epochs=4)) == 30.0
    assert [s for s, _ in again.runs] == ["ddp"]  # resumed: the reference is not trained again
    assert any("target 0.800" in s for s in said)


def test_a_reference_run_that_fails_or_records_no_f1_stops_the_tune_in_one_line(tmp_path):
    """The reference is no candidate: its failure must not be any candidate's verdict."""
    from bench.tune import Failed
    from bench.tuning import F1Target

    def fails(cfg, **changes):
        raise Failed("exit 1: boom")

    check = F1Target(SimpleNamespace(record=fails), RunConfig(epochs=2), 0.02, tmp_path / "t.json", lambda s: None)
    with pytest.raises(Failed, match="single's reference run failed, so there is no F1 target: exit 1: boom"):
        check(RunConfig(strategy="ddp", devices=2))
    no_f1 = SimpleNamespace(record=lambda cfg, **c: {"quality": {"val_macro_f1_by_epoch": []}})
    blind = F1Target(no_f1, RunConfig(epochs=2), 0.02, tmp_path / "t.json", lambda s: None)
    with pytest.raises(Failed, match="recorded no validation macro-F1"):
        blind(RunConfig(strategy="ddp", devices=2))
    assert not (tmp_path / "t.json").exists()  # no target written from nothing


def test_a_broken_tune_record_is_one_line_of_the_report_not_a_traceback(capsys, tmp_path):
    from test_sweep_report import fixture_result

    (tmp_path / "r.json").write_text(json.dumps(fixture_result()))
    (tmp_path / "tune.json").write_text(json.dumps({"kind": "tune", "candidates": [{"key": "x"}]}))
    code, out = invoke(["report", tmp_path, "--out", tmp_path / "rep"], capsys)
    assert code == 0 and "Traceback" not in out
    assert "tune.json: unreadable tune record: KeyError" in " ".join(out.split())


def test_compare_puts_two_tunes_winners_side_by_side(capsys, tmp_path):
    """bench compare reads each side's tune.json: per model and objective, the winners, their measured
    figures (the median of the winner's windows, by hand here), the ratio and the machines; a model
    tuned on one side only is said; a broken record is one line."""
    from test_sweep_report import fixture_result

    def tune(folder, winner, windows, env, model="cnn", objective="throughput"):
        folder.mkdir()
        (folder / "r.json").write_text(json.dumps(fixture_result()))
        cands = [{"key": k, "config": {"model": model, "model_size": "small"}, "windows": w}
                 for k, w in ((winner, windows), ("other", [1.0]))]
        (folder / "tune.json").write_text(json.dumps({"kind": "tune", "objective": objective, "unit": "samples/s",
                                                      "winner": winner, "candidates": cands, "env": env,
                                                      "command": f"bench run --model {model}",
                                                      "measured": 2, "windows": 3, "stopped": "done"}))

    a, b = tmp_path / "a", tmp_path / "b"
    tune(a, "cnn-ddp-b16", [90.0, 100.0, 130.0], {"cpu_model": "Test CPU", "cpu_cores_logical": 2})
    tune(b, "cnn-ddp-b64", [150.0, 140.0, 170.0], {"cpu_model": "x", "gpus": [{"name": "H100"}, {"name": "H100"}]})
    code, out = invoke(["compare", a, b], capsys)
    text = " ".join(out.split())
    assert code == 0 and "Traceback" not in out
    assert ("tune cnn (small) --objective throughput: baseline cnn-ddp-b16 100.0 on Test CPU (2 cores); current "
            "cnn-ddp-b64 150.0 on 2x H100 (samples/s): current / baseline 1.500 (median of 3 windows against median "
            "of 3 windows: no interval, not a verdict); another configuration wins") in text
    tune(tmp_path / "c", "t", [5.0], {}, model="transformer")
    code, out = invoke(["compare", a, tmp_path / "c"], capsys)
    text = " ".join(out.split())
    assert "tune cnn (small) --objective throughput: tuned in the baseline results only" in text
    assert "tune transformer (small) --objective throughput: tuned in the current results only" in text
    (tmp_path / "c" / "tune.json").write_text("{")
    code, out = invoke(["compare", a, tmp_path / "c"], capsys)
    assert "not a tune record" in out and "Traceback" not in out


SPACE = """
strategies = ["single", "ddp"]
gpus = [2]
precision = ["fp32"]
models = ["cnn"]
batch = [8, 16]

[run]
model_size = "small"
size = "tiny"
warmup_steps = 2
threads = 1
eval_each_epoch = false
device = "cpu"
"""


def test_a_measured_tune_finds_the_planted_winner_and_resumes_without_measuring_again(tmp_path):
    """4 candidates (single and ddp x2 at batch 8 and 16) on 2 CPU workers. The truth is planted, not
    hoped for from the machine: every single-process step is made 4 times as long (slow:300:solo),
    so ddp wins by a margin no neighbour (a second test worker) can hide, and a working search must
    end on it; the winner passes parity; --resume over the finished tune measures no window again.
    (Whether ddp wins unplanted on an idle 2-core machine is benchmarks/tune_cpu.py's to measure.)
    The tune runs as one job through submitit's LocalExecutor (issue 26: a cluster's measuring
    step), so its output and exit code must come back through the job; the resume runs here."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "tune"
    done = bench("tune", "--space", space, "--budget", "5m", "--out", out, "--executor", "submitit-local",
                 timeout=900, env={"EMOTION_BENCH_FAULT": "slow:300:solo"})
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads((out / "tune-job.json").read_text())
    assert job["executor"] == "submitit-local" and "--executor" not in job["argv"] and job["argv"][0] == "tune"
    assert f"submitted job {job['job_id']}" in done.stdout
    rec = json.loads((out / "tune.json").read_text())  # written by the job, not by this process
    assert rec["command"] in (out / "jobs" / f"{job['job_id']}_0_log.out").read_text()
    assert rec["command"] in " ".join(done.stdout.split())  # the job's own output, passed on
    winner = next(c for c in rec["candidates"] if c["key"] == rec["winner"])
    assert winner["config"]["strategy"] == "ddp" and winner["parity"] == "ok", rec["candidates"]
    single = [w for c in rec["candidates"] if c["config"]["strategy"] == "single" for w in c["windows"]]
    assert single and max(single) < 0.5 * min(winner["windows"])  # the planted slowdown reached the windows
    assert rec["command"].startswith("bench run --strategy ddp --gpus 2")
    assert 1 <= rec["measured"] <= 4 and all(w > 0 for c in rec["candidates"] for w in c["windows"])
    assert (out / "tune.md").read_text().count("|") > 10 and (out / "tune.png").stat().st_size > 1000
    windows = list((out / "windows").glob("*-w*.json"))
    assert len(windows) >= rec["windows"]  # every window (and anchor) is a result file
    rep = bench("report", out, "--out", tmp_path / "report")
    assert rep.returncode == 0 and "not a result file" not in rep.stdout + rep.stderr, rep.stdout + rep.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("## bench tune"):]  # the tune's own section: its line and its measured candidates
    assert f"winner {rec['winner']}" in section and rec["command"] in section and "measured (samples/s, median)" in section
    assert "tune " in rep.stdout + rep.stderr and rec["winner"] in " ".join((rep.stdout + rep.stderr).split())
    again = bench("tune", "--space", space, "--budget", "5m", "--out", out, "--resume", timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    rec2 = json.loads((out / "tune.json").read_text())
    assert rec2["windows"] == rec["windows"] and rec2["winner"] == rec["winner"]
    assert "window " not in again.stderr + again.stdout  # no window measured on resume


def test_a_dry_run_at_64_gpus_lists_candidates_by_prediction_without_measuring(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('strategies = ["ddp", "fsdp", "fsdp:tp2"]\ngpus = [8]\nprecision = ["bf16"]\n'
                     'models = ["wav2vec2-base"]\nbatch = [8, 16]\nac = ["none", "full"]\n')
    out = tmp_path / "dry"
    done = bench("tune", "--dry-run", "--gpus", "64", "--space", space, "--out", out, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rec = json.loads((out / "tune.json").read_text())
    assert rec["measured"] == 0 and rec["windows"] == 0 and rec["winner"] is None
    live = [c for c in rec["candidates"] if not c["pruned"]]
    assert live and all(c["predicted"] and c["predicted"] > 0 for c in live)
    assert "best predicted: bench run" in done.stdout + done.stderr
    assert "64" in done.stdout  # the candidates are at 64 devices


def test_a_time_to_f1_tune_wins_on_training_seconds_to_single_best_f1(tmp_path):
    """--objective time-to-f1 on 2 CPU workers (real processes): windows measure throughput, then the
    fastest measured candidates each train whole runs (3 epochs here) toward single's best val
    macro-F1 less the tolerance. The oracle is the record itself: the target is the reference's
    best less 0.02, a candidate that passed holds its seconds, and the winner has the fewest."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE.replace("batch = [8, 16]", "batch = [8]") + "epochs = 3\n")
    out = tmp_path / "ttf"
    done = bench("tune", "--space", space, "--budget", "5m", "--out", out, "--objective", "time-to-f1", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rec = json.loads((out / "tune.json").read_text())
    target = json.loads((out / "f1-target.json").read_text())
    assert rec["objective"] == "time-to-f1" and target["target"] == pytest.approx(target["best_val_f1"] - 0.02)
    checked = [c for c in rec["candidates"] if c["parity"]]
    times = {c["key"]: c["time_to_f1_s"] for c in checked if c["time_to_f1_s"] is not None}
    assert times and rec["winner"] == min(times, key=times.get), checked
    assert all(c["parity"] == "ok" or c["parity"].startswith(("did not reach", "its training run")) for c in checked)
    assert list((out / "windows").glob("*-f1*.json"))  # the training runs are result files too
    assert "the F1 target in" in " ".join(done.stdout.split()) + " ".join(done.stderr.split())


def test_the_tunes_link_measures_tensor_parallels_collectives_only_where_it_has_tp_candidates(tmp_path, monkeypatch):
    """The bench comm anchor's --ops: the raw three, and the tp_ ones (DTensor's) with tp candidates."""
    import subprocess

    from bench import tuning

    asked = []

    def fake_run(cmd, **_):
        asked.append(cmd[cmd.index("--ops") + 1])
        return subprocess.CompletedProcess(cmd, 1, "", "no comm here")

    monkeypatch.setattr(subprocess, "run", fake_run)
    from bench.predict import Link

    said = []
    for tp in (False, True):  # the fake comm fails: the preset stands in, and says so
        assert tuning.link_for(tmp_path / str(tp), 2, "cpu", said.append, tensor_parallel=tp) == Link.named("100gbe")
    assert asked == ["all_reduce,all_gather,reduce_scatter",
                     "all_reduce,all_gather,reduce_scatter,tp_all_gather,tp_reduce_scatter,tp_all_reduce"]
    assert sum("bench comm failed (no comm here); the 100gbe preset stands in" in line for line in said) == 2, said
