"""Dense families no registered format holds exactly: the nearest transformers MoE format and what
it lacks, for the one-line refusal (checked against the installed transformers 5.x code)."""

NEAREST = {
    "gpt2": ("Mixtral", "GPT-2's learned positions, LayerNorms and non-gated GELU MLP"),
    "gpt_neox": ("Mixtral", "GPT-NeoX's parallel attention/MLP residual, LayerNorms and non-gated GELU MLP"),
    "opt": ("Mixtral", "OPT's learned positions, LayerNorms and non-gated ReLU MLP"),
    "bert": ("none", "an encoder MoE format (transformers has no BERT-style MoE)"),
    "t5": ("SwitchTransformers", "dropless routing: Switch's top-1 router drops tokens past each expert's capacity"),
    "phi3": ("PhiMoE", "Phi-3's RMSNorm (PhiMoE has LayerNorm with biases) and plain top-K routing (PhiMoE uses SparseMixer)"),
    "gemma": ("Mixtral", "Gemma's (1 + w) RMSNorm, scaled embeddings and tanh-GELU gating"),
    "gemma2": ("Mixtral", "Gemma 2's extra norms, logit soft-capping and alternating sliding windows"),
    "gemma3_text": ("Mixtral", "Gemma 3's extra norms, q/k norms and alternating sliding windows"),
    "gemma4_text": ("Gemma 4 (enable_moe_block)", "a replacement for the MLP: its MoE block runs beside the dense MLP "
                    "with norms of its own, so MLP + MoE is not the upcycled layer"),
    "olmo": ("OLMoE", "OLMo's parameter-free LayerNorms (OLMoE has RMSNorm weights and q/k norms)"),
    "olmo3": ("FlexOlmo", "OLMo 3's sliding-window attention layers"),
    "exaone4": ("EXAONE-MoE", "EXAONE 4's post-norm layers (EXAONE-MoE normalises before attention and MLP)"),
    "phi": ("PhiMoE", "Phi's parallel attention/MLP block and non-gated GELU MLP"),
    "lfm2": ("LFM2-MoE", "a softmax router: its router weights are sigmoid(logits), renormalised (+1e-6) and scaled"),
}
