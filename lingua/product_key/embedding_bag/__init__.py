"""The weighted embedding bag of product-key memory: `weighted_embedding_bag` (Triton on CUDA,
torch on CPU, row-sparse value gradient) and its torch reference (`naive`)."""

from lingua.product_key.embedding_bag.triton_bag import Backend, WeightedBagFunction, weighted_embedding_bag

__all__ = ["Backend", "WeightedBagFunction", "weighted_embedding_bag"]
