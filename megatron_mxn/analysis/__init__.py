"""Measuring and predicting what a layout costs: counting collectives (`accounting`, which the
entry points use too: tests/test_import_layers.py places it below them), the cost model of
every collective, weight and KV byte (`cost_model`); and two tools the library never imports:
the layout planner (`plan`: `python -m megatron_mxn.analysis.plan`) and the A/B driver
(`ab_compare`: scripts/ab_compare.py)."""
