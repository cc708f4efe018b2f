"""Configuration of a Headroom compact export: the source family's own config plus what each layer keeps.

``headroom_layers`` has one entry per decoder layer: ``kind`` is ``attention`` (ordinary attention over
the kept heads), ``drop_qk`` (the per-token map ``o_proj(v_proj(x))``, no query/key projections) or
``none`` (no attention branch at all); ``query_heads`` and ``kv_heads`` are the kept heads, numbered as
in the source model; ``o_bias`` (only where true) that the layer's o_proj has a bias the source's lacks
(a mask's bias compensation). ``headroom_qkv_bias`` and ``headroom_o_bias`` say whether the source's value
and output projections have biases (the drop-QK layers' own modules need to know);
``headroom_qk_norm_spans_heads`` that the q/k norms span every head (OLMo2), so attention layers keep
every head's q/k rows for the norm and select the kept heads after it. Only torch and transformers are
imported: this file travels inside the export.
"""

from __future__ import annotations

from transformers import CONFIG_MAPPING

ATTENTION, DROP_QK, NONE = "attention", "drop_qk", "none"


def _kv_sharing_modes(self) -> list[str | None] | None:
    """Layers without attention keep no KV cache.

    transformers builds a ``DummyLayer`` (which stores nothing and is skipped when the cache is asked
    for its length or mask sizes) for every layer marked ``"reuse"`` here. With no attention layer
    left at all, the plain cache is kept: it then stays empty, and no layer reads positions.
    """
    kinds = [layer["kind"] for layer in self.headroom_layers]
    if ATTENTION not in kinds:
        return None
    return ["reuse" if kind != ATTENTION else None for kind in kinds]


def _config_class(family: str) -> type:
    """The family's config class with ``headroom_layers``; its ``model_type`` stays the family's.

    A known ``model_type`` in ``config.json`` lets ``AutoTokenizer.from_pretrained(export)`` (which
    reads the config first) load the config without remote code, so it never stops on transformers'
    "run the custom code? [y/N]" prompt; the model still comes from ``auto_map`` with
    ``trust_remote_code=True``.
    """
    base = CONFIG_MAPPING[family]
    return type(
        f"Headroom{base.__name__}",
        (base,),
        {
            "model_type": family,
            "kv_sharing_modes": property(_kv_sharing_modes),
            "__doc__": f"{base.__name__} of a pruned model; ``headroom_layers`` says what each layer keeps.",
        },
    )


MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text", "qwen3", "phi3", "olmo2", "smollm3")
CONFIGS = {model_type: _config_class(model_type) for model_type in MODEL_TYPES}
# ``auto_map`` in an export's config.json names a class of this module (``HeadroomLlamaConfig``, ...).
globals().update({config.__name__: config for config in CONFIGS.values()})
