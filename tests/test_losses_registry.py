"""Registry: names select functions; unknown names list what exists; names cannot be hijacked."""

import pytest

from sgcd_jax.losses import get, register, registered
from sgcd_jax.losses.advantages import grpo_advantages
from sgcd_jax.losses.registry import _REGISTRY


def test_every_kind_has_its_builtins():
    assert {"grpo", "rloo", "loop"} <= set(registered("advantage"))
    assert {"ppo", "sgcd"} <= set(registered("policy_loss"))
    assert {"sgcd", "none"} <= set(registered("credit"))
    assert {"sdpo"} <= set(registered("aux_loss"))
    assert get("advantage/grpo") is grpo_advantages


def test_unknown_name_lists_registered_names_of_that_kind():
    with pytest.raises(KeyError, match="'credit/none', 'credit/sgcd'"):
        get("credit/rlsd_v2")


def test_malformed_names_and_kinds_are_rejected():
    with pytest.raises(ValueError, match="<kind>/<name>"):
        get("grpo")
    with pytest.raises(ValueError, match="unknown registry kind"):
        register("optimizer/adam")


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register("advantage/grpo")(lambda batch, cfg: None)


def test_new_names_become_selectable():
    @register("aux_loss/test_only_zero")
    def zero(batch, cfg):
        return 0.0

    try:
        assert get("aux_loss/test_only_zero") is zero
    finally:
        _REGISTRY["aux_loss"].pop("test_only_zero")  # keep the process-wide registry clean
