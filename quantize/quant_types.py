"""The one table of quantization facts: GGUF types, GPTQ/AWQ naming, compatibility.

Everything that renders, plans or validates a quant type reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import group_size_on_disk

GB = 1_000_000_000  # Hub and card sizes are decimal gigabytes ("17.69 GB")
RAM_OVERHEAD_BYTES = int(2.5 * GB)  # "Max RAM required" = file size + 2.50 GB, no GPU offloading


# --- GGUF --------------------------------------------------------------------------------------

QK_K = 256  # weights per k-quant super-block

# Block formats as gguf-py's GGML_QUANT_SIZES writes them: (weights per block, bytes per block).
# Bits per weight follow from the layout: bytes * 8 / weights (Q2_K: 84 bytes for 256 weights = 2.625).
BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 2 + 16), "Q4_1": (32, 2 + 2 + 16), "Q5_0": (32, 2 + 4 + 16), "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q2_K": (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    "Q3_K": (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (256, 2 + 2 + QK_K // 2 + 12),
    "Q5_K": (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    "Q8_K": (256, 4 + QK_K + QK_K // 8),
    "IQ1_S": (256, 2 + QK_K // 8 + QK_K // 16),
    "IQ1_M": (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    "IQ2_XXS": (256, 2 + QK_K // 4),
    "IQ2_XS": (256, 2 + QK_K // 4 + QK_K // 32),
    "IQ2_S": (256, 2 + QK_K // 4 + QK_K // 16),
    "IQ3_XXS": (256, 2 + QK_K // 4 + QK_K // 8),
    "IQ3_S": (256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    "IQ4_NL": (32, 2 + 16),
    "IQ4_XS": (256, 2 + 2 + QK_K // 2 + QK_K // 64),
}


def block_bpw(block: str) -> float:
    """Bits per weight of one block format, from its layout."""
    weights, size = BLOCK_LAYOUTS[block]
    return size * 8 / weights


# The tensors llama-quantize gives another format than a file type's main one, as shares of a
# Llama-7B-shaped model's weights (llama.cpp's llama_tensor_get_type rules). The output head is
# about 2%, attn_v and attn_output 8% each, ffn_down 21%.
OUTPUT, ATTN_V, ATTN_OUTPUT, FFN_DOWN = 0.02, 0.08, 0.08, 0.21
ROLE_NAMES = {OUTPUT: "the output tensor", ATTN_V: "attn_v", ATTN_OUTPUT: "attn_output", FFN_DOWN: "ffn_down"}


@dataclass(frozen=True)
class Mix:
    """Some tensors of a file type in another block format."""

    block: str
    share: float  # of all weights
    which: str  # how the card says which tensors


@dataclass(frozen=True)
class GGUFType:
    name: str  # as llama-quantize spells it, e.g. "Q4_K_M"
    bits: int  # the nominal bit width shown in the card's "Bits" column
    method: str  # "k-quant", "legacy", "i-quant" or "float"
    block: str  # the block format most tensors use
    quality: str  # size and quality, for the card's "Use case" column
    mix: tuple[Mix, ...] = ()  # tensors in other formats
    needs_imatrix: bool = False

    @property
    def bpw(self) -> float:
        """Typical bits per weight of a whole file: the block formats weighted by the tensors using them."""
        rest = 1.0 - sum(m.share for m in self.mix)
        return round(rest * block_bpw(self.block) + sum(m.share * block_bpw(m.block) for m in self.mix), 4)

    @property
    def composition(self) -> str:
        if self.method == "float":
            return f"Every tensor in {self.block}."
        if not self.mix:
            return f"GGML_TYPE_{self.block} for every tensor."
        by_block: dict[str, list[str]] = {}
        for m in self.mix:
            by_block.setdefault(m.block, []).append(m.which)
        others = "; ".join(f"GGML_TYPE_{block} for {' and '.join(which)}" for block, which in by_block.items())
        return f"{others}; GGML_TYPE_{self.block} for the rest."

    @property
    def use_case(self) -> str:
        return f"{self.quality}. {self.composition}"


def _out(block: str = "Q6_K") -> Mix:
    return Mix(block, OUTPUT, ROLE_NAMES[OUTPUT])


_HALF_V_DOWN = (ATTN_V + FFN_DOWN) / 2
_TYPES = [
    GGUFType("IQ1_S", 1, "i-quant", "IQ1_S", "The smallest file; extreme quality loss, for experiments only",
             (_out("Q5_K"),), True),
    GGUFType("IQ1_M", 1, "i-quant", "IQ1_M", "Extremely small, extreme quality loss; a little better than IQ1_S",
             (_out("Q5_K"),), True),
    GGUFType("IQ2_XXS", 2, "i-quant", "IQ2_XXS", "Tiny, very high quality loss; when nothing bigger fits",
             (_out("Q5_K"),), True),
    GGUFType("IQ2_XS", 2, "i-quant", "IQ2_XS", "Tiny, very high quality loss; slightly better than IQ2_XXS",
             (_out("Q5_K"),), True),
    GGUFType("IQ2_S", 2, "i-quant", "IQ2_S", "Tiny, high quality loss", (_out("Q5_K"),), True),
    GGUFType("IQ2_M", 2, "i-quant", "IQ2_S", "Very small, high quality loss; the best 2-bit type",
             (_out("Q5_K"), Mix("IQ3_S", ATTN_V, "attn_v")), True),
    GGUFType("Q2_K", 2, "k-quant", "Q2_K", "The smallest k-quant; significant quality loss, not for most uses",
             (_out(), Mix("Q3_K", ATTN_V + ATTN_OUTPUT + FFN_DOWN, "attn_v, attn_output and ffn_down"))),
    GGUFType("IQ3_XXS", 3, "i-quant", "IQ3_XXS", "Very small, high quality loss; better than Q2_K at a similar size",
             (_out("Q5_K"),), True),
    GGUFType("IQ3_XS", 3, "i-quant", "IQ3_XXS", "Very small, high quality loss; better than Q3_K_S",
             (_out("Q5_K"), Mix("IQ3_S", ATTN_V + FFN_DOWN, "attn_v and ffn_down")), True),
    GGUFType("IQ3_S", 3, "i-quant", "IQ3_S", "Small, substantial quality loss; better than Q3_K_S at the same size",
             (_out("Q5_K"),), True),
    GGUFType("Q3_K_S", 3, "k-quant", "Q3_K", "Very small, high quality loss", (_out(),)),
    GGUFType("IQ3_M", 3, "i-quant", "IQ3_S", "Small, substantial quality loss; better than Q3_K_M at its size",
             (_out("Q5_K"), Mix("Q4_K", ATTN_V, "attn_v")), True),
    GGUFType("Q3_K_M", 3, "k-quant", "Q3_K", "Very small, high quality loss; better than Q3_K_S",
             (_out(), Mix("Q4_K", ATTN_V + ATTN_OUTPUT + FFN_DOWN / 2, "attn_v, attn_output and half of ffn_down"),
              Mix("Q5_K", FFN_DOWN / 2, "the other half of ffn_down"))),
    GGUFType("Q3_K_L", 3, "k-quant", "Q3_K", "Small, substantial quality loss; the best 3-bit k-quant",
             (_out(), Mix("Q5_K", ATTN_V + ATTN_OUTPUT + FFN_DOWN, "attn_v, attn_output and ffn_down"))),
    GGUFType("IQ4_XS", 4, "i-quant", "IQ4_XS", "Small, good quality for its size; close to Q4_K_S, smaller",
             (_out(),), True),
    GGUFType("IQ4_NL", 4, "i-quant", "IQ4_NL", "Small, good quality; non-linear 4-bit in blocks of 32",
             (_out(),), True),
    GGUFType("Q4_0", 4, "legacy", "Q4_0", "Legacy 4-bit; small, very high quality loss - prefer Q4_K_M", (_out(),)),
    GGUFType("Q4_1", 4, "legacy", "Q4_1",
             "Legacy 4-bit; more accurate than Q4_0, not as accurate as Q5_0, faster than the 5-bit types",
             (_out(),)),
    GGUFType("Q4_K_S", 4, "k-quant", "Q4_K", "Small, greater quality loss than Q4_K_M",
             (_out(), Mix("Q5_K", FFN_DOWN / 8, "the first layers' ffn_down"))),
    GGUFType("Q4_K_M", 4, "k-quant", "Q4_K", "Medium, balanced quality - recommended",
             (_out(), Mix("Q6_K", _HALF_V_DOWN, "half of attn_v and ffn_down"))),
    GGUFType("Q5_0", 5, "legacy", "Q5_0", "Legacy 5-bit; medium, balanced quality - prefer Q4_K_M", (_out(),)),
    GGUFType("Q5_1", 5, "legacy", "Q5_1", "Legacy 5-bit; more accurate than Q5_0, larger and slower - prefer Q5_K_M",
             (_out(),)),
    GGUFType("Q5_K_S", 5, "k-quant", "Q5_K", "Large, low quality loss - recommended", (_out(),)),
    GGUFType("Q5_K_M", 5, "k-quant", "Q5_K", "Large, very low quality loss - recommended",
             (_out(), Mix("Q6_K", _HALF_V_DOWN, "half of attn_v and ffn_down"))),
    GGUFType("Q6_K", 6, "k-quant", "Q6_K", "Very large, extremely low quality loss"),
    GGUFType("Q8_0", 8, "legacy", "Q8_0",
             "Very large, almost indistinguishable from float16; high resource use - not recommended for most uses"),
    GGUFType("F16", 16, "float", "F16", "Unquantised half precision; the file every other type is made from"),
    GGUFType("BF16", 16, "float", "BF16", "Unquantised bfloat16; the file every other type is made from"),
]

GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in _TYPES}

# The k-quant ladder a full release ships, smallest to largest.
GGUF_LADDER = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M",
               "Q5_0", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]

# The k-quant block formats the card explains: (block, "type-0"/"type-1", bits, blocks per super-block,
# weights per block, bits of the block scales (and mins)). Bits per weight come from BLOCK_LAYOUTS.
_K_QUANT_FORMATS = [
    ("Q2_K", "type-1", 2, 16, 16, "block scales and mins quantized with 4 bits"),
    ("Q3_K", "type-0", 3, 16, 16, "scales quantized with 6 bits"),
    ("Q4_K", "type-1", 4, 8, 32, "scales and mins quantized with 6 bits"),
    ("Q5_K", "type-1", 5, 8, 32, "scales and mins quantized with 6 bits"),
    ("Q6_K", "type-0", 6, 16, 16, "scales quantized with 8 bits"),
]


def _k_quant_text(block: str, kind: str, bits: int, blocks: int, weights: int, scales: str) -> str:
    return (f'"{kind}" {bits}-bit quantization in super-blocks of {blocks} blocks of {weights} weights; '
            f"{scales}: {block_bpw(block):g} bits per weight (bpw)")


# What the card's k-quant explanation says about each block format (llama.cpp's definitions).
K_QUANT_BLOCKS = [(f"GGML_TYPE_{row[0]}", _k_quant_text(*row)) for row in _K_QUANT_FORMATS]


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
