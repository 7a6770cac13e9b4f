"""Classification quality from a confusion matrix, counted with torch.bincount, every figure derived here.

Counted by hand, not by a metrics library: importing torchmetrics pulls in scipy.signal and costs
2.2 s of CPU in every evaluating process, a third of a tiny run. tests/test_run.py checks every
figure here against scikit-learn (test_metrics_match_sklearn)."""
from __future__ import annotations

import torch

from emotion_models.labels import CLASSES


def quality(preds: torch.Tensor, target: torch.Tensor) -> dict:
    """Accuracy, macro-F1, UAR (macro recall), per-class P/R/F1 and the confusion matrix.

    Rows of the confusion matrix are true classes, columns predictions, in CLASSES order.
    A class with no true and no predicted samples gets 0 for its F1 and still counts in the macro
    average (sklearn's zero_division=0), so an absent class is never silently ignored.
    """
    k = len(CLASSES)
    if (preds.shape != target.shape or preds.ndim != 1 or preds.is_floating_point() or target.is_floating_point()
            or preds.is_complex() or target.is_complex()
            or (preds.numel() and (min(preds.min(), target.min()) < 0 or max(preds.max(), target.max()) >= k))):
        raise ValueError(f"quality: predictions and targets must be 1-D class indices 0..{k - 1} of one shape")
    preds, target = preds.cpu().long(), target.cpu().long()
    cm = torch.bincount(target * k + preds, minlength=k * k).reshape(k, k).to(torch.float64)
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "uar": float(recall.mean()),
        "num_samples": int(total),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(CLASSES)},
        "confusion_matrix": cm.to(torch.int64).tolist(),
    }
