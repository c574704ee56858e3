"""Sampling rules tested directly on logits: masks against hand-derived sets, the sampled distribution
by a chi-square test on a fixed-logit toy, logprobs against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgcd_jax.sampling.rules import SamplingParams, processed_logits, sample_tokens, top_k_mask, top_p_mask

# chi-square 99.9% quantiles by degrees of freedom (tables)
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_k_mask_keeps_the_k_largest():
    logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True, False]]
    assert top_k_mask(logits, 0).all()  # disabled


def test_top_p_mask_keeps_smallest_set_reaching_mass():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    logits = jnp.log(jnp.array([probs[2], probs[0], probs[3], probs[1]]))[None]  # shuffled
    # mass before each sorted token: 0, .5, .75, .9 → top_p=0.7 keeps {.5,.25}; 0.75 keeps {.5,.25}; 0.76 adds .15
    assert top_p_mask(logits, 0.7).tolist() == [[False, True, False, True]]
    assert top_p_mask(logits, 0.75).tolist() == [[False, True, False, True]]
    assert top_p_mask(logits, 0.76).tolist() == [[True, True, False, True]]
    assert top_p_mask(logits, 0.3).tolist() == [[False, True, False, False]]  # argmax always kept


def test_greedy_is_argmax_and_ignores_key():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    params = SamplingParams(temperature=0.0)
    a, lp = sample_tokens(logits, jax.random.key(1), params)
    b, _ = sample_tokens(logits, jax.random.key(2), params)
    np.testing.assert_array_equal(a, np.argmax(np.asarray(logits), -1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lp, 0.0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8),
                                                     (0.8, 5, 0.9)])
def test_sampled_distribution_matches_chi_square(temperature, top_k, top_p):
    base = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5], np.float32)
    # expected distribution derived in numpy
    scaled = base / temperature
    keep = np.ones_like(scaled, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[::-1][top_k - 1]
    order = np.argsort(-scaled)
    probs_sorted = _softmax(scaled)[order]
    mass_before = np.cumsum(probs_sorted) - probs_sorted
    keep_p = np.zeros_like(keep)
    keep_p[order[mass_before < top_p]] = True
    keep &= keep_p
    expected = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    expected /= expected.sum()

    n = 40000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, logprobs = jax.jit(sample_tokens, static_argnums=2)(jnp.tile(base, (n, 1)), jax.random.key(7), params)
    counts = np.bincount(np.asarray(tokens), minlength=len(base))
    assert counts[~keep].sum() == 0, "a masked token was sampled"
    observed, exp_counts = counts[keep], expected[keep] * n
    chi2 = float(((observed - exp_counts) ** 2 / exp_counts).sum())
    assert chi2 < CHI2_999[keep.sum() - 1], (chi2, counts, expected)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(expected[np.asarray(tokens)]), rtol=1e-4, atol=1e-5)


def test_tempered_logprob_mode_ignores_truncation():
    base = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.5, top_k=1, logprob_mode="tempered")
    token, logprob = sample_tokens(base, jax.random.key(0), params)
    assert int(token[0]) == 0
    np.testing.assert_allclose(float(logprob[0]), np.log(_softmax(np.array([2.0, 1, 0, -1]) / 0.5)[0]), rtol=1e-5)


def test_sampling_is_deterministic_given_key():
    logits = jax.random.normal(jax.random.key(0), (8, 100))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample_tokens(logits, jax.random.key(3), params)[0]
    b = sample_tokens(logits, jax.random.key(3), params)[0]
    c = sample_tokens(logits, jax.random.key(4), params)[0]
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_processed_logits_masks_with_finite_values():
    out = processed_logits(jnp.array([[0.0, 1.0, 2.0]]), SamplingParams(top_k=1))
    assert np.isfinite(np.asarray(out)).all() and int(jnp.argmax(out)) == 2


def test_invalid_params_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
