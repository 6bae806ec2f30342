"""The one table of quantization facts: GGUF types, GPTQ/AWQ naming, compatibility.

Everything that renders, plans or validates a quant type reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import group_size_on_disk

GB = 1_000_000_000  # Hub and card sizes are decimal gigabytes ("17.69 GB")
RAM_OVERHEAD_BYTES = int(2.5 * GB)  # "Max RAM required" = file size + 2.50 GB, no GPU offloading


@dataclass(frozen=True)
class GGUFType:
    name: str  # as llama-quantize spells it, e.g. "Q4_K_M"
    bits: int  # the nominal bit width shown in the card's "Bits" column
    bpw: float  # typical bits per weight of a whole file (llama.cpp's own figures, rounded)
    method: str  # "k-quant", "legacy" or "i-quant"
    use_case: str
    needs_imatrix: bool = False


_TYPES = [
    GGUFType("IQ1_S", 1, 1.56, "i-quant", "extremely small, extreme quality loss; needs an importance matrix", True),
    GGUFType("IQ1_M", 1, 1.75, "i-quant", "extremely small, extreme quality loss; needs an importance matrix", True),
    GGUFType("IQ2_XXS", 2, 2.06, "i-quant", "tiny, very high quality loss; for very low memory only", True),
    GGUFType("IQ2_XS", 2, 2.31, "i-quant", "tiny, very high quality loss; for very low memory only", True),
    GGUFType("IQ2_S", 2, 2.50, "i-quant", "tiny, high quality loss", True),
    GGUFType("IQ2_M", 2, 2.70, "i-quant", "very small, high quality loss; best of the 2-bit types", True),
    GGUFType("Q2_K", 2, 2.96, "k-quant", "smallest k-quant, significant quality loss; not for most uses"),
    GGUFType("IQ3_XXS", 3, 3.06, "i-quant", "very small, high quality loss", True),
    GGUFType("IQ3_XS", 3, 3.30, "i-quant", "very small, high quality loss", True),
    GGUFType("IQ3_S", 3, 3.44, "i-quant", "small, high quality loss; better than Q3_K_S at the same size", True),
    GGUFType("Q3_K_S", 3, 3.50, "k-quant", "very small, high quality loss"),
    GGUFType("IQ3_M", 3, 3.66, "i-quant", "small, substantial quality loss; better than Q3_K_M at its size", True),
    GGUFType("Q3_K_M", 3, 3.91, "k-quant", "very small, high quality loss"),
    GGUFType("Q3_K_L", 3, 4.27, "k-quant", "small, substantial quality loss"),
    GGUFType("IQ4_XS", 4, 4.25, "i-quant", "small, good quality for its size", True),
    GGUFType("IQ4_NL", 4, 4.50, "i-quant", "small, good quality; non-linear 4-bit", True),
    GGUFType("Q4_0", 4, 4.55, "legacy", "legacy 4-bit; small, very high quality loss - prefer Q4_K_M"),
    GGUFType("Q4_1", 4, 5.00, "legacy", "legacy 4-bit; a little more accurate than Q4_0 - prefer Q4_K_M"),
    GGUFType("Q4_K_S", 4, 4.58, "k-quant", "small, greater quality loss"),
    GGUFType("Q4_K_M", 4, 4.85, "k-quant", "medium, balanced quality - recommended"),
    GGUFType("Q5_0", 5, 5.54, "legacy", "legacy 5-bit; medium, balanced quality - prefer Q4_K_M"),
    GGUFType("Q5_1", 5, 6.00, "legacy", "legacy 5-bit; a little more accurate than Q5_0 - prefer Q5_K_M"),
    GGUFType("Q5_K_S", 5, 5.54, "k-quant", "large, low quality loss - recommended"),
    GGUFType("Q5_K_M", 5, 5.69, "k-quant", "large, very low quality loss - recommended"),
    GGUFType("Q6_K", 6, 6.59, "k-quant", "very large, extremely low quality loss"),
    GGUFType("Q8_0", 8, 8.50, "legacy", "very large, extremely low quality loss - not recommended for most uses"),
    GGUFType("F16", 16, 16.0, "float", "unquantized half precision; the source every other file is made from"),
    GGUFType("BF16", 16, 16.0, "float", "unquantized bfloat16; the source every other file is made from"),
]

GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in _TYPES}

# The k-quant ladder a full release ships, smallest to largest.
GGUF_LADDER = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M",
               "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]

# What the card's k-quant explanation says about each block format (llama.cpp's definitions).
K_QUANT_BLOCKS = [
    ("GGML_TYPE_Q2_K", '"type-1" 2-bit quantization in super-blocks of 16 blocks of 16 weights; '
     "block scales and mins quantized with 4 bits: 2.5625 bits per weight (bpw)"),
    ("GGML_TYPE_Q3_K", '"type-0" 3-bit quantization in super-blocks of 16 blocks of 16 weights; '
     "scales quantized with 6 bits: 3.4375 bpw"),
    ("GGML_TYPE_Q4_K", '"type-1" 4-bit quantization in super-blocks of 8 blocks of 32 weights; '
     "scales and mins quantized with 6 bits: 4.5 bpw"),
    ("GGML_TYPE_Q5_K", '"type-1" 5-bit quantization, same super-block structure as GGML_TYPE_Q4_K: 5.5 bpw'),
    ("GGML_TYPE_Q6_K", '"type-0" 6-bit quantization in super-blocks of 16 blocks of 16 weights; '
     "scales quantized with 8 bits: 6.5625 bpw"),
]


def gguf_type(name: str) -> GGUFType:
    """Look a GGUF type up by name, case-insensitively ("q4_k_m" -> Q4_K_M)."""
    try:
        return GGUF_TYPES[name.upper()]
    except KeyError:
        raise KeyError(f"unknown GGUF type {name!r}; known: {', '.join(GGUF_TYPES)}") from None


def gguf_file_name(basename: str, type_name: str) -> str:
    """`<basename>.<TYPE>.gguf`: the name `llama-cli -hf repo:TYPE` looks for."""
    return f"{basename}.{type_name}.gguf"


# --- GPTQ / AWQ ---------------------------------------------------------------------------

GPTQ_BITS = (2, 3, 4, 8)
AWQ_BITS = (4,)
GROUP_SIZES = (32, 64, 128, 256, 1024)  # or None: one group per row ("-1" on disk)
SCALE_BITS = 16  # each group stores an fp16 scale ...
# ... and a packed zero point of `bits` bits per output column

# Architectures ExLlama(v2) runs, for the card's "ExLlama" column.
EXLLAMA_MODEL_TYPES = frozenset({"llama", "mistral"})


def gptq_branch_name(bits: int, group_size: int | None, act_order: bool) -> str:
    """TheBloke's branch convention: gptq-4bit-128g-actorder_True, gptq-8bit--1g-actorder_False."""
    return f"gptq-{bits}bit-{group_size_on_disk(group_size)}g-actorder_{act_order}"


