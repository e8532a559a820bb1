"""Default decision settings, in a module light enough for the CLI to import at start."""

#: components smaller than this many pixels are specks, not regions
DEFAULT_MIN_AREA = 25
#: target of the pixel threshold: regions per good image
DEFAULT_MAX_FALSE_REGIONS = 0.1

#: fewest good images at which fit holds some out to calibrate; below it, few-shot
#: mode (all fitted, thresholds from leave-one-out scores: decide.few_shot). On the
#: suite (benchmarks/fewshot.py) few-shot mode held the 1% target far better than
#: the 10% hold-out at 32 and at 64 images (false alarms on test/good 2.0% against
#: 24.6% and 21.2%) with higher image AUROC; larger sets were not measured
FEW_SHOT_BELOW = 64
