"""Tools around the library, which nothing in the library imports: the A/B driver
(`ab_compare`: scripts/ab_compare.py) and the layout planner's report writers and CLI (`plan`:
`python -m megatron_mxn.tools.plan`, over the model of megatron_mxn.analysis.planner). The
demo (`python -m megatron_mxn.demo`) and the scripts of scripts/ (benchmarks) are tools too."""
