"""Every megatron-core attention option is exact or refused: the table of
megatron_mxn/attention/options.py classifies every TransformerConfig field (a megatron-core
upgrade that adds one fails here until someone classifies it), every SUPPORTED entry names a
test that exists, and every REFUSED option is refused, at build time, with its message."""

import copy
import dataclasses
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.inference.config import InferenceConfig
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

import megatron_mxn
from megatron_mxn.attention import options
from megatron_mxn.attention.config import MxnTransformerConfig
from megatron_mxn.attention.self_attention import MxnSelfAttention, _check_rotary_of_model
from megatron_mxn.grid.layout import MxnConfigError

REPO = Path(__file__).resolve().parent.parent


def _params(cls):
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


FIELDS = {
    "transformer": [f.name for f in dataclasses.fields(MxnTransformerConfig)],
    "model": _params(GPTModel) + _params(HybridModel),
    "inference": _params(StaticInferenceContext)
    + [f.name for f in dataclasses.fields(InferenceConfig)],
}


def _config(**extra):
    return MxnTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8,
                                num_query_groups=2, kv_channels=16,
                                tensor_model_parallel_size=4, mxn_dim_slices=2,
                                use_cpu_initialization=True, **extra)


@pytest.mark.parametrize("table", list(FIELDS))
def test_every_field_is_classified(table):
    assert options.unclassified(FIELDS[table], options.TABLES[table]) == []
    # and the table names nothing megatron-core does not have (a renamed field)
    stale = set(options.TABLES[table]) - set(FIELDS[table]) - set(options.YARN_ATTRIBUTES)
    assert not stale, sorted(stale)
    assert {f.name for f in dataclasses.fields(TransformerConfig)} <= set(FIELDS["transformer"])


def test_the_audit_fails_without_one_entry():
    for table, name in (("transformer", "window_size"), ("transformer", "tp_comm_overlap"),
                        ("inference", "max_batch_size")):
        partial = dict(options.TABLES[table])
        del partial[name]
        assert options.unclassified(FIELDS[table], partial) == [name]


def test_every_entry_is_well_formed():
    for table in options.TABLES.values():
        for name, option in table.items():
            assert option.kind in (options.ORTHOGONAL, options.SUPPORTED, options.REFUSED)
            if option.kind == options.SUPPORTED:
                assert re.fullmatch(r"tests/\w+\.py::test_\w+(\[[\w.-]+\])?", option.test), name
            else:
                assert option.why and not option.test, name
            if option.kind == options.REFUSED:
                assert option.when is not None, name


SUPPORTED_TESTS = sorted({o.test for t in options.TABLES.values() for o in t.values()
                          if o.kind == options.SUPPORTED})


@pytest.mark.parametrize("test_id", SUPPORTED_TESTS)
def test_supported_options_name_existing_tests(test_id):
    """(tests/test_attention_options.py and tests/test_rope_variants.py are written alongside
    the table; until they exist, their entries fail here.)"""
    path, name = test_id.split("::")
    m = re.fullmatch(r"(test_\w+)(?:\[([\w.-]+)\])?", name)
    source = (REPO / path).read_text() if (REPO / path).exists() else ""
    assert source, f"{path} does not exist"
    assert re.search(rf"^\s*def {m.group(1)}\(", source, re.M), f"{path} has no {m.group(1)}"
    for param in (m.group(2) or "").split("-"):
        assert param in source, f"{path} has no case {param!r}"


REFUSED = sorted(n for n, o in options.TRANSFORMER_OPTIONS.items()
                 if o.kind == options.REFUSED)


def test_defaults_pass():
    options.check_config(_config())
    options.check_config(TransformerConfig(num_layers=2, hidden_size=64,
                                           num_attention_heads=8))
    options.check_model(position_embedding_type="rope", rotary_percent=0.5)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_option_raises_its_message(name):
    option = options.TRANSFORMER_OPTIONS[name]
    config = copy.copy(_config())
    setattr(config, name, option.example)
    with pytest.raises(MxnConfigError) as err:
        options.check_config(config, layer_number=3)
    assert str(err.value) == "layer 3: " + option.message(name, option.example)
    assert f"{name}=" in str(err.value) and option.why in str(err.value)


