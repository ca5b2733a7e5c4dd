"""Hugging Face checkpoints to Megatron checkpoints and back (Llama, Mistral, Mixtral, Qwen2,
Qwen3), exact or refused: `python -m megatron_mxn.convert` (docs/hf.md)."""
