"""Every forward-Laplacian rule of the registry has a test setting (issue 24).

The Laplacian tests name most covered callables (``tests/test_laplacian*.py``); the rules they never name get a
setting here, checked against the trace of ``torch.func.hessian``, and the last test fails when a registered rule
is neither named in a test nor run by a setting of this file.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

import secorder as so
from secorder.forward_laplacian import jet
from secorder.forward_laplacian.registry import RULES, op_name

DT = torch.float64
A = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=DT)

# (id, u(x) for x of shape (3,) with entries in (0.2, 0.9))
SETTINGS = [
    ("sinh", lambda x: torch.sinh(x).sum() + x.sinh().sum() ** 2),
    ("asinh", lambda x: torch.asinh(x).sum() + torch.arcsinh(2 * x).sum() ** 2),
    ("expm1", lambda x: torch.expm1(x).sum() + torch.special.expm1(x).sum() ** 2),
    ("exp2", lambda x: torch.exp2(x).sum() + torch.special.exp2(x * x).sum()),
    ("log2", lambda x: torch.log2(x).sum() + x.log2().sum() ** 2),
    ("log1p", lambda x: torch.log1p(x).sum() ** 2 + torch.special.log1p(x ** 2).sum()),
    ("rsqrt", lambda x: torch.rsqrt(x).sum() + x.rsqrt().sum() ** 2),
    ("reciprocal", lambda x: torch.reciprocal(x).sum() ** 2 + x.reciprocal().sum()),
    ("erfc", lambda x: torch.erfc(x).sum() + torch.special.erfc(x * x).sum() ** 2),
    ("rsub", lambda x: ((1 - x) ** 3).sum() + torch.rsub(x, 2.0).sum() ** 2),
    ("rtruediv", lambda x: (1 / (x + 2)).sum()),
    ("rpow", lambda x: (2 ** x).sum() ** 2),
    ("matmul-reflected", lambda x: torch.tanh(torch.Tensor.__rmatmul__(x, A)).sum() + (A @ x).sum() ** 2),
    ("getitem", lambda x: (x[1:] ** 3).sum() * x[0]),
    ("transpose-attributes", lambda x: (x[None].T * x[None].mT).sum() ** 2),
    ("masked_fill", lambda x: torch.sin(torch.masked_fill(x, x > 0.5, 0.25)).sum() + x.masked_fill(x < 0.3, 1.0).sum() ** 2),
    ("repr-and-flags", lambda x: (x ** 3).sum() * (1.0 if len(repr(x)) > 0 and len(str(x)) > 0 else 2.0)
     * (1.0 if x.requires_grad in (True, False) else 2.0)),
    ("cosh-log10", lambda x: torch.cosh(x).sum() * x.log10().sum()),
    ("positive", lambda x: (torch.positive(x) ** 3).sum() + x.positive().sum() ** 2),
    ("minimum-min-amin", lambda x: torch.minimum(x ** 2, x.flip(0)).sum() + torch.min(x ** 3, 0).values
     + x.amin() ** 2 + torch.amin(x * x.sum())),
    ("transpose-movedim", lambda x: (torch.transpose(x[None] * x[:, None], 0, 1) * x[None]).sum() ** 2
     + torch.movedim(x[None, :, None] ** 2, 1, 0).sum() * torch.swapaxes(x[None], 0, 1).sum()),
    ("conv1d", lambda x: torch.tanh(torch.nn.functional.conv1d(x[None, None], A[:1, None, :2])).sum()
     + torch.nn.functional.conv2d(x[None, None, None] ** 2, A[None, None, :1, :2]).sum() ** 2
     + torch.nn.functional.conv3d(x[None, None, None, None], A[None, None, None, :1, :2]).pow(2).sum()),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_setting_matches_the_hessian_trace(setting):
    _, u = setting
    x = torch.tensor([0.25, 0.5, 0.8], dtype=DT)
    got = so.laplacian(u, method="forward")(x)
    torch.testing.assert_close(got, torch.func.hessian(u)(x).trace(), rtol=1e-10, atol=1e-12)


def test_every_registered_rule_is_named_in_a_test_or_run_by_a_setting(monkeypatch):
    hit = set()
    real = jet.lookup

    def recording(func):
        rule = real(func)
        if rule is not None:
            hit.add(id(rule))
        return rule

    monkeypatch.setattr(jet, "lookup", recording)
    x = torch.tensor([0.25, 0.5, 0.8], dtype=DT)
    for _, u in SETTINGS:
        so.laplacian(u, method="forward")(x)
    tests = pathlib.Path(__file__).parent
    source = "".join(p.read_text() for p in tests.glob("test_laplacian*.py") if p.name != pathlib.Path(__file__).name)
    rules = {}
    for func, rule in RULES.items():
        rules.setdefault(id(rule), []).append(op_name(func))
    missing = [names for key, names in rules.items()
               if key not in hit and not any(name.split(".")[-1] in source for name in names)]
    assert not missing, f"forward-Laplacian rules with no test setting: {missing}"
