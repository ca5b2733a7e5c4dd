"""Generation with the grid: the batched greedy loop over megatron-core's static KV cache,
pipelined over stages (`generation`), and the generation entry point for Megatron checkpoints
(`generate`: `python -m megatron_mxn.inference.generate`), with its flags and request checks
(`generate_flags`) and its timed runs and report (`benchmark`)."""
