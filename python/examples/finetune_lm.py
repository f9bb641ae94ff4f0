"""Pretrain a small language model on Python's own standard library, then adapt it to one
package of it with SingLoRA (ours), peft-singlora and plain LoRA (peft), side by side.

    PYTHONPATH=python:.toolchain/torch:.toolchain/peft python3 python/examples/finetune_lm.py \\
        --pretrain-steps 100 --steps 60            # CPU: small and slow; CUDA: add --device cuda

The corpus ships with Python: the ``.py`` files at the top of
``sysconfig.get_paths()["stdlib"]`` for pretraining, the files of one package
(``--package``, default ``asyncio``) for the adaptation (its last tenth held
out for evaluation), as bytes (a byte-level tokenizer: vocabulary 256).
The model is a LLaMA built from a ``transformers.LlamaConfig`` (no download)
when transformers imports, else a small hand-written transformer with the
same module names; it is pretrained in full, then frozen, and each method
adapts the same copy of it (``q/k/v/o_proj``, ``gate/up/down_proj``) with the
same rank, alpha, learning rate, ramp and batches:

* ``singlora``: :func:`singlora.peft.inject` (our kernels on CUDA; torch ops
  on CPU), stepped with :func:`singlora.peft.step` after each optimizer step;
* ``peft-singlora``: the same adapters converted with
  :func:`singlora.peft.to_peft_singlora` (same initial A, so its curve
  should lie on ours), stepped with ``update_singlora_global_step``;
* ``lora``: ``peft.get_peft_model`` with a ``LoraConfig`` of the same r and
  alpha (A random, B zero: it starts at the frozen model too).

``--dropout p`` (default 0) gives every method adapter dropout p in training
(evaluation runs in eval mode, without it). Ours draws its masks from the
kernels' Philox stream, peft-singlora and peft from torch's RNG, so with
p > 0 the curves of ours and peft-singlora agree in distribution, not step
for step.

Prints each method's evaluation loss before and after, training tokens/s and
peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: not measured),
as a Markdown table; writes the loss curves to ``<out>/finetune_lm.json``
and, when matplotlib imports, ``<out>/finetune_lm.png`` (pretraining loss;
held-out loss during the adaptation, every ``--eval-every`` steps). A method whose
package is missing is skipped with the reason.
"""

import argparse
import copy
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # python/
from singlora import peft as sp  # noqa: E402

WARMUP = 3  # steps left out of tokens/s (first-call costs)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -------------------------------------------------------------------- data


def corpus(package, max_bytes):
    """(pretraining bytes, adaptation bytes) from the standard library's source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(p for p in root.glob("*.py") if p.is_file())
    pkg = sorted(p for p in (root / package).rglob("*.py") if "test" not in p.parts)
    if not top or not pkg:
        raise SystemExit(f"finetune_lm: no .py files under {root} (top level) or {root / package}")

    def read(paths):
        out = bytearray()
        for p in paths:
            out += p.read_bytes() + b"\n"
            if len(out) >= max_bytes:
                break
        return torch.frombuffer(out[:max_bytes], dtype=torch.uint8).long()

    return read(top), read(pkg)


def batches(tokens, batch, seq, steps, seed, device):
    """``steps`` batches of random windows (batch × (seq + 1)), the same for every method."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        yield torch.stack([tokens[j:j + seq + 1] for j in i.tolist()]).to(device)


# ------------------------------------------------------------------- model


class _Block(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.n2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    """A pre-norm transformer with LLaMA's module names (used without transformers)."""

    def __init__(self, vocab, d, layers, heads, ff, seq):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.layers = nn.ModuleList(_Block(d, heads, ff) for _ in range(layers))
        self.norm, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build_model(args):
    try:
        import transformers
    except Exception as e:
        print(f"transformers not importable ({type(e).__name__}): the hand-written TinyLM instead")
        return TinyLM(256, args.hidden, args.layers, args.heads, 3 * args.hidden, args.seq), "TinyLM"
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.seq,
    )
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg), f"LLaMA (transformers {transformers.__version__})"


def lm_loss(model, chunk):
    out = model(chunk[:, :-1])
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))


# ------------------------------------------------------------------ training


def autocast(args):
    if args.amp == "none":
        return torch.autocast(args.device.type, enabled=False)
    return torch.autocast(args.device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, tokens, args):
    model.eval()
    with autocast(args):
        losses = [lm_loss(model, c).item() for c in batches(tokens, args.batch, args.seq, args.eval_batches, 1234, args.device)]
    model.train()
    return sum(losses) / len(losses)


