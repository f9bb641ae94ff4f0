#!/usr/bin/env python3
"""Peers, timed side by side (GPU): the SingLoRA adapter path in bf16, d = 4096.

    SINGLORA_LIB=path/to/libsinglora.so python3 python/bench.py

Each method computes y = y0 + s·(x·A[:d_in])·A[:d_out]ᵀ from x (tokens × d),
A (d × rank) and a frozen layer's output y0, with autograd for x and A:

  ours          singlora_adapter(x, A, s, base=y0): our kernels through the
                binding (the adapter added onto y0 in place, S saved in f32)
  fused         the same with singlora.set_backward_kernel("fused"): the
                one-pass backward where it applies (compute capability 9.0,
                rank <= 32), the split one elsewhere
  eager         y0 + ((x @ A_in) @ A_out.T) * s, as PEFT-style code writes it
  compile       the same function under torch.compile (default mode, static
                shapes, compiled once per shape, compile time not timed)
  materialised  y0 + x @ (s · A_out @ A_in.T).T, the d × d update that public
                SingLoRA code forms on every forward

for tokens 16384 and 16, rank 8, 16, 64, s = 16 / rank. Two passes:
  fwd       the forward in training mode (inputs require grad, so each
            method saves what its backward needs), output discarded;
  fwd+bwd   the forward, then torch.autograd.grad(y, (x, A), G).

Timing: CUDA events around INNER calls, the median of SAMPLES such batches,
after a warm-up; the inputs rotate over enough sets (x, A, y0, G) to stream
at least 256 MiB per cycle, far more than the H200's 60 MB L2 (2 sets at
16384 tokens, a few hundred at 16). Peak memory: torch.cuda.max_memory_
allocated() above the inputs during one fwd+bwd (the d × d bf16 update is
32 MiB). Before timing, every method's y, dX and dA are checked against a
float64 evaluation (relative L2 ≤ 1e-2, the bf16 bar), so no method is timed
computing something else. At 16 tokens every method is bound by host-side
launch overhead (Python, autograd), not by the GPU.

Prints one markdown table with times, ratios (peer time / our time: > 1 means
we are faster) and peak memory, and appends it to $SINGLORA_BENCH_TABLE when
that is set. Exits 1 when a method computes a wrong result or ours fails;
2 without a GPU or torch. The targets (H200, 16384 tokens: ours ≥ 1.6× eager
and ≥ 1.2× compile, both passes; fused fwd+bwd ≥ 2× eager and compile at
ranks 8 and 16, ≥ 1.6× at rank 64) are reported, not enforced.
"""

import datetime
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_script import banner, start, torch_or_exit  # noqa: E402

torch = torch_or_exit("bench.py")

import singlora  # noqa: E402
from singlora.nn import singlora_adapter  # noqa: E402

D = 4096
DTYPE = torch.bfloat16
ALPHA = 16.0
SHAPES = [(16384, 8), (16384, 16), (16384, 64), (16, 8), (16, 16), (16, 64)]
ROTATE_BYTES = 256 << 20
WARMUP = 5
SAMPLES = 15
INNER = {16384: 10, 16: 40}
COMPILE_BUDGET_S = float(os.environ.get("SINGLORA_COMPILE_BUDGET_S", "60"))
METHODS = ["ours", "fused", "eager", "compile", "materialised"]
TARGETS = {"eager": 1.6, "compile": 1.2}
# The fused backward's fwd+bwd targets against both eager and compile, by rank.
FUSED_TARGETS = {8: 2.0, 16: 2.0, 64: 1.6}


def under(method, run):
    """`run` with the backward kernels `method` asks for (fused for
    "fused", the default split ones for every other method)."""
    def f(*args):
        previous = singlora.set_backward_kernel("fused" if method == "fused" else "split")
        try:
            return run(*args)
        finally:
            singlora.set_backward_kernel(previous)
    return f


def peft(s, d_in, d_out):
    def f(x, a, y0):
        return y0 + ((x @ a[:d_in]) @ a[:d_out].T) * s
    return f


def materialised(s, d_in, d_out):
    def f(x, a, y0):
        return y0 + x @ (s * (a[:d_out] @ a[:d_in].T)).T
    return f


def ours(s, d_in, d_out):
    def f(x, a, y0):
        # y0 is updated in place; the detached alias keeps y0 itself out of
        # autograd, so calls do not chain their graphs through it.
        return singlora_adapter(x, a, s, base=y0.detach())
    return f


