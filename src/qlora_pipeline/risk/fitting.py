"""Over- and underfitting from train-adapter's own metrics: a plain verdict by documented thresholds.

* **under**: the best validation loss fell less than ``underfit_min_improvement`` nats below the
  zero-shot one: training taught the model next to nothing about the persona's replies.
* **over**: the final validation loss rose more than ``overfit_rise`` above the best one (training
  went on past its best point), or lies more than ``overfit_gap`` above the final training loss
  (the model fits its training replies much better than unseen ones).
* **fit** otherwise. Early stopping firing is reported beside it: the saved adapter is then the
  best checkpoint's, so it guarded overfitting rather than showing it.
"""

from __future__ import annotations

from typing import Any


def fit_verdict(train: dict[str, Any], underfit_min_improvement: float, overfit_gap: float,
                overfit_rise: float) -> dict[str, Any]:
    """Verdict, the figures it rests on and the reasons, from ``metrics/train.json``."""
    zero_shot, best = train.get("zero_shot_val_loss"), train["best_val_loss"]
    final_val, final_train = train["final_val_loss"], train["final_train_loss"]
    improvement = None if zero_shot is None else zero_shot - best
    rise = final_val - best
    gap = final_val - final_train
    reasons = []
    if rise > overfit_rise:
        reasons.append(f"the final validation loss is {rise:.3f} nats above the best (> {overfit_rise})")
    if gap > overfit_gap:
        reasons.append(f"validation loss is {gap:.3f} nats above training loss (> {overfit_gap})")
    verdict = "over" if reasons else "fit"
    if improvement is not None and improvement < underfit_min_improvement:
        verdict = "under"
        reasons = [f"the best validation loss is only {improvement:.3f} nats below zero-shot "
                   f"(< {underfit_min_improvement})"]
    if verdict == "fit":
        reasons.append(f"validation loss fell {improvement:.3f} nats below zero-shot and ended "
                       f"{gap:+.3f} nats from training loss" if improvement is not None
                       else f"validation loss ended {gap:+.3f} nats from training loss")
    return {
        "verdict": verdict,
        "reasons": reasons,
        "zero_shot_val_loss": zero_shot,
        "best_val_loss": best,
        "final_val_loss": final_val,
        "final_train_loss": final_train,
        "improvement": None if improvement is None else round(improvement, 5),
        "train_val_gap": round(gap, 5),
        "rise_after_best": round(rise, 5),
        "best_step": train.get("best_step"),
        "last_step": train.get("steps"),
        "stopped_early": train.get("stopped_early"),
        "thresholds": {"underfit_min_improvement": underfit_min_improvement, "overfit_gap": overfit_gap,
                       "overfit_rise": overfit_rise},
    }
