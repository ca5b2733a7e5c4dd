"""Runtime patches that let megatron-core run on CPU with the gloo backend.

megatron-core assumes a CUDA device in a handful of places (device queries, the CUDA RNG,
`device="cuda"` literals, streams). Each patch below replaces exactly one of those assumptions
with its CPU equivalent; nothing here changes numerics. The distributed optimizer also assumes
apex's or Transformer Engine's fused Adam when it loads a checkpoint: the last patches make its
torch AdamW fallback resume exactly. Written for megatron-core 0.19.x and torch 2.6-2.14
(checked on 0.19.2 / 2.14.1).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from megatron_mxn.patching import patch, replace, resolve

CORE = "megatron-core 0.19.x"
TORCH = "torch 2.6-2.14"


# --------------------------------------------------------------------------- fusions


def _eager_compile(fn=None, **kwargs):
    """torch.compile's signature, returning the function itself (both decorator forms)."""
    if fn is None:
        return lambda f: f
    return fn


class _EagerMegatronImports:
    """Import hook for megatron's modules, installed before megatron is imported:

    * while a megatron module executes, torch.compile is the identity, so the functions it
      decorates with @torch.compile at import time run eagerly (`eager_compile`);
    * right after megatron.core.jit executes, its disable_jit_fuser() runs, before any fusion
      module decorates its functions with the fuser (`eager_fusers`).
    """

    eager_compile = False
    eager_fusers = False
    depth = 0
    original = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not name.startswith("megatron."):
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            swap = cls.eager_compile and cls.depth == 0
            if swap:
                cls.original, torch.compile = torch.compile, _eager_compile
            cls.depth += 1
            try:
                run(module)
            finally:
                cls.depth -= 1
                if swap:
                    torch.compile = cls.original
            if cls.eager_fusers and name == "megatron.core.jit":
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec

    @classmethod
    def install(cls) -> None:
        import sys

        if cls not in sys.meta_path:
            sys.meta_path.insert(0, cls)


@patch("megatron.core.jit.enable_jit_fuser", CORE,
       "megatron decorates its fused kernels with torch.compile at import time: importing "
       "dynamo and inductor costs seconds per process and compiling C++ kernels on CPU costs "
       "more; CPU mode runs the same functions eagerly (installed before megatron is imported)",
       fingerprint="3fca38c00258")
def _eager_fusers():
    import sys

    if "megatron.core.jit" in sys.modules:
        sys.modules["megatron.core.jit"].disable_jit_fuser()
    _EagerMegatronImports.eager_fusers = True
    _EagerMegatronImports.install()


@patch("torch.compile", TORCH,
       "megatron decorates some functions with @torch.compile at import time (the MoE router's "
       "top-k routing): on CPU that costs seconds per process importing dynamo and inductor "
       "and compiling C++; CPU mode runs them eagerly. torch.compile is swapped only while a "
       "megatron module is being imported (installed before megatron is imported)")
def _eager_compile_in_megatron():
    _EagerMegatronImports.eager_compile = True
    _EagerMegatronImports.install()


# --------------------------------------------------------------------------- torch.cuda API


@patch("torch.cuda.current_device", TORCH, "raises without a CUDA device; megatron uses it as "
       "the device of every buffer it allocates (memory buffer, KV cache, rotary, grad buffers)")
def _current_device():
    replace("torch.cuda.current_device", lambda orig: lambda: torch.device("cpu"))


@patch("torch.cuda.synchronize", TORCH, "raises without a CUDA device (timers, p2p, dist-ckpt)")
def _synchronize():
    replace("torch.cuda.synchronize", lambda orig: lambda device=None: None)


