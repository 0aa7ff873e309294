"""Tiny randomly initialised Hugging Face models of every family ofe supports (audit, monitor tests)."""

import torch
import transformers as tf

FAMILIES = ("gpt2", "opt", "gpt_neox", "llama", "mistral", "qwen2", "bert", "roberta")
# Families whose last hidden_states entry is the last block's output (no final norm in the base model).
NO_FINAL_NORM = frozenset({"bert", "roberta"})

SMALL = dict(vocab_size=300, max_position_embeddings=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)


def build(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=3, n_head=4))
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(**SMALL, ffn_dim=64, word_embed_proj_dim=32))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL, intermediate_size=64))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2, intermediate_size=64))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_key_value_heads=2, intermediate_size=64))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2, intermediate_size=64))
    if family == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(**{**SMALL, "max_position_embeddings": 66}, intermediate_size=64))
    return tf.BertModel(tf.BertConfig(**SMALL, intermediate_size=64))


