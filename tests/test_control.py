"""Control messages work whatever backend serves the device: no module outside bench/control.py
calls a torch.distributed collective on a tensor it built itself.

Under NCCL a CPU tensor in a collective fails ("No backend type associated with device type
cpu"), which no CPU run can show: gloo takes both. So the code is read instead. Every call of a
collective in bench/ is either in bench/control.py, which makes each message on the group's
device, or is a payload `bench comm` measures, made on the run's device in comm._op."""
import ast
from pathlib import Path

from conftest import ROOT

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp"}
FACTORIES = {"tensor", "ones", "zeros", "empty", "full", "randn", "rand", "arange", "ones_like", "zeros_like"}
# bench ab's measuring job: CPU and gloo only (it calls init_env(..., "cpu")), and it runs the base
# side's code, which may predate bench/control.py
EXEMPT = {"bench/ab_driver.py"}


def _dist_names(tree: ast.Module) -> set[str]:
    """The names torch.distributed goes by in a module (import torch.distributed as dist, ...)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _collective_calls(path: Path) -> list[tuple[str, int, str]]:
    """(function, line, collective) of every collective called in a file, directly or imported by name;
    the function as its dotted path of enclosing functions ("" at module level)."""
    tree = ast.parse(path.read_text())
    dist = _dist_names(tree)
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("torch.distributed") for a in n.names if a.name in COLLECTIVES}
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = f"{where}.{child.name}" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in dist:
                    found.append((inner.lstrip("."), child.lineno, f.attr))
                elif isinstance(f, ast.Name) and f.id in imported:
                    found.append((inner.lstrip("."), child.lineno, f.id))
            visit(child, inner)

    visit(tree, "")
    return sorted(found)


def _factories_without_device(fn: ast.AST) -> list[str]:
    return [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in FACTORIES and ast.unparse(n.func.value) == "torch"
            and not any(k.arg == "device" for k in n.keywords)]


def test_no_collective_outside_the_control_module_but_the_measured_payloads():
    offenders = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT or rel == "bench/control.py":
            continue
        for fn, line, name in _collective_calls(path):
            if rel == "bench/comm.py" and fn.split(".")[0] == "_op":
                continue  # the payloads bench comm measures (checked below)
            offenders.append(f"{rel}:{line} {fn}() calls {name}: send control messages through bench.control")
    assert not offenders, "\n".join(offenders)


def test_the_control_module_and_the_measured_payloads_make_their_tensors_on_a_device():
    control = ast.parse((ROOT / "bench/control.py").read_text())
    assert not _factories_without_device(control), _factories_without_device(control)
    comm = ast.parse((ROOT / "bench/comm.py").read_text())
    op = next(n for n in ast.walk(comm) if isinstance(n, ast.FunctionDef) and n.name == "_op")
    assert not _factories_without_device(op), _factories_without_device(op)
    made = [n for n in ast.walk(op) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in FACTORIES]
    assert made and all(ast.unparse(next(k.value for k in n.keywords if k.arg == "device")) == "device" for n in made)


def test_the_guard_sees_what_it_guards(tmp_path):
    """The reader finds the defect it exists for (the finite-loss flag made on the CPU, as it was)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\n\ndef check(losses):\n"
                   "    flag = torch.tensor([1.0])\n    dist.all_reduce(flag, op=dist.ReduceOp.MAX)\n"
                   "from torch.distributed import barrier as b\n\ndef wait():\n    b()\n")
    assert _collective_calls(bad) == [("check", 6, "all_reduce"), ("wait", 10, "b")]
    tree = ast.parse(bad.read_text())
    assert _factories_without_device(tree) == ["torch.tensor([1.0])"]


def test_control_messages_between_two_real_ranks(tmp_path):
    """max, mean, one rank's values, any, objects and a barrier over gloo at world size 2."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "control.json"
    mp.spawn(_control_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    got = json.loads(out.read_text())
    assert got == {"max": [3.0, 5.0], "mean": [2.0, 3.5], "from1": [10.0, 11.0], "any": [True, False],
                   "objects": [{"rank": 0}, {"rank": 1}]}


def _control_rank(rank: int, init: str, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from bench import control
    from bench.distenv import DistEnv

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    env = DistEnv(rank, 2, rank, 2, torch.device("cpu"), "gloo")
    got = {"max": control.max_over_ranks([1.0 + 2 * rank, 5.0 - 3 * rank], env),
           "mean": control.mean_over_ranks(torch.tensor([1.0 + 2 * rank, 5.0 - 3 * rank]), env),
           "from1": control.from_rank([10.0 * rank, 11.0 * rank], 1, env),
           "any": [control.any_rank(rank == 1, env), control.any_rank(False, env)],
           "objects": control.gather_objects({"rank": rank}, env)}
    control.barrier(env)
    if rank == 0:
        Path(out).write_text(json.dumps(got))
    from bench.control import leave_group

    leave_group()  # barrier, destroy_process_group, exit without interpreter finalisation
