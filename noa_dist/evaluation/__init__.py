"""`noa-eval`: how far does a checkpoint's autoregressive rollout stay useful, against the
baselines a forecast has to beat, on any Well-format dataset.

    noa-eval CKPT [--dataset ROOT] [--split test] [--horizon N] [--batch-size B]
        [--out DIR] [--frames 3]
    accelerate launch --multi_gpu --num_processes 2 -m noa_dist.evaluation CKPT ...  # sharded

Every trajectory of the split is rolled out from its first state over the full stored horizon
(or N steps), no teacher forcing. Per field and step, on denormalised fields: VRMSE and
relative L2 (The Well's VRMSE and NRMSE), the binned spectral MSE/NMSE (The Well's three
wavenumber bins), for the model and for persistence, linear extrapolation (from the first two
states) and the spatial mean of the first state; per trajectory the first non-finite step and
the steps before VRMSE > 1. Means per step and over The Well's time windows, for all
trajectories and for each demo family, with its physics checks (Allen-Cahn bounds,
Navier-Stokes mean-vorticity drift). Ranks roll out their shard and reduce the sums once;
rank 0 prints the Markdown tables and writes DIR/eval.json, eval.md, vrmse.png and
frames_<group>_<trajectory>_<channel>.png. Exit code 0, or 2 for bad input (one `error:`).

eval.json keys: checkpoint {path, format, epoch?, global_step?}, dataset {root, name, split,
trajectories, excluded_nonfinite_data, stored_steps, spatial_shape, channels}, settings
{horizon, batch_size, world_size, time_windows [[start, stop)], spectral_bin_edges}, methods,
metrics, groups {name: {trajectories, finite {method: [per step]}, per_step and windows
{method: {metric: {fields {channel: [...]}, mean [...]}}}, rollout {steps_to_vrmse_above_1
{method: {mean, median, never_above}}, diverged, first_nonfinite_steps}, physics?}}, samples
[{trajectory, group, first_nonfinite_step, steps_to_vrmse_above_1 {method}, bounds_max_excess?}].
Undefined means are null.

Modules: `cli` (arguments, main, report, outputs), `inputs` (checkpoint, data, checks),
`groups` (demo families), `measure` (rollout and sums), `physics`, `summary` (sums -> numbers),
`render` (JSON, Markdown), `plot` (PNGs). The metrics themselves live in noa_dist/metrics.py.
"""

from noa_dist.evaluation.cli import main

__all__ = ["main"]