def make_sets(tokens, rank, dev, gen):
    set_bytes = (3 * tokens * D + D * rank) * 2
    n = max(2, math.ceil(ROTATE_BYTES / set_bytes))
    sets = []
    bound = 1.0 / math.sqrt(D)
    for _ in range(n):
        x = torch.randn(tokens, D, generator=gen, device=dev, dtype=DTYPE).requires_grad_(True)
        a = ((torch.rand(D, rank, generator=gen, device=dev) * 2 - 1) * bound).to(DTYPE)
        a.requires_grad_(True)
        y0 = torch.randn(tokens, D, generator=gen, device=dev, dtype=DTYPE)
        g = torch.randn(tokens, D, generator=gen, device=dev, dtype=DTYPE)
        sets.append((x, a, y0, g))
    return sets


def rel_l2(out, ref):
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


def reference(sets, s):
    """y, dX, dA on set 0 in float64."""
    x, a, y0, g = sets[0]
    xr = x.detach().double().requires_grad_(True)
    ar = a.detach().double().requires_grad_(True)
    yr = y0.double() + s * (xr @ ar) @ ar.T
    dxr, dar = torch.autograd.grad(yr, (xr, ar), g.double())
    return yr.detach(), dxr, dar


def verify(fn, sets, ref):
    """fn's y, dX and dA on set 0 against float64: the worst relative L2."""
    x, a, y0, g = sets[0]
    y = fn(x, a, y0.clone())
    dx, da = torch.autograd.grad(y, (x, a), g)
    return max(rel_l2(y, ref[0]), rel_l2(dx, ref[1]), rel_l2(da, ref[2]))


def timed(run, n_sets, inner):
    """Median µs per call over SAMPLES batches of `inner` calls."""
    k = 0
    for _ in range(WARMUP):
        run(k % n_sets)
        k += 1
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(SAMPLES):
        start.record()
        for _ in range(inner):
            run(k % n_sets)
            k += 1
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(times)


def peak_mib(run):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def passes(fn, sets):
    def fwd(i):
        x, a, y0, _ = sets[i]
        fn(x, a, y0)

    def fwd_bwd(i):
        x, a, y0, g = sets[i]
        y = fn(x, a, y0)
        torch.autograd.grad(y, (x, a), g)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def setup_compile():
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 64)


def fmt_us(v):
    return "n/a" if v is None else f"{v:,.1f}"


def fmt_ratio(peer, mine):
    if peer is None or mine is None:
        return "n/a"
    return f"{peer / mine:.2f}×"


def check_targets(t, mine, targets, where, prefix, checks, misses):
    """Each peer's time over `mine`'s against its target ratio: a note in
    `checks`, and a line in `misses` when it falls short."""
    for peer, want in targets.items():
        if t[mine] is None or t[peer] is None:
            checks.append(f"{prefix}{peer} n/a")
            continue
        r = t[peer] / t[mine]
        ok = r >= want
        checks.append(f"{prefix}{peer} ≥{want}× {'met' if ok else 'missed'}")
        if not ok:
            misses.append(f"{where}: {r:.2f}× {peer} (target {want}×)")


