"""A pytest plugin of `bench.py gpu`: the Triton kernel tests once more under another launch configuration, so that
one GPU run tells what a failure on the card depends on (`pytest -p benchmarks.launch_probe`, the variant in the
environment variable REFINE_LAUNCH_PROBE):
  min32      no tile narrower than 32: 16-wide heads padded to 32 and masked, as any head width that is not a power
             of two already is (the first GPU check's failures all had a 16-wide tile);
  one_stage  num_stages=1 for every launch (no software pipelining of the loads).
kernels/triton_tiles.launch_config stays the one place that picks launches; this only wraps it for a test process."""
import os

from kernels import triton_delta, triton_delta_bwd, triton_tiles

VARIANTS = ("min32", "one_stage")


def probed(variant):
    """launch_config(DK, DV, dtype) as the variant changes it."""
    def config(DK, DV, dtype):
        if variant == "min32":  # launch_config pads a head to the next power of two: 17..32 -> 32
            return triton_tiles.launch_config(max(DK, 32), max(DV, 32), dtype)
        blocks, opts = triton_tiles.launch_config(DK, DV, dtype)
        return blocks, dict(opts, num_stages=1)
    return config


def pytest_configure(config):
    variant = os.environ.get("REFINE_LAUNCH_PROBE")
    if variant not in VARIANTS:
        raise ValueError(f"REFINE_LAUNCH_PROBE must be one of {', '.join(VARIANTS)}; got {variant!r}")
    for module in (triton_delta, triton_delta_bwd):  # both launchers look launch_config up at call time
        module.launch_config = probed(variant)
