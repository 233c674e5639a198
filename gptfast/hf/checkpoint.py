"""Hugging Face GPT-2 and BLOOM checkpoints <-> gptfast's GPT (gptfast/model.py).

    gpt = load_gpt2("gpt2-folder")      # config.json + model.safetensors / pytorch_model.bin
    save_gpt2(gpt, "out")               # a folder GPT2LMHeadModel.from_pretrained reads
    bloom = load_bloom("bloom-folder")  # BLOOM's layout into a BLOOM-style gptfast model
    save_bloom(bloom, "out-bloom")
    model = load_model("folder")        # whichever of the two config.json names

Layouts (HF name -> gptfast name, per layer i):
  GPT-2  wte, wpe, h.i.ln_1, h.i.attn.c_attn, h.i.attn.c_proj, h.i.ln_2, h.i.mlp.c_fc,
         h.i.mlp.c_proj, ln_f: the same names; HF's Conv1D stores weights (in, out), so every
         Conv1D weight is transposed to nn.Linear's (out, in).
  BLOOM  word_embeddings -> wte, word_embeddings_layernorm -> ln_emb, h.i.input_layernorm ->
         ln_1, h.i.self_attention.query_key_value -> attn.c_attn, h.i.self_attention.dense ->
         attn.c_proj, h.i.post_attention_layernorm -> ln_2, h.i.mlp.dense_h_to_4h -> mlp.c_fc,
         h.i.mlp.dense_4h_to_h -> mlp.c_proj, ln_f. No position embedding (ALiBi). BLOOM's fused
         projection interleaves heads, [q_0 k_0 v_0 q_1 k_1 v_1 ...] (d rows each); gptfast's is
         [q_0 .. q_{H-1} k_0 .. v_{H-1}]: the rows are permuted.
Keys may carry the "transformer." prefix (saved from *ForCausalLM) or not (original uploads).
A tied output embedding is not stored (HF ties it on load); an untied one is `lm_head.weight`.

Reading validates everything before building the model: a missing file, a config gptfast cannot
represent, a missing, extra or mis-shaped tensor each raise an error naming the file and what was
expected, and no model is returned half-loaded. Writing is atomic per file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ..checkpoint import atomic_write
from ..model import GPT, GPTConfig, alibi_slopes

PathLike = Union[str, os.PathLike]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all tanh-approximate GELU


class CheckpointFormatError(ValueError):
    """A Hugging Face folder gptfast cannot read: the message names the file and what was
    expected."""


# ---- reading a folder ----------------------------------------------------------------------------

def read_config(path: PathLike) -> Tuple[Path, dict]:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected a Hugging Face model folder "
                                f"with config.json and model.safetensors or pytorch_model.bin)")
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (a Hugging Face model folder has config.json "
                                f"and model.safetensors or pytorch_model.bin)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{file}: expected a JSON object")
    return file, config


def _load_file(file: Path) -> Dict[str, Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not that format
        raise CheckpointFormatError(f"{file}: unreadable ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if not (isinstance(tensors, dict) and all(isinstance(t, Tensor) for t in tensors.values())):
        raise CheckpointFormatError(f"{file}: expected a dict of tensors (a state_dict)")
    return tensors


def read_weights(folder: Path) -> Tuple[str, Dict[str, Tensor]]:
    """(name of the weights file, its tensors); sharded checkpoints through their index."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return name, _load_file(file)
        try:
            weight_map = json.loads(file.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{file}: expected a JSON index with a 'weight_map'") from e
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard}: not found (listed in {file})")
            tensors.update(_load_file(folder / shard))
        return name, tensors
    raise FileNotFoundError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


# ---- name tables ---------------------------------------------------------------------------------

# A row: (gptfast name, HF name, kind). kind says how the tensor changes on the way in:
# "same"; "t" (transpose: HF Conv1D); "qkv" (BLOOM's head-interleaved fused projection).
Row = Tuple[str, str, str]


def _gpt2_rows(config: GPTConfig) -> Iterator[Row]:
    yield "wte.weight", "wte.weight", "same"
    yield "wpe.weight", "wpe.weight", "same"
    for i in range(config.n_layer):
        for g, h, kind in [("ln_1", "ln_1", "same"), ("attn.c_attn", "attn.c_attn", "t"),
                           ("attn.c_proj", "attn.c_proj", "t"), ("ln_2", "ln_2", "same"),
                           ("mlp.c_fc", "mlp.c_fc", "t"), ("mlp.c_proj", "mlp.c_proj", "t")]:
            yield f"h.{i}.{g}.weight", f"h.{i}.{h}.weight", kind
            yield f"h.{i}.{g}.bias", f"h.{i}.{h}.bias", "same"
    yield "ln_f.weight", "ln_f.weight", "same"
    yield "ln_f.bias", "ln_f.bias", "same"


