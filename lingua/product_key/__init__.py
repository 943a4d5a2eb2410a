"""Product-key memory layers (Memory Layers at Scale): the layer, its value table and what the
training loop needs from them; the weighted embedding bag lives in `embedding_bag/`."""

from lingua.product_key.memory import (
    HashingMemory,
    MemoryValues,
    ProductKeyArgs,
    build_memory_layers,
    log_metrics,
    memory_flops_per_token,
    memory_layers,
    memory_param_groups,
    product_key_topk,
    value_param_count,
    value_tables,
)

__all__ = [
    "HashingMemory", "MemoryValues", "ProductKeyArgs", "build_memory_layers", "log_metrics",
    "memory_flops_per_token", "memory_layers", "memory_param_groups", "product_key_topk",
    "value_param_count", "value_tables",
]
