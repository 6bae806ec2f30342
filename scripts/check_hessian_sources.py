#!/usr/bin/env python
"""Where GPTQ's Hessians come from, and what it does to quality: why `hessian: shared` trails
GPTQModel's loop.

For each GPTQ permutation, the decoder is quantized layer by layer with the project's own solve
(`hessians.solve_group`: GPTQModel's GPTQ.quantize, layers sharing an input stacked) from Hessians
collected four ways:

- shared:   the fp16 model's inputs, every linear of a layer at once (what `hessian: shared` does);
- cross:    inputs from the already-quantized earlier layers, the layer itself still fp16;
- within:   the fp16 model's inputs, the layer's groups quantized in turn (q/k/v, o, gate/up,
            down), each group's inputs from the groups already quantized;
- feedback: both, as GPTQModel's loop (`hessian: sequential`) does.

The quantized weights are then kept dense in float32 and scored on N windows of 512 tokens spread
over wikitext-2-raw test, every position after the first (full context), with the standard error
of each mode's perplexity change against `feedback` from the per-window differences. The
calibration windows are the recipe's (16 x 512, seed 0, held_out 0.03: the same as
`bench_gptq.py --awq-check`); the scored windows overlap them by about 3%, alike for every mode.
Nothing is asserted.

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/check_hessian_sources.py [--modes shared feedback]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_gptq import parse_gptq  # noqa: E402
WIKITEXT = Path(os.environ.get("QUANTIZE_WIKITEXT_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))
MODES = ("shared", "cross", "within", "feedback")
# the groups GPTQModel's loop quantizes in turn, each group's layers reading one input
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct-fair")
    parser.add_argument("--permutations", nargs="+", default=["4:32:act", "4:32:noact", "4:64:act", "4:64:noact"],
                        help="bits:group:act|noact")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--windows", type=int, default=100, help="512-token windows scored")
    return parser.parse_args()


def calibration_windows(tokenizer) -> list[list[int]]:
    from quantize.calibration import load_texts, token_windows
    from quantize.schema import Calibration

    calib = Calibration(samples=16, seq_len=512, seed=0, held_out=0.03)
    text = load_texts(calib).calibration
    return token_windows(tokenizer(text, add_special_tokens=False)["input_ids"], 16, 512, 0)


def scored_windows(tokenizer, count: int, width: int = 512) -> list[list[int]]:
    ids = tokenizer((WIKITEXT / "wikitext-2-raw-v1" / "wiki.test.raw").read_text())["input_ids"]
    step = len(ids) // width // count
    return [ids[i * step * width:(i * step + 1) * width] for i in range(count)]


class LayerRunner:
    """One decoder layer run over captured inputs, with the keyword arguments the model gives it."""

    def __init__(self, model, windows: list[list[int]]):
        import torch

        self.inputs, self.kwargs = [], {}

        class Captured(Exception):
            pass

        def capture(module, args, kwargs):
            self.inputs.append(args[0] if args else kwargs["hidden_states"])
            self.kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise Captured

        handle = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        for ids in windows:
            try:
                model(input_ids=torch.tensor([ids]), use_cache=False)
            except Captured:
                pass
        handle.remove()

    def outputs(self, layer, inputs):
        results = [layer(x, **self.kwargs) for x in inputs]
        return [r[0] if isinstance(r, tuple) else r for r in results]

    def hessians(self, layer, inputs, leaders) -> tuple[dict, int]:
        """2/N · Σ xᵀx of each leader's input over the inputs' tokens."""
        sums, handles = {}, []
        for name in leaders:
            def accumulate(module, args, output, name=name):
                flat = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = flat.t() @ flat if name not in sums else sums[name].addmm_(flat.t(), flat)
            handles.append(layer.get_submodule(name).register_forward_hook(accumulate))
        tokens = 0
        for x in inputs:
            layer(x, **self.kwargs)
            tokens += x.shape[0] * x.shape[1]
        for handle in handles:
            handle.remove()
        return {name: (2.0 / tokens) * total for name, total in sums.items()}, tokens


def quantize(layer, group, hessian, tokens, qcfg) -> None:
    from quantize.engines.gptqmodel.hessians import solve_group

    members = [layer.get_submodule(name) for name in group]
    for member, (weights, *_rest) in zip(members, solve_group(members, hessian, tokens, qcfg)["parts"]):
        member.weight.data = weights.to(member.weight.dtype)


def quantize_model(model, runner: LayerRunner, mode: str, qcfg) -> None:
    fp16_inputs = runner.inputs
    quantized_inputs = [x.clone() for x in fp16_inputs]
    for layer in model.model.layers:
        inputs = quantized_inputs if mode in ("cross", "feedback") else fp16_inputs
        next_fp16 = runner.outputs(layer, fp16_inputs) if mode in ("shared", "within") else None
        if mode in ("shared", "cross"):
            hessians, tokens = runner.hessians(layer, inputs, [group[0] for group in GROUPS])
            for group in GROUPS:
                quantize(layer, group, hessians[group[0]], tokens, qcfg)
        else:
            for group in GROUPS:
                hessians, tokens = runner.hessians(layer, inputs, [group[0]])
                quantize(layer, group, hessians[group[0]], tokens, qcfg)
        if mode in ("cross", "feedback"):
            quantized_inputs = runner.outputs(layer, quantized_inputs)
        fp16_inputs = next_fp16


def window_nll(model, windows) -> list[float]:
    import torch

    values = []
    for ids in windows:
        x = torch.tensor([ids])
        log_probs = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        values.append(-log_probs.gather(1, x[0, 1:, None]).mean().item())
    return values


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.formats.gptq import GPTQ, GPTQVariant

    args = parse_args()
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration, scored = calibration_windows(tokenizer), scored_windows(tokenizer, args.windows)
    print(f"calibration {len(calibration)} x {len(calibration[0])} tokens; scored {len(scored)} x 511 tokens")
    rows = []
    for permutation in args.permutations:
        qcfg = GPTQ.quantize_config(GPTQVariant(**parse_gptq(permutation), damp=args.damp))  # a release's settings
        nll = {}
        for mode in args.modes:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            started = time.monotonic()
            quantize_model(model, LayerRunner(model, calibration), mode, qcfg)
            seconds = time.monotonic() - started
            nll[mode] = torch.tensor(window_nll(model, scored), dtype=torch.float64)
            print(f"{permutation} {mode}: perplexity {math.exp(nll[mode].mean()):.3f} ({seconds:.0f} s)", flush=True)
        base = nll.get("feedback")
        for mode, values in nll.items():
            change = stderr = float("nan")
            if base is not None and mode != "feedback":
                difference = values - base
                change = 100 * (math.exp(difference.mean()) - 1)
                stderr = 100 * difference.std().item() / math.sqrt(len(difference))
            rows.append((permutation, mode, math.exp(values.mean()), change, stderr))
    print("| Permutation | Hessians from | PPL | vs feedback |")
    print("|---|---|---|---|")
    for permutation, mode, perplexity, change, stderr in rows:
        versus = "" if math.isnan(change) else f"{change:+.2f}% ± {stderr:.2f}%"
        print(f"| {permutation} | {mode} | {perplexity:.3f} | {versus} |")


if __name__ == "__main__":
    sys.exit(main())
