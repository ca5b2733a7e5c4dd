"""Runtime patches that let Megatron-LM's training package (megatron.training, shipped in the
megatron-core 0.19 wheel) run on CPU with gloo, plus one fix the wheel needs everywhere.

Written for megatron-core 0.19.x (checked on 0.19.2 / torch 2.14.1).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from megatron_mxn.cpu.core import CORE
from megatron_mxn.patching import patch, replace

TRAINING = "megatron.training from megatron-core 0.19.x"


@patch("megatron.core.datasets.utils.compile_helpers", CORE,
       "the wheel ships the compiled dataset helpers but not their Makefile, so Megatron's "
       "start-up compilation fails and exits; it is skipped when the compiled module imports. "
       "Not CPU-specific: install_wheel_fixes() applies it on GPUs too",
       fingerprint="be6ad313e935", scope="wheel")
def _skip_helper_compilation():
    def make(orig):
        def compile_helpers():
            if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
                orig()

        return compile_helpers

    replace("megatron.core.datasets.utils.compile_helpers", make)


@patch("megatron.training.arguments.get_device_arch_version", TRAINING,
       "argument validation asks the GPU for its architecture; CPU reports 10, which also "
       "skips the CUDA_DEVICE_MAX_CONNECTIONS check that has no meaning on CPU",
       fingerprint="1c0d596af5b2", scope="training")
def _device_arch():
    replace("megatron.training.arguments.get_device_arch_version", lambda orig: lambda: 10)


@patch("megatron.training.training.initialize_megatron", TRAINING,
       "pretrain() calls initialize_megatron without allow_no_cuda, which asserts CUDA",
       fingerprint="9aade6445a76", scope="training")
def _allow_no_cuda():
    def make(orig):
        def initialize_megatron(*args, **kwargs):
            kwargs["allow_no_cuda"] = True
            return orig(*args, **kwargs)

        return initialize_megatron

    replace("megatron.training.training.initialize_megatron", make)


@contextlib.contextmanager
def _one_pretend_cuda_device():
    count, set_device = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = count, set_device


def _with_pretend_device(orig):
    def call(*args, **kwargs):
        with _one_pretend_cuda_device():
            return orig(*args, **kwargs)

    return call


@patch("megatron.training.initialize._initialize_distributed", TRAINING,
       "silently skips initialize_model_parallel when torch.cuda.device_count() is 0; it runs "
       "seeing one device, with set_device a no-op", fingerprint="2d35a7d2bdc2", scope="training")
def _distributed_init():
    replace("megatron.training.initialize._initialize_distributed", _with_pretend_device)


@patch("megatron.training.initialize._set_random_seed", TRAINING,
       "silently skips seeding the RNG tracker (TP-region dropout, weight init) when "
       "torch.cuda.device_count() is 0", fingerprint="dfebce4bdd82", scope="training")
def _seeding():
    replace("megatron.training.initialize._set_random_seed", _with_pretend_device)


# Arguments whose defaults need a GPU or apex: (attribute, CPU value, why).
CPU_ARGUMENTS = (
    ("transformer_impl", "local", "Transformer Engine needs CUDA"),
    ("no_persist_layer_norm", True, "persistent layer norm needs apex"),
    ("masked_softmax_fusion", False, "the fused softmax is a CUDA kernel"),
    ("gradient_accumulation_fusion", False, "fused weight-gradient accumulation needs apex/TE"),
    ("apply_rope_fusion", False, "fused RoPE needs Transformer Engine"),
    ("bias_gelu_fusion", False, "torch.compile of the fused kernel costs seconds on CPU"),
    ("bias_swiglu_fusion", False, "torch.compile of the fused kernel costs seconds on CPU"),
    ("bias_dropout_fusion", False, "torch.compile of the fused kernel costs seconds on CPU"),
)


@patch("megatron.training.initialize._warmup_jit_function", TRAINING,
       "warms the fused bias-GeLU/dropout-add kernels up with torch.compile, which builds C++ "
       "kernels on CPU for seconds per rank; CPU mode does not use those fusions",
       fingerprint="8e7cd03a9f0c", scope="training")
def _no_jit_warmup():
    replace("megatron.training.initialize._warmup_jit_function",
             lambda orig: lambda tp_size=None: None)


@patch("megatron.training.arguments.validate_args", TRAINING,
       "several defaults need CUDA, apex or TE; on CPU they are switched to their portable "
       "equivalents (printed once), and the nccl backend is refused with a clear message",
       fingerprint="702f3a4a50c4", scope="training")
def _cpu_arguments():
    def make(orig):
        def validate_args(args, defaults={}):
            if getattr(args, "distributed_backend", "gloo") != "gloo":
                raise ValueError("no CUDA device: run with --distributed-backend gloo "
                                 "(megatron_mxn CPU mode)")
            changed = []
            for attr, value, why in CPU_ARGUMENTS:
                if hasattr(args, attr) and getattr(args, attr) != value:
                    setattr(args, attr, value)
                    changed.append(f"{attr}={value} ({why})")
            if changed and getattr(args, "rank", 0) == 0:
                print("> megatron_mxn CPU mode: " + "; ".join(changed), flush=True)
            return orig(args, defaults)

        return validate_args

    replace("megatron.training.arguments.validate_args", make)
