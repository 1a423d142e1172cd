"""Darkroom's pipeline core: models, samplers, queue and worker. Never imports Textual or Rich."""

import warnings

# numpy is not a runtime dependency and the core never uses it; without it, importing torch warns
# "Failed to initialize NumPy" on stderr, which tells a user nothing they can act on.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
