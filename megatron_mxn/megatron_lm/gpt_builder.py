"""The GPT model config and builder Megatron's loop uses for the grid: megatron's own, with the
grid's process groups added before the model is built.

Imports megatron.training at the top: import it only after the entry point's install()."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from megatron_mxn.megatron_lm.grid_groups import join_grid_groups


class MxnGPTModelBuilder(GPTModelBuilder):
    """megatron's GPTModelBuilder, after adding the grid's sub-groups (join_grid_groups)."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        join_grid_groups(self._model_config.transformer)
        return super().build_model(pg_collection, pre_process, post_process, vp_stage)


@dataclasses.dataclass(kw_only=True)
class MxnGPTModelConfig(GPTModelConfig):
    """GPTModelConfig built by MxnGPTModelBuilder (Megatron's loop builds the model through the
    config's `builder` path)."""

    builder: ClassVar[str] = "megatron_mxn.megatron_lm.gpt_builder.MxnGPTModelBuilder"
