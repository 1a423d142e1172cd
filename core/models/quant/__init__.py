"""Quantised weights kept packed in memory: GGUF block quantisations and fp8 storage.

``ggml`` turns the raw bytes of a GGUF tensor into a float tensor (torch, vectorised over blocks);
``layers`` holds packed weights (``QuantizedTensor``), the Linear/Conv2d/Embedding wrappers that dequantise
them at forward time, and ``assign_weights``, which puts a file's tensors into a network built on meta.
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
