"""A pytest plugin for this project's own suite (pyproject's addopts: -p bench._pytest_parallel; not
an entry point, so no other project's pytest loads it): the suite runs in two test
processes through pytest-xdist where that is installed, and in one where it is not. The GPU
machine has no pytest-xdist, and `-n 2` written into addopts made `python -m pytest -m gpu` fail
there before collecting anything. Two processes keep 2 cores busy: most tests wait on a
subprocess starting torch (README, the test suite's time). `-n 0` (or any -n) on the command line
wins."""


def pytest_load_initial_conftests(early_config, parser, args):
    chosen = any(a == "-n" or (a.startswith("-n") and a[2:].isdigit()) or a.startswith("--numprocesses")
                 or a == "no:xdist" or a.endswith("no:xdist") for a in args)
    if chosen:
        return
    try:
        import xdist  # noqa: F401
    except ImportError:
        return
    args[:] = ["-n", "2", "--dist", "worksteal", *args]
