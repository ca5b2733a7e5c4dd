"""One-device check of the attention kernels behind the grid's sequence-split core.

    scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--quick]

The layer benchmark (scripts/bench_attention.py) needs N ranks, so it cannot run on one GPU; this
checks what one GPU can: (1) numerics of megatron_mxn.attention.kernels.attention, fused ("torch")
and "unfused", in bf16/fp16, output and gradients against the formula in fp32 (fp64 on CPU) on the
same rounded inputs; (2) time and peak memory of ONE rank's share of the attention core (no
collectives) under TP=8, the grid's exact schedule and its sequence-split schedule.
Writes numerics.md, bench.md and gpu_check.md to --out; exits 1 if a numerics case fails.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_mxn.attention.kernels import attention
from megatron_mxn.attention.mask import MaskSpec

TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CASES = ("TP=8 (unfused scores, megatron-like)", "grid 2x4 exact (score matrix)",
         "grid 2x4 seq (fused)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/gpu_check")
    p.add_argument("--quick", action="store_true", help="the two shortest s, 3 timed repeats")
    return p.parse_args(argv)


def reference(q, k, v, dout, scale, causal, q_offset, mask, dt):
    """softmax(q k^T * scale, masked) v written out in `dt` on the same rounded inputs; returns
    the output and dq, dk, dv. Query head t reads KV head t // (hq // hk)."""
    q, k, v = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    heads = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // k.shape[1])
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        rows = q_offset + torch.arange(sq, device=q.device)
        hidden = torch.arange(sk, device=q.device)[None, :] > rows[:, None]
    if mask is not None:
        hidden = hidden | mask
    scores = (q @ k[:, heads].transpose(-1, -2) * scale).masked_fill(hidden, float("-inf"))
    out = torch.softmax(scores, -1) @ v[:, heads]
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(dt)))


