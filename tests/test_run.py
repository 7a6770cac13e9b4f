"""`bench run` end to end on one device (CPU), through the real CLI."""
import json

import numpy as np
import pytest
import torch

from bench.quality import quality
from bench.monitor import Monitor
from bench.results import load_result, validate
from conftest import bench, probe

# CPU on every machine: these tests assert CPU behaviour (GPU tests are marked and skip without CUDA)
TINY = ["--size", "tiny", "--epochs", "2", "--batch-size", "16", "--model-size", "small", "--warmup-steps", "2",
        "--device", "cpu"]


def _result(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = proc.stdout.strip().splitlines()[-1]  # the last line is the result path
    return load_result(path)


def test_tiny_run_writes_a_valid_result(tmp_path):
    proc = bench("run", *TINY, "--out", tmp_path, "--target-f1", "0.01")
    r = _result(proc)
    validate(r)
    # output to a pipe, not a terminal: no bar, one plain line per epoch, its loss the result's own
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    steps = r["timing"]["steps"]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], proc.stdout
    assert f"step {steps}/{steps}, loss {r['losses'][-1]:.4f}, " in epochs[-1] and "samples/s" in epochs[-1]
    assert "s left" in epochs[0] and "s elapsed" in epochs[-1] and "\x1b" not in proc.stdout
    assert r["status"] == "ok" and r["error"] is None
    c, t, q = r["config"], r["throughput"], r["quality"]
    assert (c["strategy"], c["device_type"], c["devices"], c["global_batch_size"]) == ("single", "cpu", 1, 16)
    assert t["samples_per_s"] > 0 and t["step_time_ms_p90"] >= t["step_time_ms_p50"] > 0
    assert t["measured_steps"] == r["timing"]["steps"] - 2
    assert len(q["val_macro_f1_by_epoch"]) == 2 and 0 <= q["test"]["macro_f1"] <= 1
    assert np.array(q["test"]["confusion_matrix"]).sum() == q["test"]["num_samples"] > 0
    assert len(r["losses"]) == r["timing"]["steps"] and all(np.isfinite(r["losses"]))
    assert q["time_to_target_s"] is not None and q["epochs_to_target"] == 1
    assert r["flops"]["train_flops_per_sample"] > 0 and r["flops"]["mfu"] is None  # no CPU peak known
    assert r["utilization"]["gpu_busy_percent_mean"] is None and r["utilization"]["process_rss_peak_bytes"] > 0
    assert r["utilization"]["load_avg_1m_mean"] >= 0  # the machine's load, sampled with the rest
    assert r["env"]["torch"].startswith("2.11") and r["env"]["cpu_cores_logical"] >= 1
    # the memory estimate beside what was measured (on a CPU, the peak RSS of the training steps)
    mem = r["memory"]
    assert mem["estimate"]["training_bytes"] > 0 and mem["measured"]["training_bytes"] > 0
    assert mem["measured"]["training_bytes"] == r["utilization"]["per_rank"][0]["peak_rss_bytes"]
    assert list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*.tmp"))


def test_same_command_twice_is_deterministic(tmp_path):
    a = _result(bench("run", *TINY, "--out", tmp_path / "a"))
    b = _result(bench("run", *TINY, "--out", tmp_path / "b"))
    assert a["losses"] == b["losses"]
    assert a["quality"]["test"] == b["quality"]["test"]
    c = _result(bench("run", *TINY, "--seed", "1", "--out", tmp_path / "c"))
    assert c["losses"] != a["losses"]


def test_run_on_wav_folder_learns(tmp_path):
    """The real-layout loader end to end on WAV files written by `bench data synth`."""
    assert bench("data", "synth", "--out", tmp_path / "wav", "--size", "400").returncode == 0
    r = _result(bench("run", "--dataset", tmp_path / "wav", "--epochs", "12", "--model-size", "small",
                      "--batch-size", "16", "--device", "cpu", "--out", tmp_path / "runs"))
    assert r["data"]["clips"] == 400 and r["data"]["skipped"] == 0
    assert r["quality"]["test"]["macro_f1"] > 2 / 7  # chance is 1/7; measured 0.47


