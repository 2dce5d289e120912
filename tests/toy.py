"""Tiny models shared by the core tests (random init, a few thousand parameters)."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

VOCAB = 50


def tiny_bert(layers: int = 4, seed: int | None = 0, hidden: int = 32, *, num_labels: int = 2, vocab: int = VOCAB,
              positions: int = 32, dropout: float = 0.0, attention_dropout: float | None = None,
              initializer_range: float = 0.02, train: bool = False) -> BertForSequenceClassification:
    """The tests' one toy encoder: a random BERT classifier, ``layers`` x ``hidden`` wide, 2 heads, FFN 64.
    ``seed`` None leaves the global RNG as it is; ``attention_dropout`` defaults to ``dropout``; in eval
    mode unless ``train``."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     vocab_size=vocab, max_position_embeddings=positions, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout if attention_dropout is None else attention_dropout,
                     num_labels=num_labels, initializer_range=initializer_range)
    model = BertForSequenceClassification(cfg)
    return model.train() if train else model.eval()


def tiny_gpt2(head: str = "lm", seed: int = 0) -> torch.nn.Module:
    """A random 3-layer GPT-2 (Conv1D projections): ``head`` 'lm' (GPT2LMHeadModel) or 'cls' (2 labels)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2, pad_token_id=0)
    return (GPT2LMHeadModel(cfg) if head == "lm" else GPT2ForSequenceClassification(cfg)).eval()


def toy_batch(n: int = 8, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Label = whether the first token is 1 or 2 (it is one of 1..4): learnable through q/v + head."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    ids[:, 0] = torch.randint(1, 5, (n,), generator=g)
    return {"input_ids": ids, "labels": (ids[:, 0] <= 2).long()}


def randomize_lora(model: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Give B (zero at init) and the coordinator gains non-zero values so tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "gains" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------- tiny random families (issue 21)
def tiny_family(family: str, seed: int = 0) -> torch.nn.Module:
    """A random 3-layer (T5: 2 + 2) model of ``family`` ('llama', 'qwen2', 't5', 'vit'), no dropout."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config,
                              T5ForConditionalGeneration, ViTConfig, ViTForImageClassification)

    torch.manual_seed(seed)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "t5":
        cfg = T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
                       vocab_size=64, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
        return T5ForConditionalGeneration(cfg).eval()
    if family == "vit":
        cfg = ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                        image_size=8, patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
        return ViTForImageClassification(cfg).eval()
    raise ValueError(family)


FAMILY_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "t5": ["q", "v"],
                  "vit": ["q_proj", "v_proj"]}
FAMILY_TASKS = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "vit": None}


def family_batch(family: str, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A labelled batch for `tiny_family`: token ids (causal LM: labels = ids; T5: 4 target tokens) or 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}
    ids = torch.randint(1, 64, (n, 6), generator=g)
    if family == "t5":
        return {"input_ids": ids, "labels": torch.randint(1, 64, (n, 4), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}
