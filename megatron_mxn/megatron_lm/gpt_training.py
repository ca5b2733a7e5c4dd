"""Megatron's GPT pretraining with the grid: the batch, loss, forward step and datasets of
Megatron-LM's pretrain_gpt.py for the megatron-core wheel, and `pretrain_model`, which runs
Megatron's pretrain() on them. Imports megatron: the entry points (pretrain_gpt.py,
pretrain_hybrid.py) import it after CPU mode or the wheel fixes are installed."""

import sys
from functools import partial

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
)
from megatron.core.enums import ModelType
from megatron.core.parallel_state import get_context_parallel_group
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import get_args, get_timers, pretrain, print_rank_0
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils.common_utils import (
    get_blend_and_blend_per_split,
    is_first_or_last_pipeline_stage,
)

from megatron_mxn.grid.groups import clean_shutdown
from megatron_mxn.megatron_lm import add_mxn_args, check_checkpoint_args
from megatron_mxn.megatron_lm.run_configs import expand_config_args, megatron_option_strings

FIELDS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None):
    """TP rank 0 reads the micro-batch and broadcasts it over TP; CP ranks take their part."""
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return (None,) * len(FIELDS)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = {k: (v.cuda(non_blocking=True) if v is not None else None)
                 for k, v in next(data_iterator).items() if k in FIELDS}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size, tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=False, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                      cp_group=get_context_parallel_group())
    return tuple(batch.get(k) for k in FIELDS)


def loss_with_report(loss_mask, output_tensor):
    """Sum of the masked per-token losses, the token count, and Megatron's 'lm loss' report."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """One micro-batch: per-token LM losses from the model, summed under the loss mask."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_with_report, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets: --mock-data, or --data-path/--*-data-path indexed datasets."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets ({dataset_type.__name__})")

    def built_on_this_rank():
        return (mpu.get_tensor_model_parallel_rank() == 0
                and is_first_or_last_pipeline_stage(vp_stage))

    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                         built_on_this_rank, config).build()


def pretrain_model(model_config_from_args) -> None:
    """Megatron's pretrain() on the model `model_config_from_args(args)` describes (a
    ModelConfig whose builder makes this rank's model), with the grid flags, the run configs and
    the checkpoint checks; shared by the GPT and the hybrid entry points."""
    # `--config configs/x.yaml --layout NAME`: the config's flags first, explicit flags win.
    sys.argv[1:] = expand_config_args(sys.argv[1:], megatron_option_strings(add_mxn_args))
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(extra_args_provider=add_mxn_args,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    check_checkpoint_args(args)  # before any collective: shape and attention model
    if args.hf_dir:  # --load holds the HF directory's model; the run names its seq length
        from megatron_mxn.convert.hf_run import check_hf_run

        check_hf_run(args, training=True)
    model_cfg = model_config_from_args(args)  # before any collective too: it may refuse
    # Megatron's pretrain() leaves its process groups alive; they go before Python exits.
    with clean_shutdown():
        pretrain(pretrain_cfg_container_from_args(args, model_cfg),
                 train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
