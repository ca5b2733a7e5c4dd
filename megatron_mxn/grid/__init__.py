"""The head-group x dim-slice grid itself, independent of any model: which heads, dims and
weight rows each rank (i, j) owns (`layout`), the grid's process groups inside megatron's TP
group (`groups`), and the attention-dropout RNG stream shared by a head group (`rng`)."""