class _NoStream:
    """Stand-in for torch.cuda.Stream/Event: every method is a no-op, CPU work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def record_event(self, event=None):
        """An event to wait on later (MoE all-to-all dispatcher): already complete."""
        return event if event is not None else _NoStream()

    def query(self) -> bool:
        return True


class _TimingEvent(_NoStream):
    """Stand-in for torch.cuda.Event: record() notes the wall clock, elapsed_time() is in
    milliseconds like CUDA's (megatron's static inference engine times each step with it)."""

    def __init__(self, *args, **kwargs):
        self.time = None

    def record(self, stream=None):
        import time

        self.time = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1000.0


@patch("torch.cuda.Stream", TORCH, "stream and event objects need a device (DDP, param/grad "
       "buffers, the MoE dispatcher, the static inference engine's per-step timing events)")
def _streams():
    replace("torch.cuda.Stream", lambda orig: _NoStream)
    replace("torch.cuda.Event", lambda orig: _TimingEvent)
    replace("torch.cuda.current_stream", lambda orig: lambda device=None: _NoStream())
    replace("torch.cuda.default_stream", lambda orig: lambda device=None: _NoStream())
    replace("torch.cuda.stream", lambda orig: lambda stream=None: contextlib.nullcontext())


@patch("torch.cuda.manual_seed", TORCH, "the CUDA generator does not exist on CPU; the CPU "
       "default generator plays its role (seeded, saved and restored through the same calls)")
def _cuda_rng_api():
    gen = torch.default_generator
    replace("torch.cuda.manual_seed", lambda orig: lambda seed: gen.manual_seed(int(seed)))
    replace("torch.cuda.initial_seed", lambda orig: lambda: gen.initial_seed())
    replace("torch.cuda.get_rng_state", lambda orig: lambda device="cuda": gen.get_state())
    replace("torch.cuda.set_rng_state",
             lambda orig: lambda new_state, device="cuda": gen.set_state(new_state))


# --------------------------------------------------------------------------- megatron RNG


@patch("megatron.core.tensor_parallel.random._get_cuda_rng_state", CORE,
       "the RNG tracker swaps CUDA generator states in and out on fork(); on CPU it must swap "
       "the CPU generator so that forked streams (TP dropout, weight init) really differ",
       fingerprint="b8efb24fab54")
def _tracker_get_state():
    replace("megatron.core.tensor_parallel.random._get_cuda_rng_state",
             lambda orig: lambda device="cuda", clone=False, graph_safe=False:
             torch.default_generator.get_state())


@patch("megatron.core.tensor_parallel.random._set_cuda_rng_state", CORE,
       "counterpart of _get_cuda_rng_state: restores into the CPU generator",
       fingerprint="15a863ab8e24")
def _tracker_set_state():
    replace("megatron.core.tensor_parallel.random._set_cuda_rng_state",
             lambda orig: lambda new_state, device=-1, graph_safe=False:
             torch.default_generator.set_state(new_state))


# --------------------------------------------------------------------------- device literals


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA devices in torch calls to CPU: `device="cuda"` literals, `.cuda()`,
    `.to("cuda")` and `pin_memory=True` (which needs a CUDA driver)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and _asked_by_optimizer():
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _asked_by_optimizer() -> bool:
    """megatron.core.optimizer accepts only torch.cuda.*Tensor type names (its parameter and
    gradient type checks); code there is told the CUDA name of a CPU tensor's type."""
    import sys

    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller.startswith("megatron.core.optimizer")


_MODE: CudaToCpu | None = None


@patch("torch.Tensor.cuda", TORCH, "megatron writes device='cuda' in tensor factories "
       "(optimizer, clip_grads, schedules, default causal mask) and calls .cuda()")
def _device_literals():
    global _MODE
    _MODE = CudaToCpu()
    _MODE.__enter__()
    replace("torch.nn.Module.cuda", lambda orig: lambda self, device=None: self)


@patch("torch.autograd.function.BackwardCFunction.apply", TORCH,
       "torch pops a TorchFunctionMode while its handler runs, so Python code run by a backward "
       "pass (custom autograd backward functions, megatron's activation recomputation) would "
       "miss the device rewrite; custom backward functions run with the mode re-entered")
def _device_literals_in_backward():
    def make(orig):
        def apply(self, *args):
            if torch._C._len_torch_function_stack() or _MODE is None:
                return orig(self, *args)
            with _MODE:
                return orig(self, *args)

        return apply

    replace("torch.autograd.function.BackwardCFunction.apply", make)


class _DropForkWarning:
    """Logging filter for the tracker's 'CPU RNG state changed within GPU RNG context'."""

    @staticmethod
    def filter(record) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@patch("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork", CORE,
       "on CPU the forked stream *is* the CPU generator, so fork()'s check that the CPU state "
       "is unchanged warns on every dropout; the warning is dropped, fork() itself is unchanged",
       fingerprint="043757ad2810")
def _quiet_fork_check():
    import logging

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning)


@patch("megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__", CORE,
       "without apex the local spec's norms are torch norms, which assert that sequence "
       "parallelism is off; they are built with SP off and their params marked "
       "sequence_parallel so that finalize_model_grads sums their grads over TP, as it does "
       "for apex/TE norms", fingerprint="6b9493d24fea")
def _torch_norm_sequence_parallel():
    import copy

    def make(orig):
        def new(cls, config, *args, **kwargs):
            if not config.sequence_parallel:
                return orig(cls, config, *args, **kwargs)
            config = copy.copy(config)
            config.sequence_parallel = False
            norm = orig(cls, config, *args, **kwargs)
            for param in norm.parameters():
                setattr(param, "sequence_parallel", True)
            return norm

        return staticmethod(new)

    replace("megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__", make)


@patch("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu", CORE,
       "the all-to-all MoE dispatcher turns its split sizes into numpy arrays only when they "
       "are on a CUDA device; on CPU they stay tensors, which all_to_all_single rejects. The "
       "CPU tensor gets the same conversion", fingerprint="547dda81e5df")
