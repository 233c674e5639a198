"""gptfast.hf checkpoints and tokenizers: GPT-2 and BLOOM folders in and out, their tokenizers.

The folders are built here: a small random transformers model saved with save_pretrained (or in
the original uploads' layout) and a byte-level BPE tokenizer trained with the `tokenizers`
package on local text. Nothing is downloaded.
"""
import inspect
import json
import shutil

import pytest
import torch
import transformers

import gptfast
import gptfast.hf
from gptfast.hf import CheckpointFormatError, load_bloom, load_gpt2, load_model, load_tokenizer
from gptfast.hf.checkpoint import bloom_config, convert_from_hf
from gptfast.model import GPT, count_params, get_config

from _hf_models import VOCAB, batch, build, oracle
from _tolerance import assert_rule

pytestmark = pytest.mark.hf

TEXT = "Ünïcödé  ✓ 日本語 🙂\n\n\tdef  f(x):\n        return   x  *  2\r\n   trailing   \n"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits_rule(name, gpt, hf, ids, mask=None):
    """gptfast's logits vs the HF model's, both against the HF model in float64."""
    ref = oracle(hf)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        got = gpt.logits(ids, key_padding_mask=None if mask is None else mask.bool())
        assert_rule(name, got[real], ref(ids, attention_mask=mask).logits[real],
                    hf(ids, attention_mask=mask).logits[real], 2, 1e-7)


# ---- GPT-2 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_load_gpt2_logits_equal_hf(tmp_path, tied):
    hf = build("gpt2", tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    gpt = load_gpt2(tmp_path, backend="torch")
    assert gpt.config.tie_embeddings == tied and not gpt.training
    ids, mask, _ = batch()
    _logits_rule("gpt2", gpt, hf, ids)
    _logits_rule("gpt2 padded", gpt, hf, ids, mask)


def test_load_gpt2_original_layout(tmp_path):
    """GPT-2's original upload: pytorch_model.bin, names without "transformer.", the attention
    mask buffers saved, the tied lm_head stored too."""
    hf = build("gpt2")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    _logits_rule("gpt2 .bin", load_gpt2(tmp_path, backend="torch"), hf, batch()[0])


@pytest.mark.parametrize("tied", [True, False])
def test_save_gpt2_loads_in_transformers(tmp_path, tied):
    torch.manual_seed(0)
    gpt = GPT(get_config("tiny", vocab_size=VOCAB, n_embd=64, n_head=2, block_size=64,
                         tie_embeddings=tied, backend="torch")).eval()
    gptfast.hf.save_gpt2(gpt, tmp_path, bos_token_id=1, eos_token_id=2)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)
    assert hf.config.tie_word_embeddings == tied
    _logits_rule("save_gpt2", gpt, hf, batch()[0])
    again = load_gpt2(tmp_path)  # and back, bit for bit
    for (k, a), (_, b) in zip(gpt.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_save_refuses_shapes_of_another_layout(tmp_path):
    with pytest.raises(ValueError, match=r"ln_position='post'.*needs ln_position='pre'"):
        gptfast.hf.save_gpt2(GPT(get_config("tiny", ln_position="post")), tmp_path)
    with pytest.raises(ValueError, match=r"position='learned'.*save_gpt2"):
        gptfast.hf.save_bloom(GPT(get_config("tiny")), tmp_path)
    with pytest.raises(ValueError, match="n_kv_head=2"):
        gptfast.hf.save_gpt2(GPT(get_config("tiny", n_kv_head=2)), tmp_path)
    assert not any(tmp_path.iterdir())


# ---- BLOOM ---------------------------------------------------------------------------------------

def test_load_bloom_logits_equal_hf(tmp_path):
    """3 heads (ALiBi's interleaved slopes), left and right padding."""
    hf = build("bloom")
    hf.save_pretrained(tmp_path)
    gpt = load_bloom(tmp_path, backend="torch")
    c = gpt.config
    assert (c.position, c.embedding_ln, gpt.wpe) == ("alibi", True, None)
    ids, mask, _ = batch()
    _logits_rule("bloom", gpt, hf, ids)
    _logits_rule("bloom padded", gpt, hf, ids, mask)


def test_bloom_triton_alibi_on_loaded_weights(tmp_path):
    """The loaded BLOOM on the interpreted Triton kernels (ALiBi + padding in the kernel)."""
    hf = build("bloom")
    hf.save_pretrained(tmp_path)
    gpt = load_bloom(tmp_path, backend="triton")
    ids, mask, _ = batch()
    _logits_rule("bloom triton", gpt, hf, ids, mask)


def test_save_bloom_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(get_config("tiny", vocab_size=VOCAB, n_embd=96, n_head=3, position="alibi",
                         embedding_ln=True, backend="torch")).eval()
    with torch.no_grad():  # LayerNorms away from their (1, 0) init
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gptfast.hf.save_bloom(gpt, tmp_path)
    hf = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, _ = batch()
    _logits_rule("save_bloom", gpt, hf, ids, mask)
    assert load_model(tmp_path).config.position == "alibi"


def test_bloom_560m_shapes_on_meta():
    """bloom-560m's real shapes: HF's model built on the meta device from its config, its
    state_dict converted into the bloom-560m preset, and a forward through ALiBi on meta."""
    cfg = transformers.BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)
    with torch.device("meta"):
        hf = transformers.BloomForCausalLM(cfg)
    ours = bloom_config(cfg.to_dict(), "config.json", backend="torch")
    preset = get_config("bloom-560m", backend="torch")
    assert ours == preset
    state = convert_from_hf(hf.state_dict(), preset, "bloom")
    with torch.device("meta"):
        gpt = GPT(preset)
    gpt.load_state_dict(state, strict=True, assign=True)
    assert gpt.num_params() == count_params("bloom-560m") == 559_214_592  # bloom-560m's count
    assert gpt.h[0].attn.alibi_slopes.shape == (16,)
    logits = gpt.logits(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 8, 250880)


