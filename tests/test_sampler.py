"""Sampler on a tiny random Decoder: greedy vs no-cache argmax, continuation vs fresh prefill, shared
prefixes, compaction, stop tokens/strings, determinism and data-parallel sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.models import Decoder, KVCache, ModelConfig
from sgcd_jax.sampling.kernels import append_chunk, decode_chunk
from sgcd_jax.sampling.rules import SamplingParams
from sgcd_jax.sampling.session import Sampler

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=512)
GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0)


def make_sampler(model, params=GREEDY, **kwargs):
    # one chunk length and cache bucket everywhere: fewer shapes to compile
    return Sampler(model, params=params, decode_steps_per_chunk=8, min_cache_len=64, **kwargs)


@pytest.fixture(scope="module")
def model():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    # sharpen the random init so greedy choices have clear margins (float noise cannot flip them)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params))
    return model


REF_LEN = 48  # the reference pads every sequence to one length so it compiles once


@jax.jit
def _full_logits(state, tokens, mask):
    model = nnx.merge(_GRAPHDEF[0], state)
    hidden, _ = model(tokens, jnp.arange(tokens.shape[1])[None], mask)
    return model.logits(hidden)  # [1, REF_LEN, V]


_GRAPHDEF = []


def full_logits(model, ids):
    """Logits [len(ids), V] of one cache-free forward over ids (right padding is causal-invisible)."""
    graphdef, state = nnx.split(model)
    _GRAPHDEF[:] = [graphdef]
    tokens = np.zeros((1, REF_LEN), np.int32)
    tokens[0, :len(ids)] = ids
    return _full_logits(state, jnp.asarray(tokens), jnp.asarray(np.arange(REF_LEN) < len(ids))[None])[0, :len(ids)]


def no_cache_greedy(model, prompt, num_new):
    ids = list(prompt)
    for _ in range(num_new):
        ids.append(int(jnp.argmax(full_logits(model, ids)[-1])))
    return ids[len(prompt):]


PROMPTS = [[1, 5, 9, 3], [7, 2], [4, 4, 8, 12, 33, 17, 2]]


def test_greedy_equals_step_by_step_argmax_without_cache(model):
    sampler = make_sampler(model)  # 12 tokens: two chunks
    outs = sampler.generate(PROMPTS, max_new_tokens=12, rng=jax.random.key(0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids.tolist() == no_cache_greedy(model, prompt, 12)
        assert out.finish_reason == "length"


def test_stop_token_ends_row_and_is_kept(model):
    expected = no_cache_greedy(model, PROMPTS[0], 12)
    stop = expected[3]
    sampler = make_sampler(model, stop_token_ids=(stop,))
    out = sampler.generate(PROMPTS[:1], max_new_tokens=12, rng=jax.random.key(0))[0]
    first = expected.index(stop)
    assert out.token_ids.tolist() == expected[:first + 1] and out.finish_reason == "stop_token"


def test_per_row_max_tokens(model):
    sampler = make_sampler(model)
    outs = sampler.generate(PROMPTS, max_new_tokens=[3, 7, 1], rng=jax.random.key(0))
    assert [len(o.token_ids) for o in outs] == [3, 7, 1]


def test_stop_string_truncates_and_rolls_back_cache(model):
    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)  # noqa: E731
    expected = no_cache_greedy(model, PROMPTS[0], 12)
    stop_string = decode(expected[4:6])
    cut = next(c for c in range(1, 13) if stop_string in decode(expected[:c]))
    sampler = make_sampler(model, decode_text=decode)
    session = sampler.session()
    out = session.step({"a": PROMPTS[0]}, max_new_tokens=12, rng=jax.random.key(0), stop_strings=[stop_string])["a"]
    assert out.token_ids.tolist() == expected[:cut] and out.finish_reason == "stop_string"
    assert int(session.cache.seq_end[0]) == len(PROMPTS[0]) + cut  # tokens past the stop string forgotten
    # continuing after the cut behaves as if the dropped tokens were never generated
    nxt = session.step({"a": [3]}, max_new_tokens=4, rng=jax.random.key(1))["a"]
    assert nxt.token_ids.tolist() == no_cache_greedy(model, PROMPTS[0] + expected[:cut] + [3], 4)


def test_continuation_logits_equal_fresh_prefill(model):
    prompt, observation = [3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9]
    graphdef, state = nnx.split(model)
    cache = KVCache.init(CFG, 1, 64)
    cache, logits = append_chunk(graphdef, state, cache, jnp.asarray([prompt]), jnp.ones((1, 6), bool))
    cache, _, _, _, _, generated, _, num = decode_chunk(
        graphdef, state, cache, logits, jnp.array([True]), jnp.array([5]), jax.random.key(3),
        params=SAMPLE, num_steps=8, stop_ids=())
    generated = np.asarray(generated)[0, :int(num[0])].tolist()
    assert len(generated) == 5
    padded = jnp.asarray([observation + [0, 0, 0]])
    cache, cont_logits = append_chunk(graphdef, state, cache, padded, padded > -1 & (jnp.arange(10) < 7)[None])
    full = prompt + generated + observation
    _, fresh_logits = append_chunk(graphdef, state, KVCache.init(CFG, 1, 64), jnp.asarray([full]),
                                   jnp.ones((1, len(full)), bool))
    np.testing.assert_allclose(np.asarray(cont_logits), np.asarray(fresh_logits), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cont_logits[0]), np.asarray(full_logits(model, full)[-1]), atol=2e-4,
                               rtol=1e-4)


def test_multi_turn_session_equals_fresh_generation_and_reprefill(model):
    obs = {"a": [[9, 9, 1], [2, 3]], "b": [[5], [6, 7, 8, 9]]}
    prompts = {"a": PROMPTS[0], "b": PROMPTS[2]}
    sampler = make_sampler(model)
    cached, reprefill = sampler.session(), sampler.session(reuse_cache=False)
    convo = {k: list(p) for k, p in prompts.items()}
    outs = [cached.step(prompts, max_new_tokens=6, rng=jax.random.key(0)),
            reprefill.step(prompts, max_new_tokens=6, rng=jax.random.key(0))]
    for turn in range(2):
        for key in prompts:
            expected = no_cache_greedy(model, convo[key], 6)
            assert outs[0][key].token_ids.tolist() == expected == outs[1][key].token_ids.tolist()
            convo[key] += expected + obs[key][turn]
        chunks = {key: obs[key][turn] for key in prompts}
        outs = [cached.step(chunks, max_new_tokens=6, rng=jax.random.key(1)),
                reprefill.step(chunks, max_new_tokens=6, rng=jax.random.key(1))]
    assert reprefill.stats.prefill_tokens > cached.stats.prefill_tokens


def test_shared_prefix_siblings_and_compaction(model):
    sampler = make_sampler(model)
    session = sampler.session()
    group = {("t0", g): PROMPTS[0] for g in range(3)} | {("t1", g): PROMPTS[2] for g in range(3)}
    outs = session.step(group, max_new_tokens=5, rng=jax.random.key(0))
    assert session.stats.shared_prefix_tokens_saved == 2 * (len(PROMPTS[0]) - 1) + 2 * (len(PROMPTS[2]) - 1)
    for (task, _), out in outs.items():
        assert out.token_ids.tolist() == no_cache_greedy(model, PROMPTS[0] if task == "t0" else PROMPTS[2], 5)
    assert session.cache.batch_size == 8
    # only two episodes continue: the cache shrinks to two rows and they continue correctly
    keep = {("t0", 1): [4], ("t1", 2): [6, 6]}
    outs2 = session.step(keep, max_new_tokens=4, rng=jax.random.key(1))
    assert session.cache.batch_size == 2 and set(outs2) == set(keep)
    expected = no_cache_greedy(model, PROMPTS[2] + outs[("t1", 2)].token_ids.tolist() + [6, 6], 4)
    assert outs2[("t1", 2)].token_ids.tolist() == expected


def test_sampling_is_deterministic_given_key(model):
    sampler = make_sampler(model, SAMPLE)
    a = sampler.generate(PROMPTS, max_new_tokens=10, rng=jax.random.key(5))
    b = sampler.generate(PROMPTS, max_new_tokens=10, rng=jax.random.key(5))
    c = sampler.generate(PROMPTS, max_new_tokens=10, rng=jax.random.key(6))
    assert all((x.token_ids == y.token_ids).all() and np.allclose(x.logprobs, y.logprobs) for x, y in zip(a, b))
    assert any((x.token_ids != y.token_ids).any() for x, y in zip(a, c))
    assert all((o.logprobs <= 0).all() and (o.logprobs > -30).all() for o in a)


def test_sampler_logprobs_match_model_at_temperature_one(model):
    sampler = make_sampler(model, SAMPLE)
    out = sampler.generate(PROMPTS[:1], max_new_tokens=6, rng=jax.random.key(2))[0]
    full = PROMPTS[0] + out.token_ids.tolist()
    logp = jax.nn.log_softmax(full_logits(model, full), -1)
    expected = [float(logp[len(PROMPTS[0]) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def test_sharded_rows_give_same_greedy_output(model):
    if jax.device_count() < 4:
        pytest.skip("needs >= 4 devices (tests/conftest.py forces 8 CPU devices)")
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))
    plain = make_sampler(model).generate(PROMPTS, max_new_tokens=6, rng=jax.random.key(0))
    sharded_sampler = make_sampler(model, mesh=mesh, row_axes="data")
    sharded_sampler.state = jax.device_put(sharded_sampler.state, jax.sharding.NamedSharding(mesh, jax.P()))
    session = sharded_sampler.session()
    outs = session.step(dict(enumerate(PROMPTS)), max_new_tokens=6, rng=jax.random.key(0))
    assert session.cache.batch_size % 4 == 0
    assert len(session.cache.k.sharding.device_set) == 4
    # a replicated prefix store would put every task's prompt on every device: rows split over devices copy it
    assert not sharded_sampler.share_prefixes and not session.cache.has_prefix_store
    for i, out in enumerate(plain):
        assert outs[i].token_ids.tolist() == out.token_ids.tolist()


def test_project_mesh_with_tp_and_fsdp_weights_gives_same_greedy_output(model):
    from sgcd_jax.parallel.sharding import MeshConfig, make_mesh, shard_model

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tp=2))
    plain = make_sampler(model).generate(PROMPTS, max_new_tokens=6, rng=jax.random.key(0))
    sharded_model = shard_model(nnx.clone(model), mesh)
    sampler = make_sampler(sharded_model, mesh=mesh)
    assert sampler.row_axes == ("data", "fsdp") and sampler.batch_multiple == 4
    outs = sampler.generate(PROMPTS, max_new_tokens=6, rng=jax.random.key(0))
    assert [o.token_ids.tolist() for o in outs] == [o.token_ids.tolist() for o in plain]


def test_straggler_row_decodes_alone_and_parked_rows_continue_next_turn(model):
    prompts = {i: p for i, p in enumerate(PROMPTS + [[9, 8, 7]])}
    session = make_sampler(model).session(park_idle_rows=True)
    outs = session.step(prompts, max_new_tokens={0: 20, 1: 2, 2: 3, 3: 2}, rng=jax.random.key(0))
    # after the first 8-step chunk only row 0 is active: it ran on a 1-row batch
    assert session.stats.decode_row_steps == 4 * 8 + 1 * 8 + 1 * 4
    for i, prompt in prompts.items():
        assert outs[i].token_ids.tolist() == no_cache_greedy(model, prompt, len(outs[i].token_ids))
    assert session.cache.batch_size == 4  # parked rows are back, in order
    outs2 = session.step({i: [5] for i in prompts}, max_new_tokens=3, rng=jax.random.key(1))
    for i, prompt in prompts.items():
        history = prompt + outs[i].token_ids.tolist() + [5]
        assert outs2[i].token_ids.tolist() == no_cache_greedy(model, history, 3)


def test_per_episode_keys_make_samples_independent_of_the_batch(model):
    """With one key per episode, an episode samples the same tokens alone, in a bigger batch, or in
    another row order — what lets a multi-host rollout reproduce the single-host one."""
    sampler = make_sampler(model, SAMPLE)
    keys = {i: jax.random.fold_in(jax.random.key(7), i) for i in range(3)}
    together = sampler.session().step(dict(enumerate(PROMPTS)), max_new_tokens=10, rng=keys)
    for i in range(3):
        alone = sampler.session().step({i: PROMPTS[i]}, max_new_tokens=10, rng={i: keys[i]})[i]
        assert alone.token_ids.tolist() == together[i].token_ids.tolist()
        np.testing.assert_allclose(alone.logprobs, together[i].logprobs, atol=1e-5)
    reordered = sampler.session().step({2: PROMPTS[2], 0: PROMPTS[0]}, max_new_tokens=10, rng=keys)
    assert reordered[0].token_ids.tolist() == together[0].token_ids.tolist()
    other = sampler.session().step({0: PROMPTS[0]}, max_new_tokens=10, rng={0: jax.random.key(8)})[0]
    assert other.token_ids.tolist() != together[0].token_ids.tolist()  # the key matters


def test_per_row_keys_sample_the_model_distribution():
    """vmapped per-row categorical draws follow softmax(logits): 4000 rows of one 3-way distribution."""
    from sgcd_jax.sampling.rules import sample_tokens

    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]] * 4000))
    keys = jax.random.split(jax.random.key(0), 4000)
    tokens, logprobs = sample_tokens(logits, keys, SAMPLE)
    freq = np.bincount(np.asarray(tokens), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)  # ~4 sigma
    np.testing.assert_allclose(np.asarray(logprobs), np.log(np.asarray([0.6, 0.3, 0.1]))[np.asarray(tokens)],
                               atol=1e-5)


@pytest.mark.parametrize("continuous,impl", [(False, "xla"), (True, "xla"), (False, "dot_product_attention")])
def test_shared_prefix_store_samples_what_copied_prefixes_do(continuous, impl):
    """Siblings read their prompt from the cache's prefix store (read once per prefix while decoding; their own
    slots hold only what follows it) instead of a copy in their own row: the same keys, so the same tokens
    and logprobs up to fp32 summation order. attention_block 16 puts the 37- and 23-token prompts across
    several store blocks; turns 2-3 append observations, release rows (store compaction) and, in the
    continuous session with 3 slots for 6 episodes, park rows and hand slots over. The
    dot_product_attention path (GPU) puts the row's entry in front of its keys before attending."""
    cfg = ModelConfig(**{**CFG.__dict__, "attention_block": 16, "attention_impl": impl})
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    # three prompts: while all three are live the store holds 4 entries (the per-row gathered store read), later 2
    prompts = {"a": list(range(3, 40)), "b": [9, 8, 7] + list(range(20, 40)), "c": [4, 4] + list(range(30, 60))}
    keys = {(task, g): jax.random.key(10 * i + g) for i, task in enumerate(prompts) for g in range(3)}

    def run(share: bool) -> dict:
        sampler = Sampler(model, params=SAMPLE, decode_steps_per_chunk=4, min_cache_len=64, share_prefixes=share)
        outs = {}
        if continuous:
            slots = sampler.continuous(num_slots=3, decode_steps=4)
            turns = {key: 0 for key in keys}
            for key in keys:
                slots.submit(key, prompts[key[0]], max_new_tokens=6, rng=keys[key])
            waiting = []  # an episode's next turn is submitted a step after its turn ended (its env answers)
            store_sizes = set()
            while slots.has_work() or waiting:
                finished = slots.step()
                store_sizes.add(slots.cache.num_prefixes)
                for key in waiting:
                    slots.submit(key, [5, 6, turns[key]], max_new_tokens=6, rng=keys[key])
                waiting = []
                for key, out in finished.items():
                    outs[key, turns[key]] = (out.token_ids.tolist(), out.logprobs.tolist())
                    turns[key] += 1
                    if turns[key] < 1 + key[1]:  # sibling g runs 1 + g turns: rows released at different times
                        waiting.append(key)
                    else:
                        slots.release(key)
            assert slots.stats.parked > 0
            assert store_sizes >= ({2, 4} if share else {0})  # both store reads: all rows at once, per row
            return outs
        session = sampler.session()
        chunks = {key: prompts[key[0]] for key in keys}
        for turn in range(3):
            step = session.step(chunks, max_new_tokens=6, rng=dict(keys))
            outs.update({(key, turn): (o.token_ids.tolist(), o.logprobs.tolist()) for key, o in step.items()})
            chunks = {key: [5, 6, turn] for key in chunks if key[1] > turn}  # rows released turn by turn
            if share and turn == 0:
                # the rows hold only their own tokens: the prompt's last token and 6 generated ones
                assert session.cache.num_prefixes == 4 and int(session.cache.valid.sum()) == 9 * 7
            if share and turn == 1:
                assert session.cache.num_prefixes == 4  # the g=1, 2 rows of all three tasks
        assert session.cache.num_prefixes == (4 if share else 0)  # the g=2 rows remain: all three entries kept
        return outs

    shared, copied = run(True), run(False)
    assert shared.keys() == copied.keys() and len(shared) == 18
    assert {key: ids for key, (ids, _) in shared.items()} == {key: ids for key, (ids, _) in copied.items()}
    # the prompt's last block and the first own tokens are one key block in a copied row, two here: the
    # logprobs differ in summation order only (measured max |diff| 4.8e-7 over the 3 cases on an AMD EPYC)
    diffs = [np.abs(np.subtract(shared[key][1], copied[key][1])).max() for key in shared]
    assert max(diffs) < 1e-5


