"""Score fusion: several methods fitted on the same good images, each one's scores
and maps brought to one scale on good images it did not see, then added.

A memory bank (PatchCore) and per-position Gaussians (PaDiM) fail on different
parts. On the suite (``benchmarks/suite.py --method ensemble``; image AUROC on
magnetic-tile, mvtec-bottle, visa-fryum, aitex, casting) this gave 0.978 / 1.000
/ 0.947 / 0.903 / 0.997, mean 0.965, against PatchCore's 0.965 / 1.000 / 0.969 /
0.843 / 0.997 (0.955) and PaDiM's 0.981 / 1.000 / 0.928 / 0.858 / 0.993 (0.952).
It is not the default: visa-fryum falls by 0.022, AUPRO from 0.764 to 0.628
(PaDiM's maps are coarse), and it costs both fits and both scorings (fit 133 s
and 12 images/s on magnetic-tile, against 59 s and 31 for PatchCore alone).
Re-measured once PatchCore read its score against a reference pool: 0.983 /
1.000 / 0.968 / 0.888 / 0.996, mean 0.967, against PatchCore's own 0.977 /
1.000 / 0.970 / 0.927 / 0.997 (0.974, with reference_global 0.5), AUPRO 0.689 /
0.720 / 0.696 / 0.598; PatchCore now uses 0.75 (0.976), the ensemble not re-measured.

Each member's image score ``s`` becomes ``(s - loc) / scale`` with ``loc`` the
median and ``scale`` the robust spread (1.4826 MAD, floored) of its scores on the
reference images: ``reference_fraction`` of the training images, held out from
the members' fit (seeded). Its map gets the same affine map, so the fused image
score (the sum of the members' standardised scores) is never below the fused
map's peak when each member's score is never below its own map's peak.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from defectkit.data.files import seeded_split, take
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import AnomalyModel, Image, Progress, ScoreResult, check_images

#: the smallest spread a member's reference scores are given, relative to their
#: median's size (reference scores that are all alike would divide by ~0)
_MIN_SCALE = 1e-3


class Ensemble(AnomalyModel):
    """Sum of standardised scores of several methods.

    >>> Ensemble(members=["patchcore", "padim"]).fit(good_images)       # doctest: +SKIP
    >>> Ensemble(member_params={"padim": {"context_size": 0}})          # doctest: +SKIP
    """

    name = "ensemble"
    summary = "fusion of patchcore and padim scores, each standardised on held-out good images"

    def __init__(
        self,
        members: list[str] | None = None,
        member_params: dict[str, dict[str, Any]] | None = None,
        reference_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.members = members
        self.member_params = member_params
        self.reference_fraction = reference_fraction
        self.seed = seed

    def _member_names(self) -> list[str]:
        return list(self.members) if self.members is not None else ["patchcore", "padim"]

    def _new_members(self) -> list[AnomalyModel]:
        from defectkit.methods import get_method

        names = self._member_names()
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"ensemble members must be two or more distinct methods, got {names}")
        params = dict(self.member_params or {})
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ConfigError(f"member_params for methods not in the ensemble: {unknown}")
        out = []
        for name in names:
            if name == self.name:
                raise ConfigError("an ensemble cannot hold another ensemble")
            cls = get_method(name)
            own = dict(params.get(name) or {})
            cls.check_params(own)
            if "seed" in inspect.signature(cls).parameters and "seed" not in own:
                own["seed"] = self.seed
            out.append(cls(**own))
        return out

    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> Ensemble:
        """Fit every member on the images less the reference share, then measure
        each member's scores on the reference images."""
        if not 0 < self.reference_fraction < 1:
            raise ConfigError(
                f"reference_fraction must be in (0, 1), got {self.reference_fraction}"
            )
        members = self._new_members()
        images = check_images(images)
        n = len(images)
        if n < 2:
            raise ConfigError("an ensemble needs at least 2 good images (fit and reference)")
        fit_index, ref_index = self._reference_split(n)
        reference, fit_set = take(images, ref_index), take(images, fit_index)
        refs = []
        for member in members:
            member.fit(fit_set, progress=progress)
            s = np.asarray(member.score(reference, progress=progress).scores, np.float64)
            loc = float(np.median(s))
            scale = 1.4826 * float(np.median(np.abs(s - loc)))
            refs.append([loc, max(scale, _MIN_SCALE * max(abs(loc), 1.0))])
        self.members_ = members
        self.refs_ = np.array(refs, np.float64)
        self.fit_index_ = fit_index
        return self

    def _reference_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted indices (members' fit, reference) of ``n`` images, seeded."""
        n_ref = min(n - 1, max(1, round(n * self.reference_fraction)))
        fit_index, ref_index = seeded_split(n, n_ref, self.seed)
        return fit_index.astype(np.int64), ref_index.astype(np.int64)

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        self._require_fitted()
        images = check_images(images)
        scores = np.zeros(len(images), np.float64)
        maps: list[np.ndarray] = []
        extras: list[dict[str, Any]] = [{"members": {}} for _ in images]
        for member, (loc, scale) in zip(self.members_, self.refs_, strict=True):
            res = member.score(images, progress=progress)
            scores += (np.asarray(res.scores, np.float64) - loc) / scale
            parts = [(m.astype(np.float32) - np.float32(loc)) / np.float32(scale) for m in res.maps]
            maps = parts if not maps else [a + b for a, b in zip(maps, parts, strict=True)]
            for i, extra in enumerate(res.extras or [{} for _ in images]):
                extras[i]["members"][member.name] = extra
                ng = dict(extra.get("nearest_good") or {})
                j = ng.get("train_index")
                if isinstance(j, int) and 0 <= j < len(self.fit_index_):
                    # a memory bank's train index, into this ensemble's training images
                    ng["train_index"] = int(self.fit_index_[j])
                    extras[i].update(nearest_good=ng, grid=extra.get("grid"))
        return ScoreResult(scores=scores.astype(np.float32), maps=maps, extras=extras)

    # -- persistence ------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays: dict[str, np.ndarray] = {"refs": self.refs_, "fit_index": self.fit_index_}
        parts = []
        for k, member in enumerate(self.members_):
            member_arrays, state = member.learned_state()
            arrays.update({f"m{k}.{key}": v for key, v in member_arrays.items()})
            parts.append({"method": member.name, "params": member.get_params(), "state": state})
        return arrays, {"members": parts}

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        from defectkit.methods import get_method

        parts = info.get("members")
        if not isinstance(parts, list) or len(parts) < 2:
            raise ModelFileError("ensemble model: members missing or malformed")
        refs, fit_index = arrays.get("refs"), arrays.get("fit_index")
        if refs is None or refs.shape != (len(parts), 2) or not np.all(np.isfinite(refs)):
            raise ModelFileError("ensemble model: refs missing or malformed")
        if np.any(refs[:, 1] <= 0):
            raise ModelFileError("ensemble model: refs hold a spread <= 0")
        if fit_index is None or fit_index.ndim != 1 or np.any(fit_index < 0):
            raise ModelFileError("ensemble model: fit_index missing or malformed")
        members = []
        for k, part in enumerate(parts):
            try:
                cls = get_method(str(part["method"]))
                params = dict(part.get("params") or {})
                cls.check_params(params)
                member = cls(**params)
            except (KeyError, TypeError, ConfigError) as e:
                raise ModelFileError(f"ensemble model: member {k} malformed ({e})") from None
            prefix = f"m{k}."
            own = {key[len(prefix) :]: v for key, v in arrays.items() if key.startswith(prefix)}
            member.load_learned_state(own, dict(part.get("state") or {}))
            members.append(member)
        self.members_ = members
        self.refs_ = refs.astype(np.float64)
        self.fit_index_ = fit_index.astype(np.int64)