def _moe_split_sizes_as_numpy():
    def make(orig):
        def move(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

        return move

    replace("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu", make)


@patch("megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue",
       CORE, "a torch_dist save creates its results queue through a multiprocessing Manager "
       "started with 'spawn', a fresh interpreter that re-imports the training script: seconds "
       "per rank on a small CPU machine. CPU mode starts it with 'fork' (what megatron's own "
       "async save asks for), and makes the Manager's server die with its rank: a SIGKILLed "
       "rank runs no exit handler, and its server would otherwise live on as an orphan",
       fingerprint="46b5e470de19")
def _fork_checkpoint_results_queue():
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    target = "megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue"
    module = resolve(target.rsplit(".", 1)[0])

    def make(orig):
        def get_write_results_queue(mp_mode: str = "fork"):
            if module._results_queue is None:  # what orig does, plus the initializer
                with module._disable_gc():
                    manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
                    manager.start(_exit_with_parent, (os.getpid(),))
                    module._results_queue = manager.Queue()  # its proxy keeps `manager` alive
            return module._results_queue

        return get_write_results_queue

    replace(target, make)


def _exit_with_parent(parent_pid: int) -> None:
    """Manager initializer: ask Linux to SIGKILL this process when its parent dies (a no-op
    where prctl does not exist). Linux means the parent *thread* that started the Manager:
    megatron saves from the main thread, which lives as long as the rank."""
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
# --------------------------------------------------------------------------- optimizer


def _unstepped_state(optimizer) -> dict:
    """A DistributedOptimizer state dict for an optimizer that has not stepped: its param
    groups at step 0 (what megatron's state_dict() would report), no parameter state."""
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "step": 0}
              for group in optimizer.optimizer.param_groups]
    state = {"optimizer": {"param_groups": groups}}
    if optimizer.grad_scaler:
        state["grad_scaler"] = optimizer.grad_scaler.state_dict()
    return state


@patch("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_state_dict",
       CORE, "without apex or Transformer Engine (always on CPU) the distributed optimizer "
       "wraps torch's AdamW, whose per-parameter 'step' exists only after a first step; "
       "building the state dict to load into (any --load with --use-distributed-optimizer) "
       "reads it from the still-empty state and fails (state_dict: assert len(steps) == 1). "
       "The state is allocated first through megatron's own load_state_dict, at step 0, "
       "without stepping (which would decay the weights); the load then overwrites it",
       fingerprint="3a5c1a91ba40")
def _allocate_optimizer_state_before_load():
    from megatron.core.optimizer import distrib_optimizer

    def make(orig):
        def sharded_state_dict(self, model_sharded_state_dict={}, is_loading=False,
                               sharding_type=None, metadata=None):
            if is_loading and not self.optimizer.state and not distrib_optimizer.HAVE_APEX_OR_TE:
                self.load_state_dict(_unstepped_state(self))
            return orig(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

        return sharded_state_dict

    replace("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_state_dict",
             make)


@patch("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
       "load_parameter_state_from_dp_reshardable", CORE,
       "with fp32 parameters the distributed optimizer's main params are views of the model "
       "params, and this loader (unlike its fully_reshardable sibling) copies into them with "
       "autograd on: 'a view of a leaf Variable that requires grad is being used in an "
       "in-place operation' on any --load of a dp_reshardable checkpoint. It runs under "
       "torch.no_grad(). Not CPU-specific: install_wheel_fixes() applies it on GPUs too",
       fingerprint="e6892335cf59", scope="wheel")
def _load_dp_reshardable_without_autograd():
    def make(orig):
        def load_parameter_state_from_dp_reshardable(self, state_dict):
            with torch.no_grad():
                return orig(self, state_dict)

        return load_parameter_state_from_dp_reshardable

    replace("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
             "load_parameter_state_from_dp_reshardable", make)


@patch("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
       "_set_main_param_and_optimizer_states", CORE,
       "torch's AdamW keeps a per-parameter 'step' tensor (Transformer Engine's FusedAdam, "
       "which megatron expects, does not); load_state_dict sets it from the checkpoint's param "
       "groups, then the per-parameter loaders copy every state tensor: the fully_reshardable "
       "one has no 'step' (KeyError) and the dp_reshardable one copies back the step the "
       "optimizer had when the load state dict was built (the resumed run restarts Adam's bias "
       "correction). The step is left to the param groups", fingerprint="48293ed75267")
def _step_comes_from_param_groups():
    def make(orig):
        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            return orig(self, model_param, {**tensors, "step": None})  # None: not copied

        return _set_main_param_and_optimizer_states

    replace("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
             "_set_main_param_and_optimizer_states", make)


@patch("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict", CORE,
       "with torch's AdamW (no apex or Transformer Engine) it gives every parameter the same "
       "'step' tensor, which AdamW then increments in place once per parameter: after a resume "
       "the step races ahead (3 -> 30 -> 57 with 27 parameters) and Adam's bias correction is "
       "wrong. Each parameter gets its own copy", fingerprint="62bb9b06ccd3")
def _one_step_tensor_per_parameter():
    def make(orig):
        def load_state_dict(self, state_dict):
            orig(self, state_dict)
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

        return load_state_dict

    replace("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict",
             make)