def test_prefix_store_concat_and_compaction_remap_ids():
    from sgcd_jax.sampling.prefill import compact_prefix_store, concat_caches

    def store_cache(entries: int, ids: list[int], tag: float, width: int) -> KVCache:
        cache = KVCache.init(CFG, len(ids), 8)
        k = jnp.full((CFG.num_layers, entries, width, CFG.num_kv_heads, CFG.head_dim), tag) + \
            jnp.arange(entries, dtype=jnp.float32)[None, :, None, None, None]
        return cache.replace(prefix_k=k, prefix_v=-k, prefix_valid=jnp.ones((entries, width), bool),
                             prefix_id=jnp.asarray(ids, jnp.int32), prefix_len=jnp.full((len(ids),), width, jnp.int32))

    a, b = store_cache(2, [1, 1, -1], 10.0, width=8), store_cache(4, [0, 3], 20.0, width=12)
    both = concat_caches([a, KVCache.init(CFG, 1, 8), b])
    assert both.prefix_id.tolist() == [1, 1, -1, -1, 2, 5] and both.num_prefixes == 6
    assert both.prefix_len.tolist() == [8, 8, 8, 0, 12, 12] and both.seq_end.tolist() == both.prefix_len.tolist()
    assert float(both.prefix_k[0, 5, 0, 0, 0]) == 23.0  # b's entry 3
    assert both.prefix_valid.tolist()[0] == [True] * 8 + [False] * 4  # a's entries padded to b's 12 slots
    compact, table = compact_prefix_store(both)
    assert table.tolist() == [-1, 0, 1, -1, -1, 2] and compact.prefix_id.tolist() == [0, 0, -1, -1, 1, 2]
    assert compact.num_prefixes == 4  # 3 entries kept, padded to a power of two with an empty one
    assert [float(compact.prefix_k[0, e, 0, 0, 0]) for e in range(3)] == [11.0, 20.0, 23.0]
    assert compact.prefix_valid.tolist() == [[True] * 8 + [False] * 4] + [[True] * 12] * 2 + [[False] * 12]
    assert compact.row_prefix_valid()[2].tolist() == [False] * 12  # a row without a prefix reads nothing from it
    released = compact.replace(prefix_id=jnp.full((6,), -1, jnp.int32))
    assert not compact_prefix_store(released)[0].has_prefix_store  # no entry referenced: the store is dropped
    with pytest.raises(ValueError, match="parked"):
        concat_caches([a, b.without_prefix_store()])


