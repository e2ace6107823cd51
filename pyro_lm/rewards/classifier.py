"""Rewards from a transformers sequence classifier."""

from __future__ import annotations

import torch

from pyro_lm.distributions.prefix import is_complete
from pyro_lm.lm.causal_lm import eval_mode
from pyro_lm.rewards.base import Reward, decode_counted, special_ids

__all__ = ["Classifier"]


class Classifier(Reward):
    r"""The log-probability of a label under a sequence classifier:

    .. math:: r(x) = \log p_\phi(y = \text{label} \mid \mathrm{text}(x)).

    The completion is decoded with the LM's tokenizer and re-encoded with the
    classifier's, so the two models need not share a vocabulary.

    :param model: a transformers ``*ForSequenceClassification`` model.
    :param classifier_tokenizer: its tokenizer.
    :param label: an int class index or a label name from ``model.config.label2id``.
    :param lm_tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`),
        used to decode ``x``.
    :param str on_prefix: ``"evaluate"`` scores incomplete prefixes as text
        (a heuristic twist for SMC), ``"zero"`` gives them 0. With ``"zero"`` the reward
        has an incremental form (:mod:`pyro_lm.rewards.incremental`): a row is classified
        once, at the first prefix where it has ended, and keeps that value.
    :param int batch_size: sequences per classifier forward pass.
    :param str prefix_text: text prepended to each completion before
        classification (e.g. the prompt).
    :param str empty_text: what an empty completion (EOS first) is classified
        as; default the classifier tokenizer's BOS, EOS or pad token, so that it
        is never zero tokens long.
    """

    def __init__(self, model, classifier_tokenizer, label, lm_tokenizer,
                 on_prefix: str = "evaluate", batch_size: int = 64, max_length: int = 512,
                 prefix_text: str = "", empty_text: str | None = None,
                 name: str | None = None):
        super().__init__(name or f"Classifier({label!r})")
        if isinstance(label, str):
            label2id = getattr(model.config, "label2id", {}) or {}
            if label not in label2id:
                raise ValueError(f"label: {label!r} is not one of the classifier's labels "
                                 f"{sorted(label2id)}")
            label = label2id[label]
        num_labels = int(getattr(model.config, "num_labels", 0) or 0)
        if not isinstance(label, int) or not 0 <= label < max(num_labels, 1):
            raise ValueError(f"label: expected a class index in [0, {num_labels}), got {label!r}")
        if on_prefix not in ("evaluate", "zero"):
            raise ValueError(f"on_prefix: expected 'evaluate' or 'zero', got {on_prefix!r}")
        self.model = model
        self.classifier_tokenizer = classifier_tokenizer
        if classifier_tokenizer.pad_token is None:
            raise ValueError("classifier_tokenizer: needs a pad token to batch texts; set "
                             "classifier_tokenizer.pad_token (e.g. to its eos_token)")
        self.label = label
        self.lm_tokenizer, self.eos, _ = special_ids(lm_tokenizer, "lm_tokenizer")
        self.on_prefix = on_prefix
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefix_text = prefix_text
        if empty_text is None:
            tok = classifier_tokenizer
            empty_text = tok.bos_token or tok.eos_token or tok.pad_token
        self.empty_text = empty_text

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_prefix == "zero":  # classify the complete rows alone; prefixes score 0
            complete = is_complete(x, self.eos)
            if not bool(complete.all()):
                return self._classify_where(x, complete, torch.zeros(x.shape[0],
                                                                     device=x.device))
        return self._classify(x)

    # -- the incremental form (on_prefix="zero"): each ended row classified once ----------

    def initial_state(self, rows: int, device: torch.device) -> dict | None:
        if self.on_prefix != "zero":
            return None
        return {"value": torch.zeros(rows, device=device),
                "known": torch.zeros(rows, dtype=torch.bool, device=device)}

    def advance(self, state: dict, token: torch.Tensor, t: int) -> dict:
        return state  # an ended row's text no longer changes; the others score 0

    def state_value(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        complete = is_complete(x, self.eos)
        new = complete & ~state["known"]
        self._classify_where(x, new, state["value"])
        state["known"] |= new
        return torch.where(complete, state["value"], torch.zeros_like(state["value"]))

    def _classify_where(self, x: torch.Tensor, rows: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(N,)`` with the rows of ``x`` where ``rows`` (bool ``(N,)``) holds set to
        their classification, in place."""
        if bool(rows.any()):
            index = rows.nonzero().squeeze(-1)
            out[index] = self._classify(x.index_select(0, index))
        return out

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """The label's log-probability for each row of ``x`` ``(N, T)``, read as text."""
        texts = [self.prefix_text + t for t in decode_counted(self.lm_tokenizer, x, self.eos)]
        texts = [t if t.strip() else self.empty_text for t in texts]
        out = []
        with torch.no_grad(), eval_mode(self.model):
            for i in range(0, len(texts), self.batch_size):
                enc = self.classifier_tokenizer(texts[i:i + self.batch_size], return_tensors="pt",
                                                padding=True, truncation=True,
                                                max_length=self.max_length)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                logits = self.model(**enc).logits.float()
                out.append(logits.log_softmax(-1)[:, self.label])
        return torch.cat(out).to(x.device) if out else torch.zeros(0, device=x.device)
