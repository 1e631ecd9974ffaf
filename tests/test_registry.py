"""The one registry type (secorder.registry.Registry)."""

import threading

import pytest

from secorder.registry import LazyEntryError, Registry


def test_register_get_names_order():
    r = Registry("thing")
    r.register("b", 2)
    r.register("a", 1)
    assert r.names() == ("b", "a")
    assert r.get("a") == 1 and r.lookup("c") is None
    assert "a" in r and "c" not in r and len(r) == 2
    assert list(r.items()) == [("b", 2), ("a", 1)]


def test_reregistering_needs_replace():
    r = Registry("curvature")
    r.register("hessian", 1)
    with pytest.raises(ValueError, match="curvature 'hessian' is already registered; pass replace=True"):
        r.register("hessian", 2)
    assert r.get("hessian") == 1
    r.register("hessian", 2, replace=True)
    assert r.get("hessian") == 2
    with pytest.raises(TypeError, match="replace must be a bool"):
        r.register("x", 1, replace="yes")


def test_decorator_returns_the_decorated_object():
    r = Registry("rule")

    @r.register(int)
    def rule():
        return "int"

    assert r.get(int) is rule and rule() == "int"


def test_unknown_key_lists_valid_names_and_types_by_name():
    r = Registry("rule")
    r.register(int, 1)
    with pytest.raises(ValueError, match=r"unknown rule float; valid rules are int"):
        r.get(float)
    with pytest.raises(TypeError, match="must be hashable"):
        r.register([1], 1)
    assert r.lookup([1]) is None and [1] not in r


def test_lazy_entry_imported_at_first_lookup_and_errors_raised_every_time():
    r = Registry("estimator")
    r.register_lazy("sqrt", "math:sqrt")
    assert isinstance(r.view()["sqrt"], object) and r.get("sqrt")(4.0) == 2.0
    r.register_lazy("broken", "secorder._no_such_module:x")
    for _ in range(2):  # not swallowed, not removed
        with pytest.raises(LazyEntryError, match="_no_such_module"):
            r.get("broken")
    assert "broken" in r
    r.register_lazy("missing_attr", "math:no_such_function")
    with pytest.raises(LazyEntryError, match="no_such_function"):
        r.lookup("missing_attr")


def test_package_loader_runs_once_and_raises_on_failure():
    r = Registry("rule")

    class Key:
        pass

    Key.__module__ = "fakepkg.layers"
    r.add_loader("fakepkg", "secorder._no_such_rules_module")
    with pytest.raises(LazyEntryError, match="fakepkg.*_no_such_rules_module"):
        r.lookup(Key)
    r.add_loader("fakepkg", "math")  # a module that imports but registers nothing
    assert r.lookup(Key) is None


def test_concurrent_registration_keeps_every_entry():
    r = Registry("x")
    errors = []

    def add(start):
        try:
            for i in range(start, start + 200):
                r.register(i, i)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=add, args=(k * 200,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(r) == 800 and all(r.get(i) == i for i in range(800))
