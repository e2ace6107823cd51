"""Language models: the :class:`CausalLM` adapter, incremental decoding, toy LMs."""

from pyro_lm.lm.causal_lm import CausalLM, eval_mode
from pyro_lm.lm.decoding import IncrementalDecoder, sample_tokens
from pyro_lm.lm.export import merged_model, save_pretrained
from pyro_lm.lm.toy import toy_lm, toy_tokenizer

__all__ = ["CausalLM", "IncrementalDecoder", "sample_tokens", "eval_mode", "merged_model",
           "save_pretrained", "toy_lm", "toy_tokenizer"]
