"""The library layer every entry point uses: the CLI, the service, the worker
processes, Ray and the report are thin shells over it.

- :func:`load`: a model file or ONNX bundle, once;
- :func:`fit`: good images in, a calibrated detector out (tiled or not, with
  classifier, re-scorer, mask head and provenance), from :class:`FitSettings`
  and :class:`FitData`;
- :func:`inspect`: paths in, inspect records out, a worker pool inside;
- :func:`score_dataset`, :func:`evaluate_dataset`, :func:`recalibrate`: a
  labelled set scored once for evaluate, report and calibrate.

It raises :class:`~defectkit.errors.DefectkitError` and returns results; it never
prints or exits.

>>> from defectkit import pipeline                                    # doctest: +SKIP
>>> result = pipeline.fit(pipeline.FitSettings(), pipeline.FitData(Path("bolt")))  # doctest: +SKIP
>>> result.detector.save("bolt.dkm")                                  # doctest: +SKIP
>>> det = pipeline.load("bolt.dkm")                                   # doctest: +SKIP
>>> for batch in pipeline.inspect(det, paths):                        # doctest: +SKIP
...     print(batch)
"""

from defectkit.pipeline.fitting import FitResult, fit, fit_type_classifier
from defectkit.pipeline.inspection import classify, inspect, inspect_batch
from defectkit.pipeline.loading import load, load_detector
from defectkit.pipeline.scoring import (
    TARGETS,
    check_target,
    classifier_figures,
    evaluate_dataset,
    recalibrate,
    score_dataset,
    worker_model,
    worker_pool,
)
from defectkit.pipeline.settings import CalibrationSettings, FitData, FitSettings

__all__ = [
    "TARGETS",
    "CalibrationSettings",
    "FitData",
    "FitResult",
    "FitSettings",
    "check_target",
    "classifier_figures",
    "classify",
    "evaluate_dataset",
    "fit",
    "fit_type_classifier",
    "inspect",
    "inspect_batch",
    "load",
    "load_detector",
    "recalibrate",
    "score_dataset",
    "worker_model",
    "worker_pool",
]
