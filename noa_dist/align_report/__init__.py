"""`noa-align-report`: does the NOA's rollout live on its tokenizer's manifold, and does its
bottleneck predict the tokenizer's latent? The seed's latent alignment diagnostics, done right.

    noa-align-report --checkpoint runs/X/best [--vqvae-path DIR] [--dataset ROOT]
        [--split valid] [--n-samples N] [--timesteps T] [--batch-size B]
        [--json OUT.json] [--figure OUT.png]
    accelerate launch --multi_gpu --num_processes 2 -m noa_dist.align_report ...   # sharded

Each trajectory of the split is rolled out autoregressively for T steps (as validation does)
and cut into windows of the tokenizer's length; each predicted window and its true window are
featurized and encoded by the frozen tokenizer. Ranks measure their shard of the split and
reduce the sums once; rank 0 prints. Sections: 1. reconstruction per category (pred and
truth), 2. per-codebook utilization / perplexity / entropy with the sample count, and token
agreement pred vs truth, 3. cosine similarity of the L_latent pair (projector(bottleneck) vs
z_e(truth)) and of z_e(pred) vs z_e(truth), 4. the coefficient of variation of |z_e| over a
trajectory's windows, prediction against truth; then a verdict per section and overall
(thresholds in `verdict`). Exit code 0 with a report, 2 for bad input (one `error:` line).

`--json` keys: checkpoint, format, tokenizer, dataset, split, settings {timesteps,
window_length, windows_per_trajectory, batch_size, trajectories, windows, excluded_nonfinite,
latent_sample_steps, world_size}, reconstruction {pred, truth: {category: {recon_mse,
explained_variance, commit}}, verdict}, token_diversity {codebooks: [{name, codebook_size, n,
max_utilization, pred/truth: {codes_used, utilization, perplexity, entropy, entropy_ratio},
agreement, chance_agreement, verdict}], verdict}, alignment {latent_pair {available, reason |
cosine_mean, cosine_std, mse, histogram}, pred_vs_truth {...}, histogram_edges, verdict},
temporal {windows_per_trajectory, pred/truth {norm_mean, norm_std, cv, norm_per_window,
norm_std_per_window}, cv_difference, verdict}, verdict {status, title, sections}. A verdict is
{status: good|strong|moderate|poor|weak|n/a, label, reason}. Non-finite numbers are "nan".

Modules: `cli` (arguments, main, outputs), `inputs` (checkpoint, tokenizer, data, checks),
`measure` (rollout, tokenization, sums, the one reduction), `summary` (the numbers from the
sums), `verdict` (thresholds), `render` (text, JSON), `plot` (the figure).
"""

from noa_dist.align_report.cli import main

__all__ = ["main"]