def format_table(rows, peaks, gpu, bad):
    """The markdown table (and its notes) of the measured rows."""
    today = datetime.date.today().isoformat()
    lines = [
        f"### PyTorch peers: SingLoRA adapter, bf16, d = {D} ({gpu}, torch {torch.__version__}, "
        f"singlora {singlora.version()}, {today})",
        "",
        "Times are medians in µs per call (CUDA events); ratios are the peer's time over ours "
        "(> 1: ours is faster); peak is the extra memory of one fwd+bwd in MiB "
        "(ours / fused / eager / compile / materialised; the d × d bf16 update alone is 32 MiB). "
        "fused: ours with the one-pass backward (singlora.set_backward_kernel(\"fused\"); "
        "the split one where it does not apply). "
        "fwd: the forward in training mode; fwd+bwd: the forward and autograd.grad for x and A. "
        f"{SAMPLES} samples of {INNER[16384]} (16384 tokens) or {INNER[16]} (16 tokens) calls after "
        f"{WARMUP} warm-up calls, inputs rotating over ≥ {ROTATE_BYTES >> 20} MiB. At 16 tokens "
        "every method is bound by host-side overhead (Python, autograd, launches).",
        "",
        "| tokens | rank | pass | ours | fused | eager | compile | materialised | eager/ours | compile/ours "
        "| materialised/ours | eager/fused | compile/fused | peak MiB (o / f / e / c / m) | targets |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    misses = []
    for tokens, rank, name, t, note in rows:
        p = peaks[(tokens, rank)]
        peak = " / ".join("n/a" if m not in p else f"{p[m]:.1f}" for m in METHODS)
        target = ""
        if tokens == 16384:
            checks = []
            where = f"{tokens} tokens rank {rank}"
            check_targets(t, "ours", TARGETS, f"{where} {name}", "", checks, misses)
            want = FUSED_TARGETS.get(rank)
            if name == "fwd+bwd" and want is not None:
                fused = {"eager": want, "compile": want}
                check_targets(t, "fused", fused, f"{where} fused {name}", "fused: ", checks, misses)
            target = ", ".join(checks)
        lines.append(
            f"| {tokens} | {rank} | {name} | {fmt_us(t['ours'])} | {fmt_us(t['fused'])} | {fmt_us(t['eager'])} "
            f"| {fmt_us(t['compile'])} | {fmt_us(t['materialised'])} "
            f"| {fmt_ratio(t['eager'], t['ours'])} | {fmt_ratio(t['compile'], t['ours'])} "
            f"| {fmt_ratio(t['materialised'], t['ours'])} "
            f"| {fmt_ratio(t['eager'], t['fused'])} | {fmt_ratio(t['compile'], t['fused'])} | {peak} | {target} |"
        )
    notes = sorted({n for *_, n in rows if n})
    lines.append("")
    lines.append(f"Targets at 16384 tokens: {'all met' if not misses else 'missed: ' + '; '.join(misses)}.")
    for n in notes:
        lines.append(f"Note: {n}.")
    if bad:
        lines.append("WRONG RESULTS (not timed): " + "; ".join(bad))
    lines.append("")
    return "\n".join(lines)


def main():
    started, dev = start("bench.py")
    singlora.init(0)
    setup_compile()
    gen = torch.Generator(device=dev).manual_seed(0)
    gpu = torch.cuda.get_device_name(dev)
    banner(gpu)

    rows = []  # (tokens, rank, pass, {method: µs}, notes)
    peaks = {}  # (tokens, rank) -> {method: MiB}
    bad = []
    compile_spent = 0.0
    for tokens, rank in SHAPES:
        s = ALPHA / rank
        sets = make_sets(tokens, rank, dev, gen)
        inner = INNER[tokens]
        fns = {"ours": ours(s, D, D), "fused": ours(s, D, D), "eager": peft(s, D, D),
               "materialised": materialised(s, D, D)}
        compile_note = ""
        if compile_spent < COMPILE_BUDGET_S:
            torch._dynamo.reset()
            compiled = torch.compile(peft(s, D, D), dynamic=False)
            t0 = time.time()
            try:
                passes(compiled, sets)["fwd+bwd"](0)  # compiles forward and backward
                torch.cuda.synchronize()
                fns["compile"] = compiled
            except Exception as e:  # an inductor/triton failure costs only this column
                compile_note = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(compile_note, flush=True)
            spent = time.time() - t0
            compile_spent += spent
            print(f"[{tokens} tokens, rank {rank}] torch.compile took {spent:.1f} s", flush=True)
        else:
            compile_note = f"compile skipped: the {COMPILE_BUDGET_S:.0f} s compile budget is spent"
        errs = {}
        ref = reference(sets, s)
        for m, fn in fns.items():
            errs[m] = under(m, verify)(fn, sets, ref)
            if not errs[m] <= 1e-2:
                bad.append(f"{m} at {tokens} tokens rank {rank}: relative L2 {errs[m]:.2e} vs float64")
        del ref
        print(f"[{tokens} tokens, rank {rank}] relative L2 vs float64: "
              + ", ".join(f"{m} {e:.1e}" for m, e in errs.items()), flush=True)
        peaks[(tokens, rank)] = {m: peak_mib(under(m, passes(fn, sets)["fwd+bwd"])) for m, fn in fns.items()}
        for name in ("fwd", "fwd+bwd"):
            times = {}
            for m in METHODS:
                if m in fns and errs[m] <= 1e-2:
                    times[m] = timed(under(m, passes(fns[m], sets)[name]), len(sets), inner)
                else:
                    times[m] = None
            print(f"[{tokens} tokens, rank {rank}] {name}: "
                  + ", ".join(f"{m} {fmt_us(v)} µs" for m, v in times.items()), flush=True)
            rows.append((tokens, rank, name, times, compile_note))
        del sets, fns
        torch.cuda.empty_cache()

    table = format_table(rows, peaks, gpu, bad)
    print()
    print(table)
    path = os.environ.get("SINGLORA_BENCH_TABLE")
    if path:
        with open(path, "a") as f:
            f.write("\n" + table)
    print(f"bench.py: done in {time.time() - started:.1f} s"
          f"{'' if not bad else ' with WRONG RESULTS'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
