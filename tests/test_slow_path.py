"""No silent hours (issue 20, item 4): SlowPathWarning and the progress bar over one-hot columns."""

import threading
import warnings

import pytest
import torch
from torch import nn

import secorder as so
from secorder import slow_path

D = torch.float64


def _declined_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    return f, so.params_dict(model), torch.randn(5, 3, dtype=D), torch.randint(0, 3, (5,))


def _caught(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args)
    return value, [w for w in caught if issubclass(w.category, so.SlowPathWarning)]


def test_warning_names_the_declining_module_the_estimate_and_the_alternatives():
    f, params, x, y = _declined_model()
    fn = so.diagonal(f)  # the Hessian: one product per parameter once the engine declines
    with so.slow_path.settings(threshold_s=0.0):
        d, caught = _caught(fn, params, x, y)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "GroupNorm" in text and "39 columns" in text and "Estimated time" in text
    assert "method='hutchinson'" in text and "curvature='ggn'" in text
    assert issubclass(so.SlowPathWarning, UserWarning)
    # the warning changes nothing: the same diagonal as without it
    _, none = _caught(so.diagonal(f), params, x, y)
    assert none == []
    torch.testing.assert_close(so.tree.ravel(d)[0], so.tree.ravel(so.diagonal(f)(params, x, y))[0], rtol=0, atol=0)


def test_trace_warns_too_and_the_default_threshold_is_quiet():
    f, params, x, y = _declined_model()
    with so.slow_path.settings(threshold_s=0.0):
        _, caught = _caught(so.trace(f), params, x, y)
    assert len(caught) == 1 and "exact trace" in str(caught[0].message)
    assert slow_path.current().threshold_s == slow_path.DEFAULT_THRESHOLD_S
    _, caught = _caught(so.trace(f), params, x, y)
    assert caught == []


def test_loss_factor_diagonals_count_their_vjps():
    """The GGN and Fishers take N K VJPs, not one product per parameter; that is what their warning counts."""
    f, params, x, y = _declined_model()
    for curvature, columns in (("ggn", 3), ("empirical_fisher", 1)):
        with so.slow_path.settings(threshold_s=0.0):
            _, caught = _caught(so.diagonal(f, curvature=curvature), params, x, y)
        assert len(caught) == 1
        text = str(caught[0].message)
        assert f"{5 * columns} vector-Jacobian products (5 sample(s) x {columns} factor column(s))" in text
        assert "one product per parameter" not in text and "method='hutchinson'" in text
        _, caught = _caught(so.diagonal(f, curvature=curvature), params, x, y)
        assert caught == []


def test_progress_bar_over_the_columns(capsys):
    pytest.importorskip("tqdm")
    f, params, x, y = _declined_model()
    with so.slow_path.settings(progress=True):
        so.diagonal(f, chunk_size=4)(params, x, y)
    err = capsys.readouterr().err
    assert "secorder: diagonal" in err and "39/39" in err
    with so.slow_path.settings(progress=False, threshold_s=0.0), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        so.diagonal(f)(params, x, y)
    assert "secorder" not in capsys.readouterr().err


def test_settings_are_checked_and_local_to_the_thread(monkeypatch):
    with pytest.raises(ValueError, match="threshold_s"):
        with so.slow_path.settings(threshold_s=-1):
            pass
    with pytest.raises(TypeError, match="progress"):
        with so.slow_path.settings(progress="yes"):
            pass
    seen = []
    with so.slow_path.settings(threshold_s=1.5):
        t = threading.Thread(target=lambda: seen.append(slow_path.current().threshold_s))
        t.start()
        t.join()
        assert slow_path.current().threshold_s == 1.5
    assert seen == [slow_path.DEFAULT_THRESHOLD_S]
    monkeypatch.setenv("SECORDER_SLOW_PATH_SECONDS", "0")
    assert slow_path.current().threshold_s == 0.0
    f, params, x, y = _declined_model()
    _, caught = _caught(so.trace(f), params, x, y)
    assert len(caught) == 1
    monkeypatch.setenv("SECORDER_SLOW_PATH_SECONDS", "soon")
    with pytest.raises(ValueError, match="SECORDER_SLOW_PATH_SECONDS"):
        slow_path.current()
