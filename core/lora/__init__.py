"""LoRA, LoCon, LoHa and LoKr networks: how users ask for them and how they are merged into a model.

- ``tags``: A1111 ``<lora:name:te:unet>`` prompt tags and the request's ``loras`` entries (stdlib only: the
  request module and the UI thread use it);
- ``names``: every format's key suffixes -> (module name, part) (stdlib only);
- ``keymap``: the tables that map a LoRA's module names (kohya ``lora_unet_*``, PEFT ``unet.*``, LDM or
  diffusers block names) onto our modules, which each family's ``lora_keys`` function builds (stdlib only);
- ``detect`` / ``check``: a LoRA's family from its keys, and a LoRA checked against a checkpoint from the two
  headers (stdlib only: the batch runner does it before any job runs);
- ``files``: reading a LoRA file into normalised modules (target name, kind, tensors, alpha) and their deltas;
- ``patch``: merging deltas into the weights in place and taking them out again bit for bit.

``files`` and ``patch`` import torch; this package's ``__init__`` and the stdlib modules do not, so
``core.lora.tags`` is cheap to import.
"""

from core.errors import DarkroomError


class LoraError(DarkroomError):
    """A LoRA cannot be used with this model (other family, unknown format, shapes that do not fit)."""
