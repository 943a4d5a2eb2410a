"""Memory Mosaics: the leaky-average operator, associative memory blocks and the language model."""
