"""Defect-type classification: transfer learning from a pretrained backbone on
labelled images (``DATA/<class>/*``, a CSV manifest, or an MVTec test set's
defect types; see :mod:`defectkit.data.labelled`).

Kept apart from :mod:`defectkit.methods`, whose modules are anomaly models
learning from good images alone: a classifier has another contract
(``fit(images, labels)``, ``predict_proba``, ``predict``), so it is not in the
method registry. A model file holds it alone (``method: "classifier"``) or next
to an anomaly model (a bundle: each NG part also gets its type).
"""

from defectkit.classify.augment import Augmentation
from defectkit.classify.classifier import CLASSIFIER_METHOD, DefectClassifier, is_classifier_file
from defectkit.classify.features import POOLINGS, PooledFeatures, classifier_layers

__all__ = [
    "CLASSIFIER_METHOD",
    "POOLINGS",
    "Augmentation",
    "DefectClassifier",
    "PooledFeatures",
    "classifier_layers",
    "is_classifier_file",
]