# ---- bad folders ---------------------------------------------------------------------------------

def _folder(tmp_path, arch="gpt2"):
    hf = build(arch)
    hf.save_pretrained(tmp_path)
    return hf


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_gpt2(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config.json: not found"):
        load_gpt2(tmp_path)
    _folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights \(expected one of model.safetensors"):
        load_gpt2(tmp_path)


def test_mismatched_and_foreign_checkpoints(tmp_path):
    _folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def write_config(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))

    write_config(n_embd=96, n_head=3)  # config and weights disagree
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: tensor 'wte.weight' has "
                                                    r"shape \(128, 64\), expected \(128, 96\)"):
        load_gpt2(tmp_path)
    write_config(n_layer=3)
    with pytest.raises(CheckpointFormatError, match=r"missing tensor 'h.2.ln_1.weight'"):
        load_gpt2(tmp_path)
    write_config(n_layer=1)
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors \['h.1."):
        load_gpt2(tmp_path)
    write_config(model_type="llama")
    with pytest.raises(CheckpointFormatError, match=r"config.json: model_type 'llama', expected "
                                                    r"'gpt2'"):
        load_gpt2(tmp_path)
    with pytest.raises(CheckpointFormatError, match=r"model_type 'llama' is not one gptfast "
                                                    r"reads \(expected one of \['bloom', 'gpt2'\]"):
        load_model(tmp_path)
    write_config(activation_function="relu")
    with pytest.raises(CheckpointFormatError, match="activation_function 'relu'"):
        load_gpt2(tmp_path)
    write_config()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: unreadable"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match=r"config.json: not valid JSON"):
        load_gpt2(tmp_path)


def test_bloom_folder_is_not_gpt2(tmp_path):
    _folder(tmp_path, "bloom")
    with pytest.raises(CheckpointFormatError, match="model_type 'bloom', expected 'gpt2'"):
        load_gpt2(tmp_path)


# ---- tokenizers ----------------------------------------------------------------------------------

def _train_tokenizer():
    """A byte-level BPE (GPT-2's kind) trained here on the standard library's json sources."""
    import json as json_module

    from tokenizers import ByteLevelBPETokenizer
    corpus = [inspect.getsource(m) for m in (json_module.decoder, json_module.encoder)]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus + [TEXT], vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A GPT-2 folder as HF writes it: model, tokenizer.json, vocab.json + merges.txt and
    tokenizer_config.json (through transformers' own tokenizer class)."""
    folder = tmp_path_factory.mktemp("gpt2_with_tokenizer")
    tok = _train_tokenizer()
    tok.save_model(str(folder))                                  # vocab.json + merges.txt
    hf_tok = transformers.GPT2Tokenizer(vocab=str(folder / "vocab.json"),
                                        merges=str(folder / "merges.txt"))
    hf_tok.save_pretrained(folder)                               # tokenizer.json + config
    eot = tok.token_to_id("<|endoftext|>")
    model = build("gpt2", vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_tokenizer_reads_like_the_models_own(hf_folder, tmp_path, files):
    folder = hf_folder
    if files != "tokenizer.json":  # only GPT-2's original two files
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(hf_folder / name, tmp_path / name)
        folder = tmp_path
    tok = load_tokenizer(folder)
    own = transformers.AutoTokenizer.from_pretrained(hf_folder)
    ids = tok.encode(TEXT)
    assert ids == own.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT == own.decode(ids)
    assert tok.vocab_size == len(own)
    eot = own.convert_tokens_to_ids("<|endoftext|>")
    if files == "tokenizer.json":  # special tokens from tokenizer_config.json
        assert (tok.bos_id, tok.eos_id) == (eot, eot)
        assert tok.encode("a", bos=True, eos=True) == [eot] + own.encode("a") + [eot]
    else:  # the two files name no special token
        assert tok.bos_id is None
        with pytest.raises(ValueError, match="has no bos token"):
            tok.encode("a", bos=True)


def test_tokenizer_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer \(expected tokenizer.json, or "
                                                r"vocab.json \+ merges.txt\)"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)


def test_loaded_model_and_tokenizer_generate(hf_folder):
    """load_model + load_tokenizer: the folder's model continues a prompt with the same greedy
    tokens as transformers' generate."""
    from gptfast.generate import generate
    gpt, tok = load_model(hf_folder, backend="torch"), load_tokenizer(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    prompt = torch.tensor([tok.encode("def f(x):")])
    want = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id)
    got = generate(gpt, prompt, max_new_tokens=6, greedy=True)
    assert got.tolist() == want.tolist()


def test_corpus_with_the_folders_tokenizer(hf_folder, tmp_path):
    """gptfast.data.load_corpus with an HF tokenizer: each document is its ids then
    <|endoftext|> (GPT-2's separator; no BOS, as bos == eos), and decodes back to the text."""
    from gptfast.data import load_corpus
    docs = {"a.txt": TEXT, "b.txt": "second   document ✓\n", "c.txt": "third\n"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    tok = load_tokenizer(hf_folder)
    corpus = load_corpus(tmp_path, tokenizer=tok, val_fraction=0.3)
    stream = torch.cat([corpus.train, corpus.val]).tolist()
    assert corpus.train.dtype == torch.int16 and stream.count(tok.eos_id) == 3
    texts = set(tok.decode(stream).split("<|endoftext|>")[:-1])
    assert texts == set(docs.values())
    big = load_tokenizer(hf_folder)
    big.tokenizer.add_tokens([f"<extra_{i}>" for i in range(40000)])  # > 32768 ids: int32
    assert load_corpus(tmp_path, tokenizer=big).train.dtype == torch.int32


# ---- the command line ----------------------------------------------------------------------------

def _run(argv):
    from gptfast import cli
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_cli_generate_hf_reads_like_the_models_own(hf_folder, capsys):
    """`gptfast generate --hf FOLDER`: the folder's model and tokenizer; greedy output is the
    prompt followed by what transformers generates, decoded by transformers' tokenizer."""
    prompt = "def  f(x):\n    return ✓"
    assert _run(["generate", "--hf", str(hf_folder), "--prompt", prompt, "--greedy",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    own = transformers.AutoTokenizer.from_pretrained(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = own(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=own.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if own.eos_token_id in new:
        new = new[: new.index(own.eos_token_id)]
    assert printed == prompt + own.decode(new) + "\n"


def test_cli_generate_hf_bad_folders(hf_folder, tmp_path, capsys):
    assert _run(["generate", "--hf", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hf" in err and "no tokenizer" in err
    shutil.copy(hf_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    assert _run(["generate", "--hf", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--hf" in err and "config.json: not found" in err
    assert _run(["generate", "--hf", str(hf_folder), "--ckpt", "x", "--prompt", "x"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_cli_train_with_the_folders_tokenizer(hf_folder, tmp_path, capsys):
    """`gptfast train --tokenizer FOLDER`: the data tokenized by it, the model sized to its
    vocabulary, the checkpoint carrying it (generate and gptfast.load use it)."""
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT * 200, encoding="utf-8")
    out = tmp_path / "run"
    assert _run(["train", "--preset", "tiny", "--tokenizer", str(hf_folder), "--data", str(data),
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--block-size", "32",
                 "--eval-batches", "1", "--no-plot", "--no-progress", "--device", "cpu",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(hf_folder)
    assert f"tokenizer: {hf_folder / 'tokenizer.json'} ({tok.vocab_size} ids)" in printed
    model, loaded = gptfast.load(out)
    assert model.config.vocab_size == tok.vocab_size and loaded.kind == "hf"
    assert loaded.encode(TEXT) == tok.encode(TEXT) and loaded.eos_id == tok.eos_id
    assert _run(["generate", "--ckpt", str(out), "--prompt", "def", "--greedy",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert _run(["train", "--tokenizer", str(tmp_path / "none"), "--steps", "1"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(6)))
    assert _run(["finetune", "--ckpt", str(out), "--data", str(csv), "--out",
                 str(tmp_path / "cls")]) == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and "Hugging Face tokenizer" in err


def test_byte_tokenizer_on_a_bpe_sized_preset_says_so(tmp_path, capsys):
    from gptfast.train import TrainConfig, train
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT * 50, encoding="utf-8")
    train(TrainConfig(preset="tiny", model_overrides=dict(vocab_size=1000), data=str(data),
                      out_dir=str(tmp_path / "run"), steps=1, batch_size=2, block_size=16,
                      eval_batches=1, plot=False, progress=False, device="cpu"))
    printed = capsys.readouterr().out
    assert ("tokenizer: byte-level (259 ids), not the BPE tokenizer preset tiny's 1000-token "
            "vocabulary was made for") in printed
