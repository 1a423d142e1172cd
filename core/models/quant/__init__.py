"""Quantised weights kept packed in memory: GGUF block quantisations and fp8 storage.

``ggml`` turns the raw bytes of a GGUF tensor into a float tensor (torch, vectorised over blocks);
``layers`` holds packed weights (``QuantizedTensor``), the Linear/Conv2d/Embedding wrappers that dequantise
them at forward time, and ``assign_weights``, which puts a file's tensors into a network built on meta.

How a loader uses it (the networks need no change: they are built with plain nn.Linear/Conv2d/Embedding)::

    # GGUF (diffusion model or T5): core.models.gguf_file
    f = GGUFFile(path)                                        # CheckpointError for any bad file
    f.check_architecture({"flux"}, "a Flux diffusion model")  # or T5_ARCHITECTURES, "a T5-XXL text encoder"
    names = f.state_names()                                   # file name -> checkpoint-layout name
    shapes = {names[k]: s for k, s in f.shapes.items()}       # torch-order shapes: read the config off these
    tensors = {names[k]: f.get(k) for k in f.tensors}         # torch tensors (F32/F16/BF16) or QuantizedTensor
    # fp8 safetensors: tensors = {key: source.get(key)} as they are (fp8 weights, scale_weight, scaled_fp8);
    # skip is_quant_aux_key(key) when checking the file's keys against the network's, and do not cast them.
    module = build_on_meta(config)
    try:
        assign_weights(module, tensors, dtype=compute_dtype, device=device)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    module.eval().requires_grad_(False)
    module_bytes(module), quantization_label(module)          # memory held; "Q4_K", "fp8", "bf16" for listings
"""

from core.models.quant.ggml import GGML_TYPES, SUPPORTED_GGUF_TYPES, dequantize, qtype_size
from core.models.quant.layers import (
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    assign_weights,
    is_quant_aux_key,
    module_bytes,
    quantization_label,
)

__all__ = [
    "GGML_TYPES",
    "SUPPORTED_GGUF_TYPES",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedTensor",
    "assign_weights",
    "dequantize",
    "is_quant_aux_key",
    "module_bytes",
    "qtype_size",
    "quantization_label",
]
