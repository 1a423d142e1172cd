"""A stand-in for torchvision, for the tests only (see tests/spandrel_env.py).

spandrel imports every architecture when it is imported; two of them (LaMa, RestoreFormer) import
``torchvision.transforms.functional`` at module level. This machine's CPU torch has no torchvision that imports
beside it, so the tests that need spandrel put this package on ``sys.path`` when (and only when) a real
torchvision cannot be imported. It defines only the two names those modules import; the ESRGAN-family code paths
the tests run never call them, and calling them fails loudly.
"""