@pytest.mark.parametrize("continuous", [False, True])
def test_bf16_kv_cache_stores_bf16_and_samples_the_fp32_model(model, continuous):
    """Sampler(cache_dtype=bf16) (rollout.kv_cache_dtype) on an fp32 model: the cache (prefix store included)
    holds bf16, so every key/value is rounded once; the logprobs of the sampled tokens stay those of the fp32
    model to bf16 precision, and the greedy tokens are the fp32 cache's. Measured on an AMD EPYC: max |logprob
    diff| vs a cache-free fp32 forward 5.6e-3 with the bf16 cache and 9.5e-7 with the fp32 one (these 3 prompts,
    both paths); the bounds leave ~10x on each side."""
    def run(cache_dtype):
        sampler = make_sampler(model, SAMPLE, cache_dtype=cache_dtype)
        if continuous:
            slots = sampler.continuous(num_slots=3, decode_steps=8)
            for i, prompt in enumerate(PROMPTS):
                slots.submit(i, prompt, max_new_tokens=6, rng=jax.random.key(20 + i))
            outs = {}
            while slots.has_work():
                outs.update(slots.step())
            cache = slots.cache
        else:
            session = sampler.session(compact=False)
            outs = session.step(dict(enumerate(PROMPTS)), max_new_tokens=6,
                                rng={i: jax.random.key(20 + i) for i in range(len(PROMPTS))})
            cache = session.cache
        assert cache.k.dtype == cache.v.dtype == (cache_dtype or jnp.float32)
        return outs

    def max_logprob_error(outs):
        worst = 0.0
        for i, prompt in enumerate(PROMPTS):
            ids = outs[i].token_ids.tolist()
            logp = jax.nn.log_softmax(full_logits(model, list(prompt) + ids), -1)
            expected = [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)]
            worst = max(worst, float(np.abs(np.subtract(outs[i].logprobs, expected)).max()))
        return worst

    half, full = run(jnp.bfloat16), run(None)
    assert [half[i].token_ids.tolist() for i in range(3)] == [full[i].token_ids.tolist() for i in range(3)]
    err_half, err_full = max_logprob_error(half), max_logprob_error(full)
    assert err_full < 1e-4 and 1e-5 < err_half < 0.05, (err_half, err_full)


