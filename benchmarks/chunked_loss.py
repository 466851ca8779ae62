"""Peak memory and time of the token loss over an LM head: dense logits against modalforge's chunked loss.

One step is the loss's forward and backward from last hidden states ``[batch, tokens, hidden]``
through the head weight ``[vocab, hidden]`` (fp32): ``dense`` builds the full logits and calls
``F.cross_entropy`` (what a model's own loss does); ``chunked`` is
:func:`modalforge.losses.chunked_cross_entropy` (gradients fused into the forward); ``dense
logprobs`` is ``log_softmax(logits).gather`` of the targets (what dpo and grpo computed before
``module.loss_impl`` reached them, and still do with ``dense``), and ``chunked logprobs`` is
:func:`modalforge.losses.chunked_token_logprobs` (their path under ``auto`` from a 32k vocabulary,
recomputing each chunk in backward); both are averaged, so their loss equals the CE's. Memory: each case in a fresh subprocess, one step;
on CPU the peak is the growth of ``VmHWM`` (peak RSS) over the RSS once inputs and gradient buffers
exist, on a GPU ``torch.cuda.max_memory_allocated`` over the same baseline. Time: one more process
runs the cases in turn, ``--repeats`` rounds after a warm-up round, and reports each case's median
step and the median of its per-round ratio to dense (paired, so a busy machine skews both alike).

    python benchmarks/chunked_loss.py                     # vocab 128k, hidden 512, 2 x 1024 tokens
    python benchmarks/chunked_loss.py --vocab 32000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("dense", "chunked", "dense logprobs", "chunked logprobs")


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(case: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from modalforge.losses import chunked_cross_entropy, chunked_token_logprobs, default_chunk_size

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens, args.hidden, device=device, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=g) * args.hidden ** -0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device, generator=g)
    chunk = args.chunk_size or default_chunk_size(args.vocab)

    def step(case: str = case) -> float:
        if case == "dense":
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits.view(-1, args.vocab), labels.view(-1))
        elif case == "chunked":
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        elif case == "dense logprobs":
            logps = torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, labels[..., None])
            loss = -logps.mean()
        else:
            loss = -chunked_token_logprobs(hidden, weight, labels, chunk_size=chunk).mean()
        loss.backward()
        return float(loss)

    # gradient buffers exist before the baseline, so the peak is the loss's own working memory
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss("VmRSS")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    if case != "timing":
        loss = step()
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss("VmHWM")) - base
        return {"case": case, "loss": loss, "peak_mib": peak, "chunk": chunk, "device": device_name}

    def timed(name: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(name)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in args.cases}
    for round_ in range(args.repeats + 1):
        for name in args.cases:
            t = timed(name)
            if round_:  # the first round warms up
                times[name].append(t)
    return {name: {"step_s": statistics.median(ts),
                   "ratio": statistics.median(t / d for t, d in zip(ts, times.get("dense", ts)))}
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: by vocabulary)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--child", choices=(*CASES, "timing"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    passed = [f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--batch={args.batch}", f"--tokens={args.tokens}",
              f"--repeats={args.repeats}", f"--threads={args.threads}", *(["--cpu"] if args.cpu else []),
              *([f"--chunk-size={args.chunk_size}"] if args.chunk_size else []), "--cases", *args.cases]

    def run(case: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *passed, "--child", case], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = [run(case) for case in args.cases]
    timing = run("timing")
    for r in rows:
        r.update(timing[r["case"]])
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.batch} x {args.tokens} tokens, fp32, {rows[0]['device']}; "
          f"chunk {rows[0]['chunk']} rows; full fp32 logits: {args.batch * args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    dense = next((r for r in rows if r["case"] == "dense"), rows[0])
    print("| case | loss | peak of the loss | step (fwd+bwd) | peak / dense | time / dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['loss']:.6f} | {r['peak_mib']:.0f} MiB | {r['step_s'] * 1000:.0f} ms | "
              f"{r['peak_mib'] / dense['peak_mib']:.3f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
