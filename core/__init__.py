"""Darkroom's pipeline core: models, samplers, queue and worker. Never imports Textual or Rich."""

import warnings

# numpy is no dependency of the core (only gguf brings it, for GGUF files); without it, importing torch warns
# "Failed to initialize NumPy" on stderr, which tells a user nothing they can act on.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
