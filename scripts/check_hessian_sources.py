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
of each mode's perplexity change against `feedback` from the per-window differences
(`quality.paired_change`). The calibration windows are the recipe's (16 x 512, seed 0, held_out
0.03: the same as `bench_gptq.py --awq-check`); the scored windows overlap them by about 3%, alike
for every mode. `--seeds 0 1` runs every mode on each calibration draw and compares each with
`feedback` on the first: how far another draw moves GPTQModel's own algorithm, the scale against
which shared's differences are read. Nothing is asserted.

    flock /tmp/quantize-heavy.lock .venv/bin/python scripts/check_hessian_sources.py [--modes shared feedback] [--seeds 0 1]
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
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="calibration draws: each mode is run on each; every row is compared with "
                             "`feedback` on the first draw (another draw: how much the loop's own result moves)")
    return parser.parse_args()


def calibration_windows(tokenizer, seed: int = 0) -> list[list[int]]:
    from quantize.calibration import load_texts, token_windows
    from quantize.schema import Calibration

    calib = Calibration(samples=16, seq_len=512, seed=seed, held_out=0.03)
    text = load_texts(calib).calibration
    return token_windows(tokenizer(text, add_special_tokens=False)["input_ids"], 16, 512, seed)


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
    from quantize.quality import paired_change

    args = parse_args()
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = {seed: calibration_windows(tokenizer, seed) for seed in args.seeds}
    scored = scored_windows(tokenizer, args.windows)
    print(f"calibration {len(args.seeds)} draw(s) of 16 x 512 tokens; scored {len(scored)} x 511 tokens")
    rows = []
    for permutation in args.permutations:
        qcfg = GPTQ.quantize_config(GPTQVariant(**parse_gptq(permutation), damp=args.damp))  # a release's settings
        nll = {}
        for seed in args.seeds:
            for mode in args.modes:
                model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
                started = time.monotonic()
                quantize_model(model, LayerRunner(model, calibration[seed]), mode, qcfg)
                seconds = time.monotonic() - started
                nll[mode, seed] = window_nll(model, scored)
                print(f"{permutation} {mode} draw {seed}: perplexity {math.exp(sum(nll[mode, seed]) / len(scored)):.3f} "
                      f"({seconds:.0f} s)", flush=True)
        base = nll.get(("feedback", args.seeds[0]))
        for (mode, seed), values in nll.items():
            versus = None if base is None or values is base else paired_change(base, values)
            rows.append((permutation, mode if len(args.seeds) == 1 else f"{mode}, draw {seed}",
                         math.exp(sum(values) / len(values)), versus))
    print("| Permutation | Hessians from | PPL | vs feedback |")
    print("|---|---|---|---|")
    for permutation, mode, perplexity, versus in rows:
        versus = "" if versus is None else f"{versus[0]:+.2f}% ± {versus[1]:.2f}%"
        print(f"| {permutation} | {mode} | {perplexity:.3f} | {versus} |")


if __name__ == "__main__":
    sys.exit(main())
