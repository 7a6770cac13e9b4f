"""The `bench` commands, one module each; bench/cli.py registers them on its typer apps in --help
order. Shared option helpers are in common.py. Heavy modules (torch, pandas, matplotlib) are imported
inside the commands, so that `bench --help` starts fast."""