@pytest.mark.parametrize("continuous", [False, True])
def test_kv_slots_grown_on_demand_sample_what_reserved_slots_do(continuous):
    """Sampler(reserve_budget=False) (rollout.reserve_kv_budget=False): sibling rows / decode slots start with
    min_cache_len own slots and grow to the next power of two as the conversation needs, instead of the whole
    budget at once. Same keys → same tokens; logprobs equal up to fp32 summation order over more or fewer key
    blocks (measured max |diff| 0 on an AMD EPYC, bound 1e-5 as in the prefix-store test); the cache holds
    fewer slots than the reserved one, and more than it started with once the turns outgrow min_cache_len."""
    cfg = ModelConfig(**{**CFG.__dict__, "attention_block": 16})
    model = Decoder(cfg, rngs=nnx.Rngs(4))
    prompts = {"a": list(range(3, 30)), "b": [9, 8] + list(range(20, 40))}
    keys = {(task, g): jax.random.key(7 * i + g) for i, task in enumerate(prompts) for g in range(2)}

    def run(reserve: bool):
        sampler = Sampler(model, params=SAMPLE, decode_steps_per_chunk=4, min_cache_len=16, max_cache_len=256,
                          reserve_budget=reserve)
        outs, lengths = {}, []
        if continuous:
            slots = sampler.continuous(num_slots=2, decode_steps=4)
            turns = {key: 0 for key in keys}
            for key in keys:
                slots.submit(key, prompts[key[0]], max_new_tokens=8, rng=keys[key])
            while slots.has_work():
                for key, out in slots.step().items():
                    outs[key, turns[key]] = (out.token_ids.tolist(), out.logprobs.tolist())
                    turns[key] += 1
                    if turns[key] < 3:
                        slots.submit(key, [5, 6, turns[key]], max_new_tokens=8, rng=keys[key])
                    else:
                        slots.release(key)
                lengths.append(slots.cache.max_len)
            return outs, lengths
        session = sampler.session()
        chunks = {key: prompts[key[0]] for key in keys}
        for turn in range(3):
            step = session.step(chunks, max_new_tokens=8, rng=dict(keys))
            outs.update({(key, turn): (o.token_ids.tolist(), o.logprobs.tolist()) for key, o in step.items()})
            lengths.append(session.cache.max_len)
            chunks = {key: [5, 6, turn] for key in chunks}
        return outs, lengths

    (grown, grown_lengths), (reserved, reserved_lengths) = run(False), run(True)
    assert {k: ids for k, (ids, _) in grown.items()} == {k: ids for k, (ids, _) in reserved.items()}
    assert max(np.abs(np.subtract(grown[k][1], reserved[k][1])).max() for k in grown) < 1e-5
    assert max(grown_lengths) < min(reserved_lengths)  # never the reserved budget
    assert grown_lengths[-1] > grown_lengths[0] >= 16  # grew as the turns added tokens