def test_failed_run_writes_failed_result(tmp_path):
    proc = bench("run", *TINY, "--out", tmp_path, env={"EMOTION_BENCH_FAULT": "raise:0:3"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "injected fault" in proc.stderr
    r = load_result(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == "failed" and "injected fault" in r["error"]


def test_bad_flag_combination_is_one_line_and_leaves_no_file(tmp_path):
    proc = bench("run", *TINY, "--precision", "fp16", "--device", "cpu", "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "fp16 needs CUDA" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    # refused before anything started: no result file for the next report to list, no path printed
    assert proc.stdout.strip() == "" and not list(tmp_path.iterdir())


def test_unknown_model_and_missing_dataset(tmp_path):
    for args, text in ((["--model", "resnet"], "unknown model"), (["--dataset", tmp_path / "none"], "no such folder")):
        proc = bench("run", *TINY, *args, "--out", tmp_path)
        assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_on_cpu(tmp_path):
    r = _result(bench("run", *TINY, "--precision", "bf16", "--out", tmp_path, env={"EMOTION_BENCH_PROBE": str(tmp_path)}))
    assert r["config"]["precision"] == "bf16" and all(np.isfinite(r["losses"]))
    # what the forward saw (a hook, not the config): autocast computes in bf16 on fp32 weights
    seen = probe(tmp_path, 0)["modules"]
    assert seen["Conv2d"] == {"output": "torch.bfloat16", "params": ["torch.float32"]}
    assert seen["Linear"]["output"] == "torch.bfloat16"


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, recall_score

    g = torch.Generator().manual_seed(0)
    cases = [(torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7 - (t % 2), (300,), generator=g))
             for t in range(5)]  # odd trials never predict class 6
    # small ones: a class predicted exactly once, a class with one true sample, a class never seen
    cases.append((torch.tensor([0, 0, 1, 2, 2, 3, 4, 5]), torch.tensor([0, 1, 1, 2, 0, 3, 4, 4])))
    for y, p in cases:
        q = quality(p, y)
        assert q["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert q["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=range(7), zero_division=0))
        assert q["uar"] == pytest.approx(recall_score(y, p, average="macro", labels=range(7), zero_division=0))
        pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
        assert [v["precision"] for v in q["per_class"].values()] == pytest.approx(pr)
        assert [v["recall"] for v in q["per_class"].values()] == pytest.approx(rc)
        assert [v["f1"] for v in q["per_class"].values()] == pytest.approx(f1)
        assert [v["support"] for v in q["per_class"].values()] == sup.tolist()
        assert q["confusion_matrix"] == confusion_matrix(y, p, labels=range(7)).tolist()
        assert q["num_samples"] == len(y)
    empty = quality(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert (empty["accuracy"], empty["macro_f1"], empty["num_samples"]) == (0.0, 0.0, 0)
    for bad in ((torch.tensor([7]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([-1])),
                (torch.tensor([0, 1]), torch.tensor([0])), (torch.tensor([2.7]), torch.tensor([2])),
                (torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))):  # not class indices, shapes that differ, not 1-D
        with pytest.raises(ValueError, match="class indices"):
            quality(*bad)


def test_monitor_without_nvml(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    with Monitor(cuda_device=0, interval_s=0.01) as mon:
        torch.randn(300, 300) @ torch.randn(300, 300)
        import time

        time.sleep(0.1)
    s = mon.summary([(0, float("inf"))])
    assert s["num_samples"] > 0 and s["cpu_percent_mean"] is not None
    assert s["gpu_busy_percent_mean"] is None and s["gpu_energy_j"] is None and s["gpu_power_w_mean"] is None


def test_env_command():
    proc = bench("env", "--json")
    fp = json.loads(proc.stdout)
    assert proc.returncode == 0 and fp["torch"].startswith("2.11") and "git" in fp
    assert fp["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    # without --json: a table in words, no Python reprs (a dict's braces, None)
    table = bench("env", env={"COLUMNS": "100"})
    assert table.returncode == 0 and "{" not in table.stdout and "None" not in table.stdout, table.stdout
    assert fp["torch"] in table.stdout and "git commit" in table.stdout and "RAM" in table.stdout
    assert (fp["git"]["commit"] or "unknown")[:12] in table.stdout.replace("\n", "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_single_run(tmp_path):
    r = _result(bench("run", *TINY, "--device", "cuda", "--out", tmp_path))
    assert r["config"]["device_type"] == "cuda" and r["utilization"]["peak_allocated_bytes"] > 0
