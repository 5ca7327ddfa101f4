"""The two renderings of a report dict: the seed's sectioned text, and strict JSON."""

from __future__ import annotations

import json

from noa_dist.align_report.verdict import SECTIONS
from noa_dist.diagnose.report import finite_json

RULE = "=" * 60


def to_json(report: dict) -> str:
    """Strict JSON: NaN/Inf become the strings "nan", "inf", "-inf"."""
    return json.dumps(finite_json(report), indent=2, allow_nan=False)


def render(report: dict) -> str:
    sections = [
        _header(report),
        _reconstruction(report),
        _diversity(report),
        _alignment(report),
        _temporal(report),
        _summary(report),
    ]
    return "\n\n".join(sections)


def _assessment(what: str, verdict: dict) -> str:
    return f"➜ {what} Assessment: {verdict['label']} ({verdict['reason']})"


def _header(r: dict) -> str:
    s = r["settings"]
    excluded = s["excluded_nonfinite"]
    lines = [
        RULE,
        "L_latent Alignment Diagnostics",
        RULE,
        f"checkpoint  {r['checkpoint']} ({r['format']})",
        f"tokenizer   {r['tokenizer']} (windows of {s['window_length']} steps)",
        f"data        {r['dataset']} split {r['split']}: {s['trajectories']} trajectories x "
        f"{s['windows_per_trajectory']} windows (T={s['timesteps']}) = {s['windows']} windows, "
        f"{s['world_size']} process(es)",
    ]
    if excluded:
        lines.append(f"[!!] {excluded} trajectories left out: their rollout went non-finite")
    return "\n".join(lines)


def _reconstruction(r: dict) -> str:
    rec = r["reconstruction"]
    lines = [
        "1. VQ Reconstruction Quality",
        "Per-category reconstruction MSE (normalised units; EV = explained variance):",
        f"  {'':<12}  {'pred':>21}  {'truth':>21}",
    ]
    for name in rec["pred"]:
        p, t = rec["pred"][name], rec["truth"][name]
        lines.append(
            f"  {name.upper():<12}: {p['recon_mse']:>8.4f} (EV {p['explained_variance']:+.3f})"
            f"  {t['recon_mse']:>8.4f} (EV {t['explained_variance']:+.3f})"
        )
    return "\n".join([*lines, _assessment("Quality", rec["verdict"])])


def _diversity(r: dict) -> str:
    d = r["token_diversity"]
    lines = ["2. Token Diversity and Agreement (per codebook, never pooled)"]
    for row in d["codebooks"]:
        p, t, size = row["pred"], row["truth"], row["codebook_size"]
        lines += [
            f"  {row['name'].upper():<9} K={size}, n={row['n']} windows"
            f" (at most {row['max_utilization']:.0%} reachable)",
            f"    pred : {p['codes_used']}/{size} used ({p['utilization']:.1%}), "
            f"perplexity {p['perplexity']:.2f}, entropy {p['entropy']:.2f} "
            f"({p['entropy_ratio']:.2f} of log K)",
            f"    truth: {t['codes_used']}/{size} used ({t['utilization']:.1%}), "
            f"perplexity {t['perplexity']:.2f}, entropy {t['entropy']:.2f} "
            f"({t['entropy_ratio']:.2f} of log K)",
            f"    agreement pred vs truth: {row['agreement']:.1%} "
            f"(chance {row['chance_agreement']:.1%})  [{row['verdict']['label']}: "
            f"{row['verdict']['reason']}]",
        ]
    return "\n".join([*lines, _assessment("Diversity", d["verdict"])])


def _alignment(r: dict) -> str:
    a = r["alignment"]
    pair, zz = a["latent_pair"], a["pred_vs_truth"]
    lines = ["3. Alignment Correlation"]
    if pair["available"]:
        lines += [
            "projector(bottleneck) vs z_e(truth) (the L_latent pair):",
            f"  Cosine similarity: {pair['cosine_mean']:.3f} ± {pair['cosine_std']:.3f}",
            f"  L_latent (MSE): {pair['mse']:.4g}",
        ]
    else:
        lines.append(f"projector(bottleneck) vs z_e(truth): {pair['reason']}")
    lines += [
        "z_e(pred) vs z_e(truth):",
        f"  Cosine similarity: {zz['cosine_mean']:.3f} ± {zz['cosine_std']:.3f}",
        f"  MSE: {zz['mse']:.4g}",
    ]
    return "\n".join([*lines, _assessment("Correlation", a["verdict"])])


def _temporal(r: dict) -> str:
    t = r["temporal"]
    lines = [
        f"4. Temporal Consistency (|z_e| over the {t['windows_per_trajectory']} windows of a trajectory)"
    ]
    for side in ("pred", "truth"):
        s = t[side]
        lines.append(
            f"  {side:<5}: latent norm {s['norm_mean']:.3f} ± {s['norm_std']:.3f}, "
            f"coefficient of variation {s['cv']:.3f}"
        )
    return "\n".join([*lines, _assessment("Consistency", t["verdict"])])


def _summary(r: dict) -> str:
    v = r["verdict"]
    lines = ["Overall Summary"]
    for key, title in SECTIONS.items():
        lines.append(f"{title + ':':<23} {r[key]['verdict']['label']}")
    return "\n".join([*lines, "", f"➜ Final Verdict: {v['title']}"])
