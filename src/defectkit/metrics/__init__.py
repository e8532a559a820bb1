"""Evaluation metrics: image AUROC / AP / F1, pixel AUROC, AUPRO and a report;
accuracy, macro-F1 and the confusion matrix of a defect-type classifier.

Convention: label 1 = defective, 0 = good; a higher score is more anomalous.
"""

from defectkit.metrics.classification import classification_report, format_classification
from defectkit.metrics.evaluate import evaluate, format_table
from defectkit.metrics.image import f1_max, image_ap, image_auroc, recall_per_type
from defectkit.metrics.pixel import aupro, pixel_auroc

__all__ = [
    "aupro",
    "classification_report",
    "evaluate",
    "f1_max",
    "format_classification",
    "format_table",
    "image_ap",
    "image_auroc",
    "pixel_auroc",
    "recall_per_type",
]
