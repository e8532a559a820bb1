"""Default decision settings, in a module light enough for the CLI to import at start."""

#: components smaller than this many pixels are specks, not regions
DEFAULT_MIN_AREA = 25
#: target of the pixel threshold: regions per good image
DEFAULT_MAX_FALSE_REGIONS = 0.1

#: fewest good images at which fit holds some out to calibrate; below it, few-shot
#: mode (all fitted, thresholds from leave-one-out scores: decide.few_shot)
FEW_SHOT_BELOW = 32
