"""Product-key memory layers (Memory Layers at Scale): the layer, its value table and what the
training loop needs from them; the weighted embedding bag lives in `embedding_bag/`, values in
host memory (zero-copy) in `zero_copy/`."""

from lingua.product_key.memory import (
    HashingMemory,
    MemoryValues,
    ProductKeyArgs,
    ValueTable,
    build_memory_layers,
    build_values,
    log_metrics,
    memory_flops_per_token,
    memory_layers,
    memory_param_groups,
    product_key_topk,
    shard_value_tables,
    value_param_count,
    value_tables,
)
from lingua.product_key.zero_copy import ZeroCopyValues

__all__ = [
    "HashingMemory", "MemoryValues", "ProductKeyArgs", "ValueTable", "ZeroCopyValues", "build_memory_layers", "build_values",
    "log_metrics", "memory_flops_per_token", "memory_layers", "memory_param_groups", "product_key_topk",
    "shard_value_tables", "value_param_count", "value_tables",
]
