"""Train a GPT-2-style model (the LLMs-from-scratch GPTModel layout) on the bundled sample text,
with its input embedding fused by tokemb-fast: the only change to an existing training script is
the `swap_input_embeddings(model)` line.

    python examples/train_gpt2.py                      # tiny config on CPU, 124M on a GPU
    python examples/train_gpt2.py --size 124M --steps 50 --batch-size 8 --context 256
"""
import argparse
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_models import GPTModel  # noqa: E402

from tokemb_fast import swap_input_embeddings  # noqa: E402
from tokemb_fast.data import GPT2_VOCAB_SIZE, create_dataloader, sample_text  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=GPT2_VOCAB_SIZE, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1),
    "124M": dict(vocab_size=GPT2_VOCAB_SIZE, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                 drop_rate=0.1),
}


def progress(step, steps, loss, tokens_per_s, width=24):
    done = int(width * step / steps)
    line = f"[{'#' * done}{'.' * (width - done)}] step {step:4d}/{steps}  loss {loss:7.4f}  {tokens_per_s:9.0f} tok/s"
    if sys.stdout.isatty():
        print("\r" + line, end="" if step < steps else "\n", flush=True)
    elif step == 1 or step == steps or step % max(1, steps // 10) == 0:
        print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["auto", *CONFIGS], default="auto",
                        help="model config (default: tiny on CPU, 124M on CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default: 32 tiny, 256 124M)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--no-swap", action="store_true", help="train the unmodified model (the baseline)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    size = args.size if args.size != "auto" else ("124M" if device.type == "cuda" else "tiny")
    context = args.context or (256 if size == "124M" else 32)
    config = dict(CONFIGS[size], context_length=max(context, CONFIGS[size]["context_length"]))
    torch.manual_seed(args.seed)
    loader = create_dataloader(sample_text(), batch_size=args.batch_size, max_length=context, stride=context,
                               shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    model = GPTModel(**config).to(device)
    if not args.no_swap:
        swap_input_embeddings(model)  # <- the one-line change
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"GPTModel {size}: {parameters / 1e6:.1f}M parameters on {device}, context {context}, "
          f"batch {args.batch_size}, {getattr(model, 'tokemb_fast_family', 'not swapped')}")

    model.train()
    batches = iter(loader)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"loss is {losses[-1]} at step {step}", file=sys.stderr)
            return 1
        # Throughput from step 2 on: step 1 includes compiling the kernels (Triton's, cuBLAS's).
        now = time.perf_counter()
        if step == 1:
            first_step_s, start = now - start, now
            tokens_per_s = inputs.numel() / first_step_s
        else:
            tokens_per_s = (step - 1) * inputs.numel() / (now - start)
        progress(step, args.steps, losses[-1], tokens_per_s)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    if args.steps > 1:
        print(f"{tokens_per_s:.0f} tok/s over steps 2-{args.steps} (step 1, with compilation: {first_step_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
