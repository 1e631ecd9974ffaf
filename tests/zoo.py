"""The model zoo of the tests: small random Hugging Face models, as people train them, in float64.

``build(name)`` gives a :class:`Case`: a tiny random-init configuration of a
Hugging Face model (transformers of width 16 with one layer, convolutional
networks of two stages of 4 and 8 channels, a vocabulary of 11 tokens, three
classes; one to three thousand parameters, so dense float64 references are
cheap), in ``eval()`` mode, with a batch of inputs as the model
takes them (a dict), targets, and ``f = so.functional_loss(model, loss_fn,
output=...)``. The causal language models take their logits through an
``output`` callable (``[N, vocab, T]`` for ``nn.CrossEntropyLoss``), BERT names
its field (``output="logits"``), the vision models rely on the default
(``output=None`` takes ``logits``).

Shared by every test that tries a feature on the models people train (the zoo
tests, the structured engine's graph walker, the loss-factor diagonals):

    from tests import zoo
    case = zoo.build("gpt2")
    so.trace(case.f)(case.params(), case.inputs, case.targets)

``transformers`` is a test extra: :func:`require_transformers` skips a test
module without it. Traps (DESIGN.md): Llama's RMSNorm computes in float32 whatever
the model's dtype (its references are float32-tight: :attr:`Case.rtol`); its
key/value heads equal its attention heads (one key/value head gave float64
losses whose finite differences do not converge); the causal LMs run with
``use_cache=False`` in their configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import pytest
import torch
from torch import Tensor, nn

import secorder as so

NAMES = ("gpt2", "llama", "bert", "vit", "resnet", "convnext")
TEXT = ("gpt2", "llama", "bert")
CAUSAL_LM = ("gpt2", "llama")

VOCAB, HIDDEN, CLASSES, TOKENS, IMAGE = 11, 16, 3, 4, 8
DT = torch.float64

# A classifier called with labels and no problem_type writes one into its config on the first call;
# set here, the config is the same before and after any call.
_PROBLEM = "single_label_classification"


def require_transformers():
    """The ``transformers`` module, or skip the calling test module."""
    return pytest.importorskip("transformers")


def lm_logits(out: Any) -> Tensor:
    """A causal LM's logits ``[N, T, vocab]`` as ``nn.CrossEntropyLoss`` takes them, ``[N, vocab, T]``."""
    return out.logits.transpose(1, 2)


@dataclasses.dataclass
class Case:
    """One zoo model with a batch: ``f(params, inputs, targets)`` and what it was made of."""

    name: str
    model: nn.Module
    inputs: Dict[str, Tensor]
    targets: Tensor
    loss_fn: Callable[..., Tensor]
    output: Any
    labels: Tensor  # what the model's own loss takes: ``model(**inputs, labels=labels).loss`` equals ``f``
    rtol: float  # agreement expected with float64 references (Llama: float32 RMSNorm)

    @property
    def f(self) -> so.FunctionalLoss:
        return so.functional_loss(self.model, self.loss_fn, output=self.output)

    def params(self) -> Dict[str, Tensor]:
        return so.params_dict(self.model)

    def own_loss(self) -> Callable[[Dict[str, Tensor]], Tensor]:
        """A hand-written ``f(params)``: the model's own ``.loss`` on the batch (labels included)."""
        model, batch = self.model, dict(self.inputs, labels=self.labels)
        return lambda params: torch.func.functional_call(model, params, (), batch).loss

    def batch(self, index: slice) -> tuple:
        """``(inputs, targets)`` of the samples ``index``: a batch of a data set."""
        return {k: v[index] for k, v in self.inputs.items()}, self.targets[index]


def _text_config(transformers, name: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=2 * HIDDEN, max_position_embeddings=8)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=HIDDEN, n_layer=1, n_head=2,
                                       n_inner=2 * HIDDEN, bos_token_id=0, eos_token_id=0, use_cache=False)
    if name == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, use_cache=False, **common)
    return transformers.BertConfig(type_vocab_size=1, num_labels=CLASSES, problem_type=_PROBLEM, **common)


def _model(transformers, name: str) -> nn.Module:
    t = transformers
    if name == "gpt2":
        return t.GPT2LMHeadModel(_text_config(t, name))
    if name == "llama":
        return t.LlamaForCausalLM(_text_config(t, name))
    if name == "bert":
        return t.BertForSequenceClassification(_text_config(t, name))
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=2 * HIDDEN, num_labels=CLASSES, problem_type=_PROBLEM))
    if name == "resnet":
        return t.ResNetForImageClassification(t.ResNetConfig(
            num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic",
            num_labels=CLASSES, problem_type=_PROBLEM))
    if name == "convnext":
        return t.ConvNextForImageClassification(t.ConvNextConfig(
            num_channels=1, patch_size=2, num_stages=2, hidden_sizes=[4, 8], depths=[1, 1],
            num_labels=CLASSES, image_size=IMAGE, problem_type=_PROBLEM))
    raise ValueError(f"unknown zoo model {name!r}; the zoo has {NAMES}")


def build(name: str, *, seed: int = 0, batch: int = 2, train: bool = False) -> Case:
    """A zoo model with a batch of ``batch`` samples (see the module docstring).

    Args:
        name: one of :data:`NAMES`.
        seed: the seed of the weights and the batch.
        batch: the number of samples (sequences or images).
        train: leave the model in training mode (dropout active; ResNet's batch
            norms on batch statistics); default ``eval()``.
    """
    transformers = require_transformers()
    torch.manual_seed(seed)
    model = _model(transformers, name).to(DT)
    model.train(train)
    g = torch.Generator().manual_seed(seed + 1)
    if name in TEXT:
        ids = torch.randint(0, VOCAB, (batch, TOKENS), generator=g)
        inputs = {"input_ids": ids}
        if name == "bert":
            mask = torch.ones(batch, TOKENS, dtype=torch.long)
            mask[0, -1] = 0  # one padded position
            inputs["attention_mask"] = mask
    else:
        inputs = {"pixel_values": torch.randn(batch, 1, IMAGE, IMAGE, dtype=DT, generator=g)}
    if name in CAUSAL_LM:  # next-token targets, the last position ignored: the model's own (shifted) loss
        targets = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
        return Case(name, model, inputs, targets, nn.CrossEntropyLoss(), lm_logits, labels=inputs["input_ids"],
                    rtol=1e-5 if name == "llama" else 1e-8)
    targets = torch.randint(0, CLASSES, (batch,), generator=g)
    output: Optional[str] = "logits" if name == "bert" else None
    return Case(name, model, inputs, targets, nn.CrossEntropyLoss(), output, labels=targets, rtol=1e-8)