def awq_branch_name(bits: int, group_size: int | None) -> str:
    return f"awq-{bits}bit-{group_size_on_disk(group_size)}g"


def exllama_compatible(bits: int, model_type: str | None) -> bool:
    return bits == 4 and (model_type or "").lower() in EXLLAMA_MODEL_TYPES


def quantized_bits_per_weight(bits: int, group_size: int | None, in_features: int) -> float:
    """Storage cost per quantized weight: the packed weight plus each group's scale and zero."""
    group = group_size or in_features
    return bits + (SCALE_BITS + bits) / group


def gptq_default_description(bits: int, group_size: int | None, act_order: bool) -> str:
    """The Desc column when the recipe gives none, in the style of the reference card."""
    text = f"{bits}-bit"
    if group_size:
        text += f", with group size {group_size}g"
        text += " and Act Order." if act_order else ", without Act Order."
        text += " Smaller groups give higher accuracy and use more VRAM."
    else:
        text += ", with Act Order." if act_order else ", without Act Order."
        text += " No group size, to lower VRAM requirements."
    return text


def awq_default_description(bits: int, group_size: int | None) -> str:
    return f"{bits}-bit AWQ" + (f", group size {group_size}g." if group_size else ", no group size.")


def format_size(num_bytes: int | float | None) -> str:
    """Bytes as the cards show them: "17.69 GB" (decimal); small files in MB."""
    if num_bytes is None:
        return "?"
    if num_bytes >= GB / 10:
        return f"{num_bytes / GB:.2f} GB"
    return f"{num_bytes / 1_000_000:.2f} MB"
