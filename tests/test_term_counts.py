"""secorder.term_counts: what a loss's mean divides by, looked up per loss type, never guessed."""

import functools

import torch
import torch.nn.functional as Fn
from torch import nn

from secorder.term_counts import TERM_COUNTS, Terms, term_counter


def test_counts_follow_pytorchs_mean():
    """The count is what PyTorch's reduction='mean' divides by: value * count == the reduction='sum' value."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 3, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 2, -100, 1, 2, -100])
    w = torch.tensor([0.3, 2.0, 1.5], dtype=torch.float64)
    for kwargs in ({}, {"weight": w}, {"weight": w, "label_smoothing": 0.2}, {"label_smoothing": 0.1}):
        count, scale = term_counter(nn.CrossEntropyLoss(**kwargs))(y)
        mean = Fn.cross_entropy(out, y, **kwargs)
        total = Fn.cross_entropy(out, y, reduction="sum", **kwargs)
        torch.testing.assert_close(mean * count, total)
        assert scale is count
    probs = torch.softmax(torch.randn(6, 3, 2, dtype=torch.float64, generator=g), 1)
    count, _ = term_counter(Fn.cross_entropy)(probs)
    assert count == 12
    kl = term_counter(nn.KLDivLoss(reduction="batchmean"))(probs)
    assert kl == Terms(6, 6)
    assert term_counter(nn.MSELoss(reduction="sum"))(probs) == Terms(36, 1)


def test_term_counter_declines_what_it_cannot_see_through():
    ce = nn.CrossEntropyLoss()
    assert term_counter(ce) is not None
    ce.forward = lambda o, t: Fn.cross_entropy(o, t) * 2
    assert term_counter(ce) is None  # an instance-level forward
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert term_counter(hooked) is None

    class Mine(nn.CrossEntropyLoss):
        pass

    assert term_counter(Mine()) is None  # a subclass may compute something else
    assert term_counter(functools.partial(Fn.cross_entropy, torch.zeros(1))) is None  # positional arguments
    assert term_counter(functools.partial(Fn.mse_loss, size_average=True)) is None  # deprecated reduction flags
    assert term_counter(nn.CrossEntropyLoss(reduction="none")) is None
    assert nn.CrossEntropyLoss in TERM_COUNTS and Fn.nll_loss in TERM_COUNTS