def numerics(device):
    """Rows (dtype, backend, case, errors of out/dq/dk/dv relative to the reference's max abs,
    verdict). Small shapes on CPU; every case avoids fully masked rows (CUDA kernels differ)."""
    s, d, b = (1024, 128, 2) if device == "cuda" else (128, 32, 2)
    c = s // 4
    cases = [  # name, hq, hk, sq, q_offset, padded; sk = s; all causal
        ("causal square", 8, 8, s, 0, False),
        ("causal offset chunk (middle)", 8, 8, c, 3 * s // 8, False),
        ("lower-right (q_offset = sk - sq)", 8, 8, c, s - c, False),
        ("GQA hq=8 hk=2 (offset chunk)", 8, 2, c, 3 * s // 8, False),
        ("MQA hq=8 hk=1 (lower-right)", 8, 1, c, s - c, False),
        ("padding mask (offset chunk)", 8, 8, c, 3 * s // 8, True)]
    ref_dt = torch.float32 if device == "cuda" else torch.float64
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for backend in ("torch", "unfused"):
            for seed, (name, hq, hk, sq, off, padded) in enumerate(cases):
                g = torch.Generator(device).manual_seed(seed)
                q, k, v, dout = (torch.randn(*shape, generator=g, device=device).to(dtype)
                                 for shape in ((b, hq, sq, d), (b, hk, s, d), (b, hk, s, d),
                                               (b, hq, sq, d)))
                mask = None
                if padded:  # sample i hides its last 37 * (i + 1) keys
                    keys = torch.arange(s, device=device)
                    mask = torch.stack([keys >= s - 37 * (i + 1) for i in range(b)])
                    mask = mask[:, None, None, :].expand(b, 1, sq, s)
                kw = dict(scale=1 / math.sqrt(d), mask=MaskSpec(True, off, padding=mask))
                try:
                    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                    out = attention(*leaves, backend=backend, **kw)
                    got = (out, *torch.autograd.grad(out, leaves, dout))
                except RuntimeError as e:  # some CPU builds lack fp16 kernels: say so, go on
                    if device == "cuda" or dtype != torch.float16 or "implemented" not in str(e):
                        raise
                    rows.append((dtype, backend, name, None, f"skipped: {e}"[:80]))
                    continue
                want = reference(q, k, v, dout, kw["scale"], True, off, mask, ref_dt)
                errs = [((x.to(ref_dt) - y).abs().max() / y.abs().max()).item()
                        for x, y in zip(got, want)]
                rows.append((dtype, backend, name, errs,
                             "PASS" if max(errs) <= TOL[dtype] else "FAIL"))
    return rows


def numerics_table(rows, device) -> str:
    lines = ["Numerics: kernels.attention vs the formula in "
             f"{'fp32' if device == 'cuda' else 'fp64'} on the same rounded inputs; error = max "
             "|x - ref| / max |ref| per tensor; passes at <= 2e-2 (bf16), 1e-2 (fp16).", "",
             "| dtype | backend | case | out | dq | dk | dv | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for dtype, backend, name, errs, verdict in rows:
        cells = [f"{e:.1e}" for e in errs] if errs else ["-"] * 4
        lines.append(f"| {DT[dtype]} | {backend} | {name} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def _rss_peak(reset: bool = False) -> int:
    """CPU peak RSS (VmHWM), after freeing what malloc holds and resetting it to the current RSS
    if `reset` (as scripts/bench_attention.py measures)."""
    if reset:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def core_share(case, s, h, g, d, dtype, device):
    """One rank's share of the core: (leaf tensors, a function returning its outputs)."""
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    kw = dict(scale=1 / math.sqrt(d))
    if case != CASES[2]:  # TP=8: h/8 heads (KV replicated if g < 8), full d; exact: h/2, d/4 dims
        n, dims = (8, d) if case == CASES[0] else (2, d // 4)
        kv = max(1, g // n)
        q, k, v = new(1, h // n, s, dims), new(1, kv, s, dims), new(1, kv, s, dims)
        return [q, k, v], lambda: [attention(q, k, v, backend="unfused", mask=MaskSpec(True),
                                             **kw)]
    c = s // 8  # seq 2x4: zig-zag chunks 0 and 7 of 8 against all keys, full d, fused kernel
    q0, q7 = new(1, h // 2, c, d), new(1, h // 2, c, d)
    k, v = new(1, g // 2, s, d), new(1, g // 2, s, d)
    return [q0, q7, k, v], lambda: [
        attention(q0, k, v, backend="torch", mask=MaskSpec(True, 0), **kw),
        attention(q7, k, v, backend="torch", mask=MaskSpec(True, 7 * c), **kw)]


def bench(device, quick):
    """Rows (s, case, times ms or None, peak memory growth bytes, note) for each s and case."""
    cuda = device == "cuda"
    seqs, (h, g, d), dtype, budget = (((4096, 8192, 16384, 32768), (32, 8, 128), torch.bfloat16, 40)
                                      if cuda else ((256, 512, 1024), (8, 2, 32), torch.float32, 1))
    seqs, repeats = (seqs[:2], 3) if quick else (seqs, 5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for s in seqs:
        for case in CASES:
            scores = {CASES[0]: h // 8, CASES[1]: h // 2}.get(case, 0) * s * s * 4
            if scores > budget * 2**30:
                rows.append((s, case, None, 0, f"skipped: {scores / 2**30:g} GiB of fp32 scores "
                                               f"> {budget} GiB"))
                continue
            torch.manual_seed(s)
            leaves, fn = core_share(case, s, h, g, d, dtype, device)
            grads = [torch.randn_like(q) for q in leaves[:-2]]
            try:
                times = []
                for k in range(repeats + 1):  # the first is a warm-up
                    if k == 1:
                        sync()
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated() if cuda else _rss_peak(reset=True)
                    start = time.perf_counter()
                    torch.autograd.backward(fn(), grads)
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
                    for x in leaves:
                        x.grad = None
                grow = (torch.cuda.max_memory_allocated() if cuda else _rss_peak()) - base
                rows.append((s, case, times[1:], grow, ""))
            except torch.cuda.OutOfMemoryError:
                rows.append((s, case, None, 0, "out of memory"))
            del leaves, fn, grads
            if cuda:
                torch.cuda.empty_cache()
    return rows, (h, g, d, dtype, repeats)


def bench_table(rows, info, device) -> str:
    h, g, d, dtype, repeats = info
    lines = [f"ONE rank's share of the attention core (no collectives) on one {device} device: "
             f"h={h}, g={g}, d={d}, batch 1, {DT[dtype]}, causal, forward + backward; "
             f"time: median [min] of {repeats} after a warm-up; memory: peak growth over the "
             "inputs; ratios against the TP=8 row at the same s.", "",
             "| s | case | time ms | peak memory growth | time / TP=8 | memory / TP=8 |",
             "|---|---|---|---|---|---|"]
    ref = {r[0]: r for r in rows if r[1] == CASES[0] and r[2]}
    for s, case, times, grow, note in rows:
        if not times:
            lines.append(f"| {s} | {case} | {note} | | | |")
            continue
        med, base = statistics.median(times), ref.get(s)
        t_ratio = f"{med / statistics.median(base[2]):.2f}x" if base else "-"
        m_ratio = f"{grow / base[3]:.2f}x" if base and base[3] > 0 else "-"
        lines.append(f"| {s} | {case} | {med:.1f} [{min(times):.1f}] | {grow / 2**20:.1f} MiB | "
                     f"{t_ratio} | {m_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference must be fp32
    if args.device == "cpu":  # spinning OpenMP threads on a shared CPU: 15x slower, noisy
        torch.set_num_threads(1)
    started = time.time()
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    num = numerics_table(numerics(args.device), args.device)
    print(num, flush=True)
    rows, info = bench(args.device, args.quick)
    ben = bench_table(rows, info, args.device)
    print("\n" + ben)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "numerics.md").write_text(num + "\n")
    (out / "bench.md").write_text(ben + "\n")
    (out / "gpu_check.md").write_text(
        f"# gpu_check on {name} ({args.device}), torch {torch.__version__}, megatron-core "
        f"{importlib.metadata.version('megatron-core')}, {time.time() - started:.0f} s\n\n"
        f"{num}\n\n{ben}\n")
    failed = num.count("| FAIL |")
    print(f"\nwrote {out}/gpu_check.md; {failed} numerics case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
