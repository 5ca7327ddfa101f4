"""`noa-diagnose`: why does training produce NaN/Inf (or huge) gradients? One command, one verdict.

    noa-diagnose --checkpoint runs/X/checkpoints/step-00000500 [--timesteps 256] [--json]

With the checkpoint's own config (dataset, T, window, mode; flags override) it runs a
training-like forward and backward on `--n-samples` windows and reports: the configuration
check, forward statistics per rollout step, the loss, gradient norms per parameter (naming
every non-finite one), the growth of the gradient back through the autoregressive chain,
and a verdict with the exact command that fixes it. Exit code 0: healthy; 1: a problem was
found; 2: bad input (one `error: ...` line).

`--json` prints one object with these keys (non-finite numbers as "nan", "inf", "-inf"):
  checkpoint, format ("step" | "zero" | "best" | "export"), dataset, split, device
  settings        {timesteps, bptt_window (null: full BPTT), tbptt_mode, batch_size, n_samples}
  trained_with    {timesteps, bptt_window, tbptt_mode, lr} from the checkpoint's config
  config_check    [{level ("problem" | "note"), message}]
  data            {nonfinite_samples: [description of each sample with NaN/Inf inputs]}
  forward         {steps: [{step, min, max, mean, std, nonfinite}] (predictions, step 1..T),
                   target: [same for the targets], nonfinite_total, first_nonfinite_step}
  loss            {traj: L_traj as training computes it, finite}
  gradients       {n_params, n_nonfinite, nonfinite_params: [names], no_grad_params: [names],
                   total_norm, norm_min, norm_p50, norm_p90, norm_p99, norm_max,
                   largest: [{name, norm}] (top 5)}
  chain           {window (steps with gradients), depths: [{depth, state_step, grad_norm,
                   chain_gain, growth}], amplification, growth_per_step,
                   extrapolated_steps, extrapolated_amplification}
                  depth k = k steps back from the end of a gradient window; grad_norm =
                  |dL/du|; chain_gain = |dL_last/du| / |dL_last/du_end| with L_last the loss
                  of the window's last step alone; growth = chain_gain ratio to depth k-1
  training_command  the training command the fixes extend (from the checkpoint)
  previous_checkpoint  the newest complete step checkpoint before this one, or null
  verdict         {status, healthy, title, reasons: [str], fixes: [{why, command}]}
  exit_code       0 or 1

Modules: `cli` (arguments, main, exit codes), `inputs` (checkpoint, config, data, settings),
`probe` (the measurement and its summaries), `verdict` (the rules and fixes), `report` (text
and JSON), `result` (the typed findings), `commands` (the training command a fix extends).
"""

from noa_dist.diagnose.cli import main

__all__ = ["main"]