def _bloom_rows(config: GPTConfig) -> Iterator[Row]:
    yield "wte.weight", "word_embeddings.weight", "same"
    yield "ln_emb.weight", "word_embeddings_layernorm.weight", "same"
    yield "ln_emb.bias", "word_embeddings_layernorm.bias", "same"
    for i in range(config.n_layer):
        for g, h, kind in [("ln_1", "input_layernorm", "same"),
                           ("attn.c_attn", "self_attention.query_key_value", "qkv"),
                           ("attn.c_proj", "self_attention.dense", "same"),
                           ("ln_2", "post_attention_layernorm", "same"),
                           ("mlp.c_fc", "mlp.dense_h_to_4h", "same"),
                           ("mlp.c_proj", "mlp.dense_4h_to_h", "same")]:
            yield f"h.{i}.{g}.weight", f"h.{i}.{h}.weight", kind
            yield f"h.{i}.{g}.bias", f"h.{i}.{h}.bias", kind
    yield "ln_f.weight", "ln_f.weight", "same"
    yield "ln_f.bias", "ln_f.bias", "same"


def _rows(config: GPTConfig, layout: str) -> Iterator[Row]:
    yield from (_gpt2_rows if layout == "gpt2" else _bloom_rows)(config)
    if not config.tie_embeddings:
        yield "lm_head.weight", "lm_head.weight", "same"


def _qkv_in(t: Tensor, n_head: int) -> Tensor:
    """BLOOM (H, 3, d, ...) row order -> gptfast (3, H, d, ...)."""
    rest = t.shape[1:]
    return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_out(t: Tensor, n_head: int) -> Tensor:
    rest = t.shape[1:]
    return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _expected_shapes(config: GPTConfig) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(config).state_dict().items()}


def convert_from_hf(tensors: Dict[str, Tensor], config: GPTConfig, layout: str,
                    where: str = "the checkpoint") -> Dict[str, Tensor]:
    """A HF GPT-2 / BLOOM state_dict -> gptfast's GPT state_dict, validated: every tensor
    present with its expected shape, none left over. Works on meta tensors (shapes only)."""
    prefix = "transformer."
    names = {k[len(prefix):] if k.startswith(prefix) else k: k for k in tensors}
    expected = _expected_shapes(config)
    out = {}
    for g, h, kind in _rows(config, layout):
        if h not in names:
            raise CheckpointFormatError(f"{where}: missing tensor {h!r} (expected shape "
                                        f"{_hf_shape(expected[g], kind)} for {layout})")
        t = tensors[names.pop(h)]
        if tuple(t.shape) != _hf_shape(expected[g], kind):
            raise CheckpointFormatError(f"{where}: tensor {h!r} has shape {tuple(t.shape)}, "
                                        f"expected {_hf_shape(expected[g], kind)} from config.json")
        if kind == "t":
            t = t.t()
        elif kind == "qkv":
            t = _qkv_in(t, config.n_head)
        out[g] = t.contiguous()
    if config.tie_embeddings:
        names.pop("lm_head.weight", None)  # some uploads store the tied copy too
    if layout == "gpt2":  # the causal-mask buffers older GPT-2 checkpoints saved
        for k in [k for k in names if k.endswith((".attn.bias", ".attn.masked_bias"))]:
            names.pop(k)
    if names:
        extra = sorted(names)
        raise CheckpointFormatError(f"{where}: unexpected tensors {extra[:5]}"
                                    f"{' ...' if len(extra) > 5 else ''} (not part of a "
                                    f"{layout} model with this config.json)")
    return out


def _hf_shape(shape: torch.Size, kind: str) -> tuple:
    return tuple(reversed(shape)) if kind == "t" else tuple(shape)


def convert_to_hf(model: GPT, layout: str) -> Dict[str, Tensor]:
    """gptfast's GPT -> HF state_dict (keys with the *ForCausalLM "transformer." prefix)."""
    state = model.state_dict()
    out = {}
    for g, h, kind in _rows(model.config, layout):
        t = state[g].detach()
        if kind == "t":
            t = t.t()
        elif kind == "qkv":
            t = _qkv_out(t, model.config.n_head)
        key = h if h == "lm_head.weight" else "transformer." + h
        out[key] = t.to("cpu").contiguous().clone()  # own storage: safetensors refuses sharing
    return out


