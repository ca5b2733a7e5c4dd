"""Predicting what a layout costs: the cost model of every collective, weight and KV byte
(`cost_model`, in the convention of megatron_mxn.accounting, which counts the measured ones)
and the planner's model (`planner`: the layouts a cluster allows, each one's predicted memory
and times as typed results). The planner's report writers and CLI
(`python -m megatron_mxn.tools.plan`) and the A/B driver are tools: megatron_mxn.tools."""
