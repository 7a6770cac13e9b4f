"""docs/cluster.md's Kubernetes (Kubeflow Trainer v2 TrainJob) and SkyPilot manifests (issue 26):
parsed, checked for what the engines need, and their commands run for real as two nodes on
loopback with CPU workers. Each node gets the environment the engine gives it (torchrun's PET_*
variables under the torch-distributed runtime, SKYPILOT_* under SkyPilot). Only the output folder,
the rendezvous port and the workload size are changed, so a wrong mapping fails here."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import yaml
from conftest import ROOT

SMALL = ["--size", "tiny", "--epochs", "1", "--batch-size", "8", "--model-size", "small", "--device", "cpu",
         "--threads", "1"]


def _manifests() -> dict[str, dict]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    docs = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return {"trainjob": next(d for d in docs if d.get("kind") == "TrainJob"),
            "skypilot": next(d for d in docs if "num_nodes" in d)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(make, out) -> list[tuple[int, str]]:
    """Run make(node_rank, port) -> (argv, env) for nodes 0 and 1 at once; (exit code, output) each.
    A port taken between asking and binding is asked again."""
    for _ in range(3):
        port = _free_port()
        procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for argv, env in (make(r, port) for r in (0, 1))]
        done = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
        if not any(re.search(r"address already in use|EADDRINUSE", o, re.I) for _, o in done):
            return done
    return done


def _the_result(out) -> dict:
    files = [p for p in out.glob("*.json")]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_the_trainjob_uses_the_torch_runtime_and_its_command_trains_on_two_nodes_under_torchrun_s_env(tmp_path):
    job = _manifests()["trainjob"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    trainer = job["spec"]["trainer"]
    command = [str(c) for c in trainer["command"]]
    assert command[:4] == ["torchrun", "-m", "bench", "run"] and trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    args = command[4:]
    args[args.index("--out") + 1] = str(tmp_path)

    def node(rank: int, port: int):
        # what the torch-distributed runtime sets on each node's pod (numProcPerNode: its GPUs; 1 CPU worker here)
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        return [sys.executable, "-m", "torch.distributed.run", *command[1:4], *args, *SMALL], env

    done = _two_nodes(node, tmp_path)
    assert all(rc == 0 for rc, _ in done), done
    r = _the_result(tmp_path)
    assert r["status"] == "ok"
    assert (r["config"]["strategy"], r["config"]["precision"]) == ("fsdp", "bf16")
    assert (r["config"]["nodes"], r["config"]["world_size"], r["config"]["devices"]) == (2, 2, 2)


def test_the_skypilot_task_maps_its_node_environment_onto_bench_run_s_flags_and_trains_on_two_nodes(tmp_path):
    task = _manifests()["skypilot"]
    assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "H100:4"
    assert "pip install -e ." in task["setup"]
    script = task["run"]
    assert ".venv/bin/bench run" in script and "--out results/runs" in script

    def node(rank: int, port: int):
        here = (script.replace(".venv/bin/bench run", f"{sys.executable} -m bench run")
                .replace(":29400", f":{port}").replace("--out results/runs", f"--out {tmp_path} {' '.join(SMALL)}"))
        # what SkyPilot sets on each node: its rank, every node's IP (the head first), the counts
        env = {**os.environ, "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
               "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "1"}
        return ["bash", "-c", here], env

    done = _two_nodes(node, tmp_path)
    assert all(rc == 0 for rc, _ in done), done
    r = _the_result(tmp_path)
    assert r["status"] == "ok" and r["config"]["strategy"] == "fsdp"
    assert (r["config"]["nodes"], r["config"]["world_size"], r["config"]["devices"]) == (2, 2, 2)
    assert sum("rank 0 on another node" in out for _, out in done) == 1
