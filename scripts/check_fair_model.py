#!/usr/bin/env python
"""Check the fair SmolLM2 rebuild: same function as the plain fp16 rebuild, weights off the Q4_1 grid.

Prints: build time and folder sizes; mean KL divergence (plain || fair) and greedy top-1 agreement
on held-out wikitext tokens (the fair model as saved in fp16 and, for reference, its float32
weights before saving), both run in float32; and the mean relative Q4_1 round-trip error
||W - Q4_1(W)|| / ||W|| over the decoder's linear weights of the plain model, the fair model and
random Gaussian weights of the same shapes and standard deviations; and how salient the input
channels of the layers AWQ scales are (per layer, the largest channel's mean |x| over the median
channel's, averaged over the layers): the signed permutation of the fair model's residual stream
keeps its outlier channels, which AWQ's scales are chosen for, and the earlier rebuild's rotation
(--residual rotation, folder models/SmolLM2-135M-Instruct-rotated) spreads them. Nothing is asserted.

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/check_fair_model.py [--fresh] [--residual rotation]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_builders import (RESIDUAL_TRANSFORMS, build_fair_smollm2, build_smollm2_fp16,  # noqa: E402
                            channel_outlier_ratio, decoder_linear_weights, fair_folder, gaussian_like,
                            logit_agreement, make_function_preserving, q4_1_relative_error)

WIKITEXT = Path(os.environ.get("QUANTIZE_WIKITEXT_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--fair", type=Path, help="default: models/SmolLM2-135M-Instruct-fair (-rotated with "
                        "--residual rotation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--residual", choices=sorted(RESIDUAL_TRANSFORMS), default="signed_permutation",
                        help="how the rebuild transforms the residual stream (rotation: the earlier rebuild)")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens: the end of wikitext-2 test")
    parser.add_argument("--text", type=Path, default=WIKITEXT / "wikitext-2-raw-v1" / "wiki.test.raw")
    parser.add_argument("--fresh", action="store_true", help="rebuild the fair folder (for its build time)")
    args = parser.parse_args()
    args.fair = args.fair or fair_folder(args.original, args.residual)
    return args


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args()
    torch.set_grad_enabled(False)
    build_smollm2_fp16(args.original)
    if args.fresh and args.fair.exists():
        shutil.rmtree(args.fair)
    cached = args.fair.is_dir()
    started = time.monotonic()
    build_fair_smollm2(args.fair, seed=args.seed, source=args.original, residual=args.residual)
    built = "cached" if cached else f"built in {time.monotonic() - started:.0f} s"
    print(f"plain: {args.original} ({folder_mb(args.original):.0f} MB)")
    print(f"fair:  {args.fair} ({folder_mb(args.fair):.0f} MB, {built})")

    tokenizer = AutoTokenizer.from_pretrained(args.original)
    text = args.text.read_text(encoding="utf-8")
    ids = tokenizer(text[-args.tokens * 20:], return_tensors="pt").input_ids[:, -args.tokens:]
    original = AutoModelForCausalLM.from_pretrained(args.original, dtype=torch.float32).eval()
    fair = AutoModelForCausalLM.from_pretrained(args.fair, dtype=torch.float32).eval()
    in_memory = make_function_preserving(copy.deepcopy(original), seed=args.seed, residual=args.residual).eval()

    started = time.monotonic()
    kl, top1 = logit_agreement(original, fair, ids)
    kl32, top1_32 = logit_agreement(original, in_memory, ids)
    print(f"\n{ids.shape[1]} held-out wikitext tokens, run in float32 ({time.monotonic() - started:.0f} s):")
    print(f"  fair, saved in fp16:       mean KL {kl:.2e}, top-1 agreement {top1:.2%}")
    print(f"  fair, float32 before save: mean KL {kl32:.2e}, top-1 agreement {top1_32:.2%}")
    print(f"  head tied: plain {original.config.tie_word_embeddings}, fair {fair.config.tie_word_embeddings}; "
          f"parameters plain {sum(p.numel() for p in original.parameters()) / 1e6:.1f}M, "
          f"fair {sum(p.numel() for p in fair.parameters()) / 1e6:.1f}M")

    plain_weights = list(decoder_linear_weights(original).values())
    fair_weights = list(decoder_linear_weights(fair).values())
    errors = {"plain": q4_1_relative_error(plain_weights), "fair": q4_1_relative_error(fair_weights),
              "random": q4_1_relative_error(gaussian_like(fair_weights, seed=args.seed))}
    print(f"\nQ4_1 round trip, mean ||W - Q4_1(W)|| / ||W|| over {len(fair_weights)} decoder linear weights:")
    for name, error in errors.items():
        print(f"  {name:<7} {error:.4f}")
    print(f"  fair / random: {errors['fair'] / errors['random']:.3f}")

    print(f"\nSalient input channels (max / median of the per-channel mean |x|, mean over layers; "
          f"{ids.shape[1]} tokens):")
    for suffix in AWQ_SCALED_INPUTS:
        ratios = {name: channel_outlier_ratio(model, ids, suffix) for name, model in (("plain", original), ("fair", fair))}
        print(f"  {suffix:<22} plain {ratios['plain']:6.1f}   fair {ratios['fair']:6.1f}")


# The inputs AWQ chooses scales for in a Llama layer: the attention's and the MLP's input (normed
# residual stream, read by q/k/v and gate/up) and the MLP's hidden state (read by down).
AWQ_SCALED_INPUTS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


if __name__ == "__main__":
    main()