def test_refused_model_option_names_mrope():
    with pytest.raises(MxnConfigError, match=r"position_embedding_type='mrope' is not "
                                             r"supported by the grid attention: multimodal RoPE"):
        options.check_model(position_embedding_type="mrope")
    config = copy.copy(_config())
    config.mrope_section = [2, 2, 4]
    with pytest.raises(MxnConfigError, match="mrope_section=.*position_embedding_type='mrope'"):
        options.check_config(config)


def _grid_attention_spec():
    return megatron_mxn.get_mxn_layer_spec(get_gpt_layer_local_spec(), dim_slices=2
                                           ).submodules.self_attention


@pytest.mark.parametrize("name", ["qk_clip", "log_max_attention_logit", "apply_rope_fusion"])
def test_refused_when_the_layer_is_built_before_any_process_group(name):
    """MxnSelfAttention refuses in its first lines: no process group exists here, so any use
    of one (a collective, or megatron's optimizer reading a missing attribute later) would
    fail differently."""
    config = copy.copy(_config())
    setattr(config, name, True)
    with pytest.raises(MxnConfigError, match=f"layer 1: {name}=True is not supported"):
        build_module(_grid_attention_spec(), config=config, layer_number=1)


def test_a_replaced_core_attention_is_refused():
    """What megatron.training's GPTModelBuilder.build_model does to the layer spec under
    --attention-backend local: the grid layer refuses megatron's DotProductAttention."""
    spec = _grid_attention_spec()
    spec.submodules.core_attention = DotProductAttention  # the builder's override, verbatim
    with pytest.raises(MxnConfigError, match="core_attention is DotProductAttention, not the "
                                             "grid's MxnDotProductAttention"):
        build_module(spec, config=_config(), layer_number=1)


def test_a_custom_core_or_attention_subclass_in_the_base_spec_is_refused():
    """get_mxn_layer_spec swaps in the grid's attention and core; what it would drop silently
    (a custom core, e.g. with attention-logit soft-capping, or a SelfAttention subclass) is
    refused instead. megatron-core's own cores are replaced (the grid's computes the same)."""
    class SoftcapAttention(DotProductAttention):
        pass

    class GatedSelfAttention(SelfAttention):
        pass

    base = get_gpt_layer_local_spec()
    base.submodules.self_attention.submodules.core_attention = SoftcapAttention
    with pytest.raises(MxnConfigError, match=r"core_attention \(.*SoftcapAttention\) is not "
                                             "megatron-core's DotProductAttention"):
        megatron_mxn.get_mxn_layer_spec(base, dim_slices=2)
    base = get_gpt_layer_local_spec()
    base.submodules.self_attention.module = GatedSelfAttention
    with pytest.raises(MxnConfigError, match="GatedSelfAttention, a subclass of megatron-core's"):
        megatron_mxn.get_mxn_layer_spec(base, dim_slices=2)
    grid = _grid_attention_spec()  # the grid's own spec may go through again
    assert grid.module is MxnSelfAttention
    again = megatron_mxn.get_mxn_layer_spec(get_gpt_layer_local_spec(), dim_slices=2)
    assert megatron_mxn.get_mxn_layer_spec(again, dim_slices=2).submodules.self_attention \
        .submodules.core_attention is grid.submodules.core_attention


def test_model_registration_hook_names_mrope():
    """The check when a model attaches its decoder (it used to blame rotary_percent)."""
    layer = MxnSelfAttention.__new__(MxnSelfAttention)
    torch.nn.Module.__init__(layer)
    model = SimpleNamespace(rotary_percent=1.0, position_embedding_type="mrope")
    with pytest.raises(MxnConfigError, match="position_embedding_type='mrope' is not supported "
                                             "by the grid attention: multimodal RoPE"):
        _check_rotary_of_model(model, "decoder", torch.nn.Sequential(layer))
