"""Name evidence: key names split into canonical tokens (synonyms folded), and how similar two names are."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["KeyName", "key_name", "numbers_of", "ordinal_of", "rarity", "similarity", "token_similarity", "words_of"]

# Each spelling -> its concept. Compound spellings (`dwconv`) expand to several concepts.
_SYNONYMS: dict[str, tuple[str, ...]] = {}


def _concept(concept: str, *spellings: str) -> None:
    for spelling in (concept, *spellings):
        _SYNONYMS[spelling] = (concept,)


_concept(
    "norm",
    "bn",
    "ln",
    "gn",
    "normalization",
    "normalisation",
    "layernorm",
    "batchnorm",
    "groupnorm",
    "rmsnorm",
    "lnorm",
    "nrm",
    "layrnorm",  # transformers' CLIP: pre_layrnorm
)
_concept("conv", "convolution", "conv2d", "conv1d", "conv3d", "convs")
_concept("proj", "projection", "projector")
_concept("fc", "linear", "dense", "lin", "classifier", "logits")
_concept("head", "heads")
_concept("block", "blocks", "layer", "layers", "stage", "stages", "h", "res", "resblocks", "resblock", "encoder_layer")
_concept("attn", "attention", "self_attention", "selfattention", "self_attn", "selfattn", "mha", "msa", "sa")
_concept("q", "query", "queries", "wq")
_concept("k", "key", "keys", "wk")
_concept("v", "value", "values", "wv")
_concept("o", "out", "output", "wo")
_concept("embed", "embedding", "embeddings", "emb", "embedder", "embd")
_concept("pos", "position", "positional", "positions")
_concept("cls", "class")
_concept("token", "tokens", "tok")
_concept("weight", "gamma", "kernel", "w")
_concept("bias", "beta", "b")
_concept("mean", "running_mean", "moving_mean")
_concept("var", "running_var", "moving_variance", "moving_var", "variance")
_concept("downsample", "downsampling", "shortcut", "skip", "down")
_concept("stem", "conv_stem")
_concept("mlp", "ffn", "feed_forward", "feedforward", "ff", "intermediate")
_concept("dw", "depthwise")
_concept("pw", "pointwise")
_concept("se", "squeeze_excite", "squeeze_excitation")
_concept("gate", "gating")
_concept("up", "upsample")
_concept("scale", "layer_scale", "layerscale", "ls")
_concept("vision", "visual", "image", "img", "vit")
_concept("text", "textual", "language")
_SYNONYMS.update(
    {
        "dwconv": ("dw", "conv"),
        "pwconv": ("pw", "conv"),
        "wte": ("token", "embed"),
        "wpe": ("pos", "embed"),
        "qkv": ("q", "k", "v"),
        "kv": ("k", "v"),
        "qk": ("q", "k"),
        "lm_head": ("head",),
        "in_proj": ("q", "k", "v", "proj"),
        "patch_embed": ("patch", "embed"),
        "cls_token": ("cls", "token"),
        "pos_embed": ("pos", "embed"),
        "class_token": ("cls", "token"),
        "ln_f": ("norm", "final"),
        "cross_attn": ("cross", "attn"),
        "crossattention": ("cross", "attn"),
        "cross_attention": ("cross", "attn"),
        "encoder_attn": ("cross", "attn"),
        "encoder_decoder_attention": ("cross", "attn"),
    }
)

# Reference LLM layouts (Meta's llama, torchtitan; w1/w3/w2 is SwiGLU's gate/up/down there) and the ranks of their
# norms (the one before attention comes first): names that say nothing by themselves.
_REFERENCE_LEAVES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("feed_forward", "w1"): ("gate",),
    ("feed_forward", "w3"): ("up",),
    ("feed_forward", "w2"): ("downsample",),
}
_REFERENCE_ORDINALS = {"attention_norm": 1, "attn_norm": 1, "ffn_norm": 2}

# Words that give a module's rank among its siblings of the same kind ("before" ~ "1", "post" ~ "2").
_ORDINALS = {"before": 1, "pre": 1, "input": 1, "first": 1, "after": 2, "post": 2, "second": 2, "third": 3}
# Ordinal words carry only their rank; everything else about them is noise for matching.
_ORDINAL_WORDS = frozenset(_ORDINALS)

_SPLIT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


@lru_cache(maxsize=65536)
def words_of(component: str) -> tuple[str, ...]:
    """The lower-case words of one name component: `layernorm_before` -> (layernorm, before), `conv2d` -> (conv, 2,
    d)."""
    out: list[str] = []
    for part in component.split("_"):
        out.extend(w.lower() for w in _SPLIT.findall(part))
    return tuple(out)


@lru_cache(maxsize=65536)
def _concepts(component: str) -> tuple[str, ...]:
    """The concepts of one component, compound spellings first (`self_attn`, `in_proj`), then word by word."""
    low = component.lower()
    if low in _SYNONYMS:
        return _SYNONYMS[low]
    stripped = re.sub(r"_?\d+$", "", low)
    if stripped and stripped in _SYNONYMS:
        return _SYNONYMS[stripped]
    words = [w for w in words_of(component) if not w.isdigit()]
    out: list[str] = []
    i = 0
    while i < len(words):
        pair = f"{words[i]}_{words[i + 1]}" if i + 1 < len(words) else None
        if pair is not None and pair in _SYNONYMS:
            out.extend(_SYNONYMS[pair])
            i += 2
            continue
        joined = words[i] + words[i + 1] if i + 1 < len(words) else None
        if joined is not None and joined in _SYNONYMS:
            out.extend(_SYNONYMS[joined])
            i += 2
            continue
        word = words[i]
        if word in ("pre", "post") and i + 2 < len(words):
            i += 2  # `post_attention_layernorm`: a norm placed after attention, not an attention module
            continue
        if word not in _ORDINAL_WORDS:
            out.extend(_SYNONYMS.get(word, (word,)))
        i += 1
    return tuple(out)


def ordinal_of(component: str) -> int | None:
    """The rank a component's name states: a trailing number (`norm1`, `ln_2`), an ordinal word
    (`layernorm_before`) or a reference layout's norm (`attention_norm` before `ffn_norm`)."""
    if component in _REFERENCE_ORDINALS:
        return _REFERENCE_ORDINALS[component]
    match = re.search(r"(\d+)$", component)
    if match and not component.isdigit():
        return int(match.group(1))
    for word in words_of(component):
        if word in _ORDINALS:
            return _ORDINALS[word]
    return None


