"""Measuring and predicting what a layout costs: counting collectives (`accounting`), the
cost model of every collective, weight and KV byte (`cost_model`), the layout planner
(`plan`: `python -m megatron_mxn.analysis.plan`) and the A/B driver (`ab_compare`)."""