def train(model, params, tokens, steps, args, after_step=None, seed=0, eval_tokens=None):
    """AdamW over ``params`` for ``steps`` batches. Returns (train loss per
    step, [(step, eval loss)] every ``--eval-every`` steps when ``eval_tokens``
    is given, training tokens/s, peak bytes or None). Tokens/s counts the
    steps after the first ``WARMUP`` and leaves the evaluations out."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    curve, evals, timed = [], [], 0.0
    warm = min(WARMUP, steps - 1)
    every = max(1, args.eval_every or steps // 10)
    if eval_tokens is not None:
        evals.append((0, evaluate(model, eval_tokens, args)))
    model.train()
    for i, chunk in enumerate(batches(tokens, args.batch, args.seq, steps, seed, args.device)):
        t0 = time.perf_counter()
        with autocast(args):
            loss = lm_loss(model, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(i + 1)
        curve.append(loss.item())  # waits for the step's work (the previous .item() did too)
        if i >= warm:
            timed += time.perf_counter() - t0
        if eval_tokens is not None and ((i + 1) % every == 0 or i + 1 == steps):
            evals.append((i + 1, evaluate(model, eval_tokens, args)))
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return curve, evals, (steps - warm) * args.batch * args.seq / timed, peak


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adapt_singlora(base, args, ramp):
    model = sp.inject(copy.deepcopy(base).requires_grad_(False), TARGETS, r=args.rank,
                      alpha=float(args.alpha), ramp_up_steps=ramp, dropout=args.dropout)
    return model, lambda t: sp.step(model)


def adapt_peft_singlora(base, args, ramp):
    import peft_singlora

    model, _ = adapt_singlora(base, args, ramp)  # the same initial A as ours
    sp.to_peft_singlora(model)
    return model, lambda t: peft_singlora.update_singlora_global_step(model, t)


def adapt_lora(base, args, ramp):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=args.dropout)
    return get_peft_model(copy.deepcopy(base), cfg), None


METHODS = {"singlora": adapt_singlora, "peft-singlora": adapt_peft_singlora, "lora": adapt_lora}


# ----------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default=None,
                    help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    ap.add_argument("--package", default="asyncio", help="the stdlib package to adapt to")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of each corpus part")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=200, help="adaptation steps per method")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=8)
    ap.add_argument("--ramp", type=float, default=0.1, help="SingLoRA's T as a fraction of --steps")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="adapter dropout p for every method (LoRA recipes use 0.05-0.1; the default 0 "
                         "keeps ours and peft-singlora's curves comparable step for step, their masks "
                         "coming from different generators)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=0, help="adaptation steps between evaluations (0: a tenth)")
    ap.add_argument("--methods", default="singlora,peft-singlora,lora")
    ap.add_argument("--out", default="finetune_lm-out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.device = torch.device(args.device)
    if args.amp is None:
        args.amp = "bf16" if args.device.type == "cuda" else "none"
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")

    torch.manual_seed(args.seed)
    pre, adapt = corpus(args.package, args.max_bytes)
    cut = len(adapt) * 9 // 10
    adapt_train, adapt_eval = adapt[:cut], adapt[cut:]
    base, kind = build_model(args)
    base = base.to(args.device)
    print(f"model: {kind}, hidden {args.hidden}, {args.layers} layers, "
          f"{sum(p.numel() for p in base.parameters()):,} parameters; device {args.device}, amp {args.amp}")
    print(f"corpus: {len(pre):,} bytes of stdlib top-level modules (pretraining), "
          f"{len(adapt):,} bytes of {args.package}/ (adaptation, last 10% held out)")

    lr = args.lr
    args.lr = args.pretrain_lr
    pre_curve, _, pre_tps, _ = train(base, list(base.parameters()), pre, args.pretrain_steps, args, seed=args.seed)
    args.lr = lr
    print(f"pretrained {args.pretrain_steps} steps: loss {pre_curve[0]:.3f} -> {pre_curve[-1]:.3f} "
          f"({pre_tps:,.0f} tokens/s); eval on {args.package}/: {evaluate(base, adapt_eval, args):.3f}")

    ramp = max(1, round(args.ramp * args.steps))
    results, curves = [], {"pretrain": pre_curve}
    for name in methods:
        torch.manual_seed(args.seed + 1)  # the adapters' init: ours and peft-singlora get the same A
        try:
            model, after = METHODS[name](base, args, ramp)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        params = trainable(model)
        curve, evals, tps, peak = train(model, params, adapt_train, args.steps, args, after,
                                        seed=args.seed + 1, eval_tokens=adapt_eval)
        before, after_loss = evals[0][1], evals[-1][1]
        curves[name] = {"train": curve, "eval": evals}
        results.append((name, sum(p.numel() for p in params), before, after_loss, tps, peak))
        print(f"{name}: eval loss {before:.3f} -> {after_loss:.3f}, {tps:,.0f} tokens/s")

    print()
    print(f"| method | trainable params | eval loss before | after {args.steps} steps | train tokens/s | peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, before, after_loss, tps, peak in results:
        mem = f"{peak / 2**20:,.1f} MiB" if peak is not None else "n/a (CPU)"
        print(f"| {name} | {n:,} | {before:.3f} | {after_loss:.3f} | {tps:,.0f} | {mem} |")
    print(f"(rank {args.rank}, alpha {args.alpha}, lr {args.lr}, SingLoRA ramp T = {ramp} steps, "
          f"batch {args.batch} × {args.seq} tokens, {args.device}, amp {args.amp})")
    if args.device.type != "cuda":
        print("(on CPU, singlora runs its torch-op fallback, not the kernels: these tokens/s say nothing "
              "about the kernels)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves,
              "results": [dict(zip(("method", "trainable", "eval_before", "eval_after", "tokens_per_s",
                                    "peak_bytes"), r)) for r in results]}
    (out / "finetune_lm.json").write_text(json.dumps(record, indent=1))
    print(f"curves: {out / 'finetune_lm.json'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"matplotlib not importable ({type(e).__name__}: {e}): no PNG, the curves are in the JSON")
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(pre_curve, color="gray")
    ax0.set(title="pretraining (stdlib top-level modules)", xlabel="step", ylabel="train loss (nats/byte)")
    for name, c in curves.items():
        if name == "pretrain":
            continue
        steps, losses = zip(*c["eval"])
        ax1.plot(steps, losses, marker="o", markersize=3, label=name,
                 linestyle="--" if name == "peft-singlora" else "-")
    ax1.set(title=f"adaptation to {args.package}/: held-out loss (rank {args.rank})", xlabel="step",
            ylabel="eval loss (nats/byte)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "finetune_lm.png", dpi=110)
    print(f"plot: {out / 'finetune_lm.png'}")


if __name__ == "__main__":
    main()
