"""Configuration of a Headroom compact export: the source family's own config plus what each layer keeps.

``headroom_layers`` has one entry per decoder layer: ``kind`` is ``attention`` (ordinary attention over
the kept heads), ``drop_qk`` (the per-token map ``o_proj(v_proj(x))``, no query/key projections) or
``none`` (no attention branch at all); ``query_heads`` and ``kv_heads`` are the kept heads, numbered as
in the source model. ``headroom_qkv_bias`` and ``headroom_o_bias`` say whether the source's value
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
    base = CONFIG_MAPPING[family]
    return type(
        f"Headroom{base.__name__}",
        (base,),
        {
            "model_type": f"headroom_{family}",
            "kv_sharing_modes": property(_kv_sharing_modes),
            "__doc__": f"{base.__name__} of a pruned model; ``headroom_layers`` says what each layer keeps.",
        },
    )


HeadroomLlamaConfig = _config_class("llama")
HeadroomMistralConfig = _config_class("mistral")
HeadroomQwen2Config = _config_class("qwen2")
HeadroomGemma2Config = _config_class("gemma2")
HeadroomGemma3TextConfig = _config_class("gemma3_text")
HeadroomQwen3Config = _config_class("qwen3")
HeadroomPhi3Config = _config_class("phi3")
HeadroomOlmo2Config = _config_class("olmo2")
HeadroomSmolLM3Config = _config_class("smollm3")
CONFIGS = {
    "llama": HeadroomLlamaConfig,
    "mistral": HeadroomMistralConfig,
    "qwen2": HeadroomQwen2Config,
    "gemma2": HeadroomGemma2Config,
    "gemma3_text": HeadroomGemma3TextConfig,
    "qwen3": HeadroomQwen3Config,
    "phi3": HeadroomPhi3Config,
    "olmo2": HeadroomOlmo2Config,
    "smollm3": HeadroomSmolLM3Config,
}
