"""Hugging Face interop: export checkpoints as safetensors folders (transformers LlamaForCausalLM
for dense apps/main models, lingua's own layout for memory layers and Memory Mosaics) and load
such folders back (`lingua.checkpoint.load_model_weights` dispatches them to `folders`).

Modules: `export` (the export command), `folders` (reading and loading folders), `llama` (names,
RoPE layout and config of LlamaForCausalLM), `tokenizer_files` (tokenizer.json for lingua's
tokenizers), `safetensors_io` (the streaming writer). Needs the `hf` extra (transformers,
safetensors); `python -m lingua.hf --help` lists the commands.
"""
