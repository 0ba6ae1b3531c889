"""Shared fixtures: tiny random models of every supported family, an offline tokenizer, a corpus.

Everything here is built in memory from a fixed seed, so the suite needs no network and no real
checkpoint, and each model runs a forward pass in milliseconds on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(1)

FAMILIES = ("llama", "gpt2", "gptj", "gpt_neox", "gemma3_text")

N_LAYERS = 4
HIDDEN = 32
HEADS = 4
INTER = 64

# Small fixed text: tokenizer training data and (separately) the covariance corpus.
TRAIN_TEXT = """\
The mother tongue of Danielle Darrieux is French.
The official religion of Edwin of Northumbria is Christianity.
Toko Yasuda, who plays the guitar, was born in Tokyo.
Autonomous University of Madrid, which is located in Spain.
The capital of France is Paris and the capital of Italy is Rome.
Danielle Darrieux spoke the language English. English is a language.
Edwin of Northumbria follows the religion of Islam. Islam is a religion.
Toko Yasuda plays the piano. The piano is an instrument.
Autonomous University of Madrid is located in Sweden. Sweden is a country.
The native language of Montesquieu is French. Therefore you can say it.
Because I said so, you know the answer is here. Some words here.
The city of Rome is in Italy, which is a country in Europe.
I think the guitar and the piano are instruments that people play.
You can learn a language, a religion, or an instrument.
"""

CORPUS_TEXT = """\
The capital of France is Paris, a city on the river.
Rome is the capital of Italy and a very old city.

Many people speak English, French, or Spanish as a mother tongue.
The piano and the guitar are played by many people in Tokyo.
Madrid is located in Spain. Sweden is a country in Europe.
Because the answer is here, I know you can say it.
Therefore some words here are about a religion like Islam or Christianity.
The native language of many people in Europe is not English.
"""


def _build_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TRAIN_TEXT.splitlines() * 3, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert tok.is_fast
    return tok


_TOKENIZERS: dict[bool, PreTrainedTokenizerFast] = {}


def tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    if add_bos not in _TOKENIZERS:
        _TOKENIZERS[add_bos] = _build_tokenizer(add_bos)
    return _TOKENIZERS[add_bos]


# Which tokenizer each family is tested with: Llama/Gemma-style (BOS prepended) or GPT-style (none),
# so that both "subject at position 0" and "BOS first" layouts are exercised.
FAMILY_BOS = {"llama": True, "gemma3_text": True, "gpt2": False, "gptj": False, "gpt_neox": False}


def make_config(family: str, vocab_size: int, **overrides):
    common = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTER,
                          num_hidden_layers=N_LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                          max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False, **common)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, n_inner=INTER,
                         n_positions=256, initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         **common)
    elif family == "gptj":
        cfg = GPTJConfig(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, n_inner=INTER,
                         rotary_dim=4, n_positions=256, initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, tie_word_embeddings=False, **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS,
                            num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=256,
                            initializer_range=0.1, use_parallel_residual=True, hidden_dropout=0.0,
                            attention_dropout=0.0, tie_word_embeddings=False, **common)
    elif family == "gemma3_text":
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTER,
                               num_hidden_layers=N_LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                               head_dim=8, query_pre_attn_scalar=8, sliding_window=512,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"],
                               max_position_embeddings=256, initializer_range=0.1, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny, randomly initialised, float32 eval-mode model of ``family`` (deterministic)."""
    tok = tokenizer(FAMILY_BOS[family])
    cfg = make_config(family, len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(autouse=True, scope="session")
def _fresh_evaluation_cache(tmp_path_factory):
    """Each test session starts with an empty evaluation cache and corpus index (and shares them with
    the commands it runs): tests exercise the model, not results an earlier run left in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDITLEDGER_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache") / "cache.sqlite3"))
    mp.setenv("EDITLEDGER_CORPUS_INDEX", str(tmp_path_factory.mktemp("corpus-index")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tok():
    """Llama-style tokenizer: prepends <s>."""
    return tokenizer(True)


@pytest.fixture(scope="session")
def tok_nobos():
    """GPT-style tokenizer: no special tokens added."""
    return tokenizer(False)


def tok_for(family: str):
    return tokenizer(FAMILY_BOS[family])


@pytest.fixture(scope="session")
def _model_cache():
    return {}


@pytest.fixture
def model_factory(_model_cache):
    """``model_factory(family)`` → (fresh copy of the tiny model, its tokenizer)."""

    def build(family: str, seed: int = 0):
        key = (family, seed)
        if key not in _model_cache:
            _model_cache[key] = make_model(family, seed)
        return copy.deepcopy(_model_cache[key]), tok_for(family)

    return build


@pytest.fixture(params=FAMILIES)
def family_model(request, model_factory):
    model, tk = model_factory(request.param)
    return request.param, model, tk


@pytest.fixture
def llama(model_factory):
    return model_factory("llama")


@pytest.fixture
def gpt2(model_factory):
    return model_factory("gpt2")


@pytest.fixture
def gptj(model_factory):
    return model_factory("gptj")


@pytest.fixture
def gpt_neox(model_factory):
    return model_factory("gpt_neox")


@pytest.fixture
def gemma3(model_factory):
    return model_factory("gemma3_text")


@pytest.fixture
def corpus_path(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT, encoding="utf-8")
    return p


def counterfact_record(case_id, subject, prompt, new, true, relation="P0"):
    return {
        "case_id": case_id,
        "pararel_idx": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "relation_id": relation,
            "target_new": {"str": new, "id": f"Qn{case_id}"},
            "target_true": {"str": true, "id": f"Qt{case_id}"},
            "subject": subject,
        },
        "paraphrase_prompts": [f"Some words here. {prompt.replace('{}', subject)}"],
        "neighborhood_prompts": [prompt.replace("{}", "Montesquieu")],
        "attribute_prompts": [],
        "generation_prompts": [f"{subject} is"],
    }


COUNTERFACT_RECORDS = [
    counterfact_record(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", "P103"),
    counterfact_record(1, "Edwin of Northumbria", "The official religion of {} is", "Islam", "Christianity", "P140"),
    counterfact_record(2, "Toko Yasuda", "{}, who plays", "the piano", "the guitar", "P1303"),  # 2-token target
    counterfact_record(3, "Autonomous University of Madrid", "{}, which is located in", "Sweden", "Spain", "P17"),
]


@pytest.fixture
def cf_records():
    return copy.deepcopy(COUNTERFACT_RECORDS)


@pytest.fixture
def cf_requests():
    from pipeline.requests import parse_requests

    return parse_requests(copy.deepcopy(COUNTERFACT_RECORDS))


def poison_losses(monkeypatch) -> None:
    """Make every value-optimisation loss NaN (its non-finite check must stop the batch)."""
    from pipeline.editing import optimise

    real = optimise.request_losses

    def nan_losses(*a, **k):
        terms = real(*a, **k)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(optimise, "request_losses", nan_losses)
