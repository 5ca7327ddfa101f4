"""The seed's thresholds, one verdict per section and one overall.

  VQ reconstruction   pred recon MSE < 0.5 in every category (normalised units): good
  token diversity     pred utilization > 50% in every codebook: good; a codebook is judged
                      only with n >= MIN_WINDOWS_PER_CODE x K windows (fewer could not fill
                      it even with uniform code use: 1 - exp(-3) = 95% expected at 3 per code)
  alignment           cosine(projector(bottleneck), z_e(truth)) > 0.8 strong, > 0.5 moderate
                      (the seed's line), else weak; n/a without a projector
  temporal            |CV(pred) - CV(truth)| < 0.1: good (the truth's own variation over a
                      trajectory is the reference, not 0); n/a with one window per trajectory
Overall: GOOD when no judged section is poor, POOR otherwise, INCONCLUSIVE if none was judged.
"""

from __future__ import annotations

import math

from noa_dist.features import CATEGORIES

RECON_GOOD = 0.5
UTILIZATION_GOOD = 0.5
MIN_WINDOWS_PER_CODE = 3
COSINE_STRONG, COSINE_MODERATE = 0.8, 0.5
CV_TOLERANCE = 0.1
SECTIONS = {
    "reconstruction": "VQ Reconstruction",
    "token_diversity": "Token Diversity",
    "alignment": "Alignment Correlation",
    "temporal": "Temporal Consistency",
}
LABELS = {"good": "Good", "strong": "Strong", "moderate": "Moderate", "poor": "Poor",
          "weak": "Weak", "n/a": "N/A"}  # fmt: skip
BAD = ("poor", "weak")


def _verdict(status: str, reason: str) -> dict:
    return {"status": status, "label": LABELS[status], "reason": reason}


def reconstruction_verdict(recon: dict) -> dict:
    pred = recon["pred"]
    bad = [c for c in CATEGORIES if not pred[c]["recon_mse"] < RECON_GOOD]
    if bad:
        worst = ", ".join(f"{c.upper()} {pred[c]['recon_mse']:.3g}" for c in bad)
        truth_bad = [c for c in bad if not recon["truth"][c]["recon_mse"] < RECON_GOOD]
        note = (
            f"; the true windows too in {', '.join(c.upper() for c in truth_bad)}: the "
            "tokenizer itself reconstructs poorly"
            if truth_bad
            else ""
        )
        return _verdict("poor", f"pred MSE >= {RECON_GOOD}: {worst}{note}")
    return _verdict("good", f"pred MSE < {RECON_GOOD} in every category: the outputs tokenize well")


def codebook_verdict(row: dict) -> dict:
    n, size, used = row["n"], row["codebook_size"], row["pred"]["utilization"]
    if n < MIN_WINDOWS_PER_CODE * size:
        return _verdict(
            "n/a",
            f"{n} windows cannot judge {size} codes (need >= {MIN_WINDOWS_PER_CODE * size}: "
            "more --n-samples or --timesteps)",
        )
    if used > UTILIZATION_GOOD:
        return _verdict("good", f"{used:.1%} of {size} codes used")
    return _verdict(
        "poor", f"only {used:.1%} of {size} codes used (truth {row['truth']['utilization']:.1%})"
    )


def diversity_verdict(rows: list[dict]) -> dict:
    judged = [(r["name"], r["verdict"]) for r in rows if r["verdict"]["status"] != "n/a"]
    if not judged:
        return _verdict("n/a", "too few windows to judge any codebook")
    poor = [name.upper() for name, v in judged if v["status"] == "poor"]
    skipped = len(rows) - len(judged)
    note = f" ({skipped} codebook(s) not judged: too few windows)" if skipped else ""
    if poor:
        return _verdict("poor", f"utilization <= {UTILIZATION_GOOD:.0%} in {', '.join(poor)}{note}")
    return _verdict("good", f"utilization > {UTILIZATION_GOOD:.0%} in every judged codebook{note}")


def alignment_verdict(cos: dict) -> dict:
    pair = cos["latent_pair"]
    if not pair["available"]:
        return _verdict("n/a", pair["reason"])
    c = pair["cosine_mean"]
    if c > COSINE_STRONG:
        return _verdict("strong", f"cosine {c:.3f} > {COSINE_STRONG}")
    if c > COSINE_MODERATE:
        return _verdict("moderate", f"cosine {c:.3f} > {COSINE_MODERATE}: moderate alignment")
    return _verdict(
        "weak", f"cosine {c:.3f} <= {COSINE_MODERATE}: the bottleneck barely predicts z_e(truth)"
    )


def temporal_verdict(t: dict) -> dict:
    if t["windows_per_trajectory"] < 2:
        return _verdict(
            "n/a", "one window per trajectory: pass --timesteps >= 2 x the tokenizer's window"
        )
    diff = t["cv_difference"]
    pred, truth = t["pred"]["cv"], t["truth"]["cv"]
    if not math.isfinite(diff):
        return _verdict("n/a", "no finite trajectory")
    if abs(diff) < CV_TOLERANCE:
        return _verdict("good", f"CV {pred:.3f} vs truth {truth:.3f}, |diff| < {CV_TOLERANCE}")
    how = "drifts more than" if diff > 0 else "varies less than"
    return _verdict(
        "poor", f"CV {pred:.3f}: the prediction's latent {how} the truth's ({truth:.3f})"
    )


def overall_verdict(sections: dict[str, dict]) -> dict:
    statuses = {name: v["status"] for name, v in sections.items()}
    judged = {n: s for n, s in statuses.items() if s != "n/a"}
    bad = [SECTIONS[n] for n, s in judged.items() if s in BAD]
    if not judged:
        status, title = "inconclusive", "INCONCLUSIVE - no section could be judged"
    elif bad:
        status, title = "poor", f"POOR - {', '.join(bad)} below the thresholds"
    elif statuses["alignment"] == "n/a":
        status = "good"
        title = "GOOD - predictions tokenize like the truth (no L_latent: not trained with --enable-latent-loss)"
    else:
        status, title = "good", "GOOD - L_latent provides meaningful alignment"
    return {"status": status, "title": title, "sections": statuses}
