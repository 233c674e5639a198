"""gptfast and Hugging Face: patch transformers models in place, read and write checkpoints.

    import gptfast.hf
    gptfast.hf.patch(model)                    # a transformers GPT-2 / Llama / BLOOM / Gemma-2
    gpt = gptfast.hf.load_gpt2("path/to/gpt2") # gptfast's GPT from a local HF GPT-2 folder
    gptfast.hf.save_gpt2(gpt, "out/")          # a folder transformers loads
    tok = gptfast.hf.load_tokenizer("path/to/gpt2")

Needs the `hf` extra (`pip install 'gptfast[hf]'`: transformers, safetensors, tokenizers);
nothing here imports transformers before it is used, and nothing downloads anything.
"""
from .patch import ARCHITECTURES, PatchReport, is_patched, patch, register, unpatch

__all__ = ["patch", "unpatch", "is_patched", "register", "PatchReport", "ARCHITECTURES"]
