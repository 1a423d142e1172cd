"""Feature-cache options of a request (DeepCache, first-block cache), checked without importing torch.

The request validates the numbers (``core.request``); this module says, before a job runs, where a cache does
not apply: a family whose network has no cache hook, a few-step (distilled) run, two caches at once. The caches
themselves are in :mod:`core.accel.feature_cache`. Facts: ``shared/reference/sampling.md`` sections 6-7.
"""

from __future__ import annotations

from typing import Any

# Which caches each network class can run (its forward calls core.accel.feature_cache). A family whose denoiser
# is not listed gets a warning and runs uncached.
HOOKS: dict[str, tuple[str, ...]] = {
    "core.models.unet:UNetModel": ("deepcache", "fbcache"),
    "core.models.flux:Flux": ("fbcache",),
}
LABELS = {"deepcache": "DeepCache", "fbcache": "first-block cache"}
MAX_DEEPCACHE_INTERVAL = 20
MAX_DEEPCACHE_BRANCH = 10  # SD1.x/SD2.x have input blocks 0..11: the branch ends at input block branch + 1
FEW_STEPS = 8  # at or below this many steps a cache skips too little to pay (LCM/Turbo/Lightning runs)


def requested(request: Any) -> list[str]:
    """The caches ``request`` asks for, by key (``deepcache``, ``fbcache``)."""
    out = []
    if getattr(request, "deepcache_interval", 1) > 1:
        out.append("deepcache")
    if getattr(request, "fbcache_threshold", 0.0) > 0:
        out.append("fbcache")
    return out


def network_hooks(family: Any) -> tuple[str, ...]:
    """The caches the denoiser of ``family`` (a ``ModelFamily``) has hooks for."""
    try:
        network = family.component("unet").network
    except (KeyError, AttributeError, ValueError):
        return ()
    return HOOKS.get(network or "", ())


def cache_warnings(request: Any, family: Any | None = None) -> list[str]:
    """One sentence per cache setting of ``request`` that will not do what it says on a model of ``family``
    (``None``: not known yet, only the family-independent checks). The job still runs; a cache that cannot
    apply is left out."""
    asked = requested(request)
    if not asked:
        return []
    warnings = []
    if family is not None:
        hooks = network_hooks(family)
        for key in asked:
            if key not in hooks:
                warnings.append(
                    f"{LABELS[key]} does not apply to {family.label} models (their network has no cache hook), "
                    "so this job runs without it"
                )
        asked = [key for key in asked if key in hooks]
    if request.sampler == "lcm" or request.steps <= FEW_STEPS:
        for key in asked:
            warnings.append(
                f"{LABELS[key]} with {request.steps} steps ({request.sampler}): few-step and distilled sampling "
                "changes the features a lot between steps, so a cache saves little and costs detail; it is "
                "most useful at 15 steps and more"
            )
    return warnings
