"""gptfast and Hugging Face: patch transformers models in place, read and write checkpoints.

    import gptfast.hf
    gptfast.hf.patch(model)                    # a transformers GPT-2 / Llama / BLOOM / Gemma-2
    gpt = gptfast.hf.load_gpt2("path/to/gpt2") # gptfast's GPT from a local HF GPT-2 folder
    gptfast.hf.save_gpt2(gpt, "out/")          # a folder transformers loads
    bloom = gptfast.hf.load_bloom("path/to/bloom-560m")   # ALiBi, embedding LayerNorm
    tok = gptfast.hf.load_tokenizer("path/to/gpt2")

Needs the `hf` extra (`pip install 'gptfast[hf]'`: transformers, safetensors, tokenizers);
nothing here imports transformers before it is used, and nothing downloads anything.
"""
from .checkpoint import (CheckpointFormatError, load_bloom, load_gpt2, load_model, save_bloom,
                         save_gpt2)
from .patch import ARCHITECTURES, PatchReport, is_patched, patch, register, unpatch
from .tokenizer import HFTokenizer, load_tokenizer

__all__ = ["patch", "unpatch", "is_patched", "register", "PatchReport", "ARCHITECTURES",
           "load_gpt2", "save_gpt2", "load_bloom", "save_bloom", "load_model",
           "CheckpointFormatError", "load_tokenizer", "HFTokenizer"]