def numbers_of(key: str) -> tuple[int, ...]:
    """Every number in a key, in order: `layer2.0.conv1.weight` -> (2, 0, 1)."""
    return tuple(int(n) for n in re.findall(r"\d+", key))


@dataclass(frozen=True)
class KeyName:
    """A key split for matching: concepts of its module path, of its last module, of its parameter, and its numbers."""

    key: str
    path: frozenset[str]
    leaf: tuple[str, ...]
    param: tuple[str, ...]
    numbers: tuple[int, ...]
    leaf_ordinal: int | None


@lru_cache(maxsize=262144)
def key_name(key: str) -> KeyName:
    """The parsed name of `key` (cached)."""
    parts = key.split(".")
    param = parts[-1]
    modules = parts[:-1]
    leaf_component = next((p for p in reversed(modules) if not p.isdigit()), "")
    path: set[str] = set()
    for part in modules:
        path.update(_concepts(part))
    leaf = _REFERENCE_LEAVES.get(tuple(modules[-2:])) or (_concepts(leaf_component) if leaf_component else ())
    return KeyName(
        key,
        frozenset(path),
        leaf,
        _concepts(param),
        numbers_of(key),
        ordinal_of(leaf_component) if leaf_component else None,
    )


def token_similarity(
    a: frozenset[str] | tuple[str, ...], b: frozenset[str] | tuple[str, ...], weights: Mapping[str, float] | None = None
) -> float:
    """Jaccard similarity of two token collections (1.0 for two empty ones), each token weighted by `weights`
    (rare tokens such as `downsample` count more than ones every key has, such as `block`)."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    if weights is None:
        return len(sa & sb) / len(sa | sb)
    union = sum(weights.get(t, 1.0) for t in sa | sb)
    return sum(weights.get(t, 1.0) for t in sa & sb) / union if union else 1.0


def rarity(source: Iterable[str], target: Iterable[str]) -> dict[str, float]:
    """Token weights for `token_similarity`: inverse document frequency over the module paths of each side,
    the smaller of the two (a token every key of one side has, like `resnet.` or `block`, weighs nothing)."""
    sides = []
    for names in (source, target):
        counts: Counter = Counter()
        total = 0
        for name in names:
            counts.update(key_name(name).path)
            total += 1
        sides.append((counts, total))
    tokens = set(sides[0][0]) | set(sides[1][0])
    return {t: min(math.log((total + 1) / (counts.get(t, 0) + 0.5)) for counts, total in sides) + 0.02 for t in tokens}


def similarity(a: str, b: str, weights: Mapping[str, float] | None = None) -> float:
    """How alike two keys are by name alone, in [0, 1]: parameter name, last module, whole path."""
    na, nb = key_name(a), key_name(b)
    param = token_similarity(na.param, nb.param)
    leaf = token_similarity(na.leaf, nb.leaf) if (na.leaf or nb.leaf) else 1.0
    path = token_similarity(na.path, nb.path, weights)
    # a bare parameter (`text_projection`) against a module's weight (`text_projection.weight`): all words at once
    whole = token_similarity(na.path | set(na.leaf) | set(na.param), nb.path | set(nb.leaf) | set(nb.param), weights)
    return max(0.35 * param + 0.35 * leaf + 0.3 * path, 0.9 * whole)