# ---- configs -------------------------------------------------------------------------------------

def _need(config: dict, where: Path, key: str, *alts: str):
    for k in (key, *alts):
        if config.get(k) is not None:
            return config[k]
    raise CheckpointFormatError(f"{where}: missing {key!r}")


def _check_model_type(config: dict, where: Path, want: str) -> None:
    got = config.get("model_type")
    if got != want:
        raise CheckpointFormatError(
            f"{where}: model_type {got!r}, expected {want!r} (gptfast reads 'gpt2' with "
            f"load_gpt2 and 'bloom' with load_bloom)")


def _refuse(where: Path, what: str) -> None:
    raise CheckpointFormatError(f"{where}: {what}, which gptfast's GPT does not have")


def gpt2_config(config: dict, where: Path, **overrides) -> GPTConfig:
    """A HF GPT2Config (as a dict) -> GPTConfig. GPT-2 keeps one dropout for embeddings and
    residuals: resid_pdrop."""
    _check_model_type(config, where, "gpt2")
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        _refuse(where, f"activation_function {act!r} (gptfast uses the tanh GELU: "
                       f"{', '.join(GPT2_ACTIVATIONS)})")
    if not config.get("scale_attn_weights", True):
        _refuse(where, "scale_attn_weights=false")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        _refuse(where, "scale_attn_by_inverse_layer_idx=true")
    if config.get("add_cross_attention", False):
        _refuse(where, "cross-attention layers (add_cross_attention=true)")
    fields = dict(
        block_size=_need(config, where, "n_positions"),
        vocab_size=_need(config, where, "vocab_size"),
        n_layer=_need(config, where, "n_layer"), n_head=_need(config, where, "n_head"),
        n_embd=_need(config, where, "n_embd"), n_inner=config.get("n_inner"),
        dropout=config.get("resid_pdrop", 0.1), attn_dropout=config.get("attn_pdrop", 0.1),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", True))
    return _make_config(where, fields, overrides)


def bloom_config(config: dict, where: Path, **overrides) -> GPTConfig:
    """A HF BloomConfig (as a dict) -> a BLOOM-style GPTConfig (ALiBi, embedding LayerNorm).
    block_size: the config's seq_length when it has one, else 2048 (BLOOM's training length;
    ALiBi has no maximum, pass block_size= for longer)."""
    _check_model_type(config, where, "bloom")
    if config.get("apply_residual_connection_post_layernorm", False):
        _refuse(where, "apply_residual_connection_post_layernorm=true")
    if config.get("slow_but_exact", False) and config.get("pretraining_tp", 1) > 1:
        _refuse(where, "slow_but_exact=true (tensor-parallel rounding emulation)")
    fields = dict(
        block_size=config.get("seq_length") or 2048,
        vocab_size=_need(config, where, "vocab_size"),
        n_layer=_need(config, where, "n_layer", "num_hidden_layers"),
        n_head=_need(config, where, "n_head", "num_attention_heads"),
        n_embd=_need(config, where, "hidden_size", "n_embed"),
        dropout=config.get("hidden_dropout", 0.0), attn_dropout=config.get("attention_dropout", 0.0),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", True),
        position="alibi", embedding_ln=True)
    return _make_config(where, fields, overrides)


def _make_config(where: Path, fields: dict, overrides: dict) -> GPTConfig:
    try:
        return GPTConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: {e}") from e


def _check_saveable(model: GPT, layout: str) -> None:
    c = model.config
    want = (dict(position="learned", embedding_ln=False) if layout == "gpt2"
            else dict(position="alibi", embedding_ln=True, n_inner=4 * c.n_embd))
    want.update(ln_position="pre", final_ln=True, bias=True, n_kv_head=c.n_head)
    bad = {k: getattr(c, k) for k, v in want.items() if getattr(c, k) != v}
    if bad:
        other = "save_bloom" if layout == "gpt2" else "save_gpt2"
        raise ValueError(f"save_{layout}: this GPT cannot be written as {layout} "
                         f"({', '.join(f'{k}={v!r}' for k, v in bad.items())}; {layout} needs "
                         f"{', '.join(f'{k}={want[k]!r}' for k in bad)}); see {other}")


def _hf_config(model: GPT, layout: str, bos_token_id, eos_token_id) -> dict:
    c = model.config
    common = dict(vocab_size=c.vocab_size, layer_norm_epsilon=c.layer_norm_eps,
                  tie_word_embeddings=c.tie_embeddings, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, use_cache=True, initializer_range=0.02)
    if layout == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size,
                    n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
                    activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                    attn_pdrop=c.attn_dropout, scale_attn_weights=True, **common)
    return dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=c.n_embd,
                n_layer=c.n_layer, n_head=c.n_head, seq_length=c.block_size,
                hidden_dropout=c.dropout, attention_dropout=c.attn_dropout,
                apply_residual_connection_post_layernorm=False, pretraining_tp=1,
                slow_but_exact=False, **common)


