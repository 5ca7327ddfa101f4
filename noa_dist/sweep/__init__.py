"""W&B sweeps for noa-dist, online (`wandb agent`) and offline (`noa-sweep`).

spec.py reads and checks the sweep YAML; expand.py turns its `parameters` into rows (grid
or seeded random); render.py renders a row's command line the way `wandb agent` does;
launch.py runs one row as a resumable run; summary.py tabulates and plots finished rows.
"""
