"""The grid's self-attention layer for megatron-core: the SelfAttention subclass
(`self_attention`), its core attention and schedules (`core`, `schedules`), the fused kernels
(`kernels`), autograd collectives (`collectives`), q/k norm over dim slices (`qk_norm`),
dist-checkpoint sharding under megatron's keys (`sharding`), the TransformerConfig subclass
(`config`) and layer specs (`spec`). See docs/design.md."""