# ---- public API ----------------------------------------------------------------------------------

def _load(path: PathLike, layout: str, make_config: Callable, dtype, device, overrides) -> GPT:
    where, hf_config = read_config(path)
    config = make_config(hf_config, where, **overrides)
    name, tensors = read_weights(where.parent)
    state = convert_from_hf(tensors, config, layout, where=str(where.parent / name))
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = GPT(config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for block in model.h:  # the one non-persistent buffer
        if block.attn.alibi_slopes is not None:
            block.attn.alibi_slopes = alibi_slopes(config.n_head)
    return model.to(device).eval()


def load_gpt2(path: PathLike, *, dtype: Optional[torch.dtype] = torch.float32,
              device: Union[str, torch.device] = "cpu", **overrides) -> GPT:
    """gptfast's GPT from a local Hugging Face GPT-2 folder (config.json + model.safetensors,
    sharded safetensors, or pytorch_model.bin). dtype: of the parameters (None: as stored).
    overrides: GPTConfig fields (e.g. backend="torch", dropout=0.0). Returns it in eval mode."""
    return _load(path, "gpt2", gpt2_config, dtype, device, overrides)


def load_bloom(path: PathLike, *, dtype: Optional[torch.dtype] = torch.float32,
               device: Union[str, torch.device] = "cpu", **overrides) -> GPT:
    """A BLOOM-style gptfast GPT (ALiBi, embedding LayerNorm, no position embedding) from a local
    Hugging Face BLOOM folder. Arguments as load_gpt2."""
    return _load(path, "bloom", bloom_config, dtype, device, overrides)


def load_model(path: PathLike, **kwargs) -> GPT:
    """load_gpt2 or load_bloom, as the folder's config.json says."""
    where, config = read_config(path)
    loaders = {"gpt2": load_gpt2, "bloom": load_bloom}
    if config.get("model_type") not in loaders:
        raise CheckpointFormatError(f"{where}: model_type {config.get('model_type')!r} is not "
                                    f"one gptfast reads (expected one of {sorted(loaders)})")
    return loaders[config["model_type"]](path, **kwargs)


def _save(model: GPT, path: PathLike, layout: str, bos_token_id, eos_token_id) -> Path:
    from safetensors.torch import save
    if not isinstance(model, GPT):
        raise TypeError(f"save_{layout}: expected a gptfast.model.GPT, got {type(model).__name__}")
    _check_saveable(model, layout)
    tensors = convert_to_hf(model, layout)
    config = _hf_config(model, layout, bos_token_id, eos_token_id)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # weights first: a crash in between leaves the old config.json, which the old weights match
    # or (fresh folder) no config.json, which loads as "not found", never as a mismatch
    atomic_write(folder / "model.safetensors",
                 lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(folder / "config.json",
                 lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return folder


def save_gpt2(model: GPT, path: PathLike, *, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
    GPT2LMHeadModel.from_pretrained loads. The model must have GPT-2's shape (learned positions,
    pre-LayerNorm, final LayerNorm, biases, one key/value head per query head)."""
    return _save(model, path, "gpt2", bos_token_id, eos_token_id)


def save_bloom(model: GPT, path: PathLike, *, bos_token_id: Optional[int] = None,
               eos_token_id: Optional[int] = None) -> Path:
    """Write a BLOOM-style gptfast GPT as a Hugging Face BLOOM folder (BloomForCausalLM)."""
    return _save(model, path, "bloom", bos_token_id, eos_token_id)


__all__ = ["load_gpt2", "save_gpt2", "load_bloom", "save_bloom", "load_model",
           "convert_from_hf", "convert_to_hf", "gpt2_config", "bloom_config",
           "CheckpointFormatError"]
