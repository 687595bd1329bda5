"""The conditional log-likelihood estimator against the exact expectation over every mask subset, batched
against per-example, and the greedy check against the one-token-per-step sampler."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, generate
from llada_jax.eval import greedy_check, log_likelihood
from llada_jax.eval.likelihood import block_answer_masks, mask_counts

MASK = 511


@pytest.fixture(scope="module")
def model():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))


def brute_force(model, prompt, answer, batch_size, cfg_scale):
    """The estimator's exact expectation: k uniform on 1..L, the stratified counts m_r(k), and for each count
    the average over every answer subset of that size of (L / m) * the summed cross-entropy of the subset,
    the model run once per subset. Written with numpy from the definition (not the package's code)."""
    L, P = len(answer), len(prompt)
    subsets = [s for m in range(1, L + 1) for s in itertools.combinations(range(L), m)]
    rows = np.array([prompt + [MASK if i in s else t for i, t in enumerate(answer)] for s in subsets])
    logits = np.asarray(model(jnp.asarray(rows)), np.float64)
    if cfg_scale > 0:
        un = rows.copy()
        un[:, :P] = MASK
        un_logits = np.asarray(model(jnp.asarray(un)), np.float64)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    logits = logits[:, P:]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    by_size = {}
    for s, lp in zip(subsets, logp):
        by_size.setdefault(len(s), []).append(-sum(lp[i, answer[i]] for i in s))
    mean_by_size = {m: np.mean(v) for m, v in by_size.items()}  # E over subsets of size m of the summed CE
    exact = unweighted = 0.0
    for k in range(1, L + 1):
        spaced = np.round(np.linspace(k, k + (batch_size - 1) * L / batch_size, batch_size))  # half to even
        counts = ((spaced.astype(int) - 1) % L) + 1
        exact += np.mean([mean_by_size[m] * L / m for m in counts])
        unweighted += np.mean([mean_by_size[m] for m in counts])
    return -exact / L, -unweighted / L


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_estimate_agrees_with_the_exact_expectation_within_its_standard_error(model, cfg_scale):
    prompt, answer = [3, 17, 42, 99], [250, 8, 1, 300, 65]  # L = 5, batch 4: offsets 0, 1.25, 2.5, 3.75
    exact, unweighted = brute_force(model, prompt, answer, 4, cfg_scale)
    est, err = log_likelihood(model, prompt, answer, mc_num=1024, batch_size=4, cfg_scale=cfg_scale, rng=0,
                              return_stderr=True)
    assert 0 < err < 0.02 * abs(exact)
    assert abs(est - exact) < 3 * err, (est, exact, err)
    assert abs(est - unweighted) > 10 * err  # the check is sharp enough to see a missing L / m weight


def test_mask_counts_are_the_official_stratification():
    got = np.asarray(jax.vmap(lambda k: mask_counts(k, jnp.int32(5), 4))(jnp.arange(1, 6)))
    # round(k + [0, 1.25, 2.5, 3.75]) half to even, then ((x - 1) mod 5) + 1
    assert got.tolist() == [[1, 2, 4, 5], [2, 3, 4, 1], [3, 4, 1, 2], [4, 5, 1, 3], [5, 1, 3, 4]]


def test_batched_examples_equal_each_example_alone(model):
    prompts = [[3, 17, 42], [8, 1, 300, 65, 12, 77, 5], [9]]
    answers = [[250, 8, 1], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]
    keys = jax.random.split(jax.random.key(3), 3)
    opts = dict(mc_num=8, batch_size=4, cfg_scale=0.5)
    batch = log_likelihood(model, prompts, answers, rng=keys, examples_per_call=4, return_stderr=True, **opts)
    for i in range(3):
        alone = log_likelihood(model, prompts[i], answers[i], rng=keys[i:i + 1], examples_per_call=1,
                               return_stderr=True, **opts)
        np.testing.assert_allclose(batch.log_likelihood[i], alone.log_likelihood, rtol=2e-5)
        np.testing.assert_allclose(batch.stderr[i], alone.stderr, rtol=1e-3)
    assert log_likelihood(model, [1, 2], [], **opts) == 0.0


def test_greedy_check_is_the_one_token_per_step_decode(model):
    prompts = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77]]
    ids = np.array([[MASK, MASK] + prompts[0], prompts[1]], np.int32)  # left-padded (the pad id is ignored)
    attn = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    decoded = np.asarray(generate(model, ids, attn, method="fixed_length", gen_length=4, steps=4))[:, 6:].tolist()
    with_cfg = np.asarray(generate(model, np.array([prompts[0]]), method="fixed_length", gen_length=4, steps=4,
                                   cfg_scale=1.0))[0, 4:].tolist()
    assert greedy_check(model, prompts, decoded).tolist() == [True, True]
    wrong = [decoded[0][:2] + [(decoded[0][2] + 1) % 500] + decoded[0][3:], decoded[1]]
    assert greedy_check(model, prompts, wrong).tolist() == [False, True]
    assert greedy_check(model, prompts[0], with_cfg, cfg_scale=1.0)
    assert with_cfg != decoded[0] and not greedy_check(model, prompts[0], with_cfg)  # CFG changes the decode


def test_bad_input_is_an_error(model):
    with pytest.raises(ValueError, match="mc_num 10 must be a multiple of batch_size 4"):
        log_likelihood(model, [1], [2], mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match="answer contains the mask token 511"):
        log_likelihood(model, [1], [2, MASK])
    with pytest.raises(ValueError, match="prompt_ids has 2 examples but answer_ids has 1"):
        log_likelihood(model, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="exceed the model's max_sequence_length"):
        greedy_check(model, [1] * 500, [2] * 20)


def test_eval_likelihood_command_writes_the_api_results(model, tmp_path, capsys):
    import json

    from llada_jax.checkpoints.orbax_model import save_model
    from llada_jax.cli import main

    run = save_model(model, str(tmp_path / "run"))  # no tokenizer: id pairs only
    pairs = [{"id": "a", "prompt_ids": [3, 17, 42], "answer_ids": [250, 8]}, {"prompt_ids": [9], "answer_ids": [7]}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "out.jsonl"
    args = ["eval-likelihood", "--model", run, "--input", str(src), "--output", str(out), "--mc_num", "8",
            "--batch_size", "4", "--seed", "3"]
    assert main([*args, "--greedy"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = log_likelihood(model, [p["prompt_ids"] for p in pairs], [p["answer_ids"] for p in pairs], mc_num=8,
                          batch_size=4, rng=3, return_stderr=True)
    greedy = greedy_check(model, [p["prompt_ids"] for p in pairs], [p["answer_ids"] for p in pairs])
    assert [line.get("id") for line in lines] == ["a", None] and [line["answer_tokens"] for line in lines] == [2, 1]
    np.testing.assert_allclose([line["log_likelihood"] for line in lines], want.log_likelihood, rtol=1e-6)
    assert [line["greedy"] for line in lines] == greedy.tolist()
    src.write_text('{"prompt": "hi", "answer": "there"}\n')
    assert main(args) == 2 and "text pairs need a tokenizer" in capsys.readouterr().err
    assert main([*args[:-4], "--mc_num", "10", "--batch_size", "4"]) == 2
    assert "--mc_num 10 must be a multiple of --batch_size 4" in capsys.readouterr().err
    for text, message in (('{"prompt_ids": [1], "answer_ids": [2]}\n{"prompt_ids": [1\n', "line 2: invalid JSON"),
                          ("[1, 2]\n", "line 1: expected a JSON object, got list")):
        src.write_text(text)
        assert main(args) == 2 and f"pairs.jsonl {message}" in capsys.readouterr().err


# --- a shift_logits model (the prediction for position i read from the output at i - 1) -----------------------


@pytest.fixture(scope="module")
def shifted():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(shift_logits=True), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_shifted_one_token_answers_are_the_model_logits(shifted, cfg_scale):
    # A one-token answer is always the one masked position: the estimate is exactly minus its cross-entropy
    # under model(prompt + [MASK]) (CFG: against the prompt masked), here read straight from the model's logits.
    prompts = [[3, 17, 42], [8, 1, 300, 65, 12, 77, 5], [9], [40, 41, 42, 43]]
    answers = [[250], [7], [100], [3]]
    got = log_likelihood(shifted, prompts, answers, mc_num=8, batch_size=4, cfg_scale=cfg_scale, examples_per_call=4)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        logits = np.asarray(shifted(jnp.asarray([p + [MASK]])), np.float64)[0, -1]
        if cfg_scale > 0:
            un = np.asarray(shifted(jnp.asarray([[MASK] * len(p) + [MASK]])), np.float64)[0, -1]
            logits = un + (cfg_scale + 1) * (logits - un)
        want = logits[a[0]] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    unshifted = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))  # the same parameters
    other = log_likelihood(unshifted, prompts, answers, mc_num=8, batch_size=4, cfg_scale=cfg_scale,
                           examples_per_call=4)
    assert np.abs(other - got).min() > 1e-3


def test_shifted_estimate_agrees_with_the_exact_expectation(shifted):
    prompt, answer = [3, 17, 42, 99], [250, 8, 1, 300, 65]
    exact, unweighted = brute_force(shifted, prompt, answer, 4, 0.0)  # from model(ids), shifted by the model
    est, err = log_likelihood(shifted, prompt, answer, mc_num=1024, batch_size=4, rng=0, return_stderr=True)
    assert abs(est - exact) < 3 * err and abs(est - unweighted) > 10 * err, (est, exact, unweighted, err)


def test_shifted_greedy_check_is_the_shifted_decode(shifted):
    prompts = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77]]
    ids = np.array([[MASK, MASK] + prompts[0], prompts[1]], np.int32)
    attn = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    decoded = np.asarray(generate(shifted, ids, attn, method="fixed_length", gen_length=4, steps=4))[:, 6:].tolist()
    assert greedy_check(shifted, prompts, decoded).tolist() == [True, True]
    wrong = [decoded[0], decoded[1][:3] + [(decoded[1][3] + 1) % 500]]
    assert greedy_check(shifted, prompts, wrong).tolist() == [True, False]


def test_shifted_empty_prompt_reads_the_answer_position_itself(shifted):
    got = log_likelihood(shifted, [], [250], mc_num=4, batch_size=4)
    logits = np.asarray(shifted(jnp.asarray([[MASK]])), np.float64)[0, 0]  # position 0 keeps its own output
    want = logits[250] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- a block_causal model (block diffusion): the sum over blocks of each block's bound given the clean blocks before
# it; blocks laid from the end of the prompt --------------------------------------------------------------------


BLOCK = 2


@pytest.fixture(scope="module")
def blocky():
    return LLaDAForMaskedLM(LLaDAConfig.tiny(attention_type="block_causal", block_size=BLOCK), rngs=nnx.Rngs(0))


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def block_logp(model, prompt, answer, start, noisy_block):
    """log-probabilities [n, V] of a noisy answer block starting at answer index `start`, from its own forward
    over prompt ++ the clean answer before it ++ the block, blocks laid from the prompt's end (nothing later)."""
    ids = prompt + answer[:start] + noisy_block
    logits = model(jnp.asarray([ids]), block_anchor=len(prompt))[0, len(prompt) + start:]
    return log_softmax(logits)


def block_row_loss(model, prompt, answer, masked):
    """One Monte Carlo row of the block estimator from the definition: sum over blocks of (n_b / k_b) times the
    summed cross-entropy of the block's masked tokens, each block predicted by its own forward."""
    loss = 0.0
    for start in range(0, len(answer), BLOCK):
        idx = range(start, min(start + BLOCK, len(answer)))
        chosen = [i for i in idx if masked[i]]
        lp = block_logp(model, prompt, answer, start, [MASK if masked[i] else answer[i] for i in idx])
        loss += len(idx) / len(chosen) * -sum(lp[i - start, answer[i]] for i in chosen)
    return loss


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_block_one_token_answers_are_the_model_logits(blocky, cfg_scale):
    # a one-token answer is one block with its one position masked: the estimate is exactly its log-probability
    # under model(prompt ++ [MASK]) with the blocks laid from the prompt's end (CFG: against the prompt masked)
    prompts = [[3, 17, 42], [8, 1, 300, 65, 12, 77, 5], [9], [40, 41, 42, 43]]
    answers = [[250], [7], [100], [3]]
    got = log_likelihood(blocky, prompts, answers, mc_num=8, batch_size=4, cfg_scale=cfg_scale, examples_per_call=4)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        logits = np.asarray(blocky(jnp.asarray([p + [MASK]]), block_anchor=len(p)), np.float64)[0, -1]
        if cfg_scale > 0:
            un = np.asarray(blocky(jnp.asarray([[MASK] * (len(p) + 1)]), block_anchor=len(p)), np.float64)[0, -1]
            logits = un + (cfg_scale + 1) * (logits - un)
        np.testing.assert_allclose(got[i], log_softmax(logits)[a[0]], rtol=1e-5, atol=1e-5)
    bidirectional = LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0))  # the same parameters
    other = log_likelihood(bidirectional, prompts, answers, mc_num=8, batch_size=4, cfg_scale=cfg_scale,
                           examples_per_call=4)
    assert np.abs(other - got).min() > 1e-3  # the prompt's blocks see no later prompt block


@pytest.mark.parametrize("seed", range(4))
def test_block_estimator_rows_are_the_per_block_definition(blocky, seed):
    # the estimator's rows (its masks redrawn from the same keys) against per-block forwards: the one forward over
    # noisy answer ++ prompt ++ clean answer gives each block the numbers of its own forward; the weights n_b / k_b
    # include a last block of one token
    prompt, answer = [3, 17, 42, 99], [250, 8, 1, 300, 65]
    got = log_likelihood(blocky, prompt, answer, mc_num=4, batch_size=4, rng=seed)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)  # example 0, Monte Carlo batch 0
    masked, _ = block_answer_masks(key, jnp.int32(len(answer)), 4, 16, BLOCK)
    masked = np.asarray(masked)[:, :len(answer)]
    assert masked.any(axis=1).all() and not np.asarray(masked).all()
    want = np.mean([block_row_loss(blocky, prompt, answer, row) for row in masked])
    np.testing.assert_allclose(got, -want, rtol=1e-5)


def test_block_estimate_agrees_with_the_exact_sum_of_block_bounds(blocky):
    # the exact expectation: per block, k uniform on 1..n_b and every subset of size k, each block's
    # cross-entropies from its own forward given the clean blocks before it
    prompt, answer = [3, 17, 42, 99], [250, 8, 1, 300, 65]
    exact = unweighted = 0.0
    for start in range(0, len(answer), BLOCK):
        idx = list(range(start, min(start + BLOCK, len(answer))))
        n = len(idx)
        for k in range(1, n + 1):
            terms = []
            for subset in itertools.combinations(idx, k):
                lp = block_logp(blocky, prompt, answer, start, [MASK if i in subset else answer[i] for i in idx])
                terms.append(-sum(lp[i - start, answer[i]] for i in subset))
            exact += np.mean(terms) * (n / k) / n
            unweighted += np.mean(terms) / n
    est, err = log_likelihood(blocky, prompt, answer, mc_num=1024, batch_size=4, rng=0, return_stderr=True)
    assert 0 < err < 0.02 * exact
    assert abs(est + exact) < 3 * err, (est, -exact, err)
    assert abs(est + unweighted) > 10 * err  # sharp enough to see a missing n_b / k_b weight


def test_block_batched_examples_equal_each_example_alone(blocky):
    prompts = [[3, 17, 42], [8, 1, 300, 65, 12, 77, 5], [9]]
    answers = [[250, 8, 1], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56]]
    keys = jax.random.split(jax.random.key(3), 3)
    opts = dict(mc_num=8, batch_size=4, cfg_scale=0.5)
    batch = log_likelihood(blocky, prompts, answers, rng=keys, examples_per_call=4, **opts)
    for i in range(3):
        alone = log_likelihood(blocky, prompts[i], answers[i], rng=keys[i:i + 1], examples_per_call=1, **opts)
        np.testing.assert_allclose(batch[i], alone, rtol=2e-5)


def test_block_estimate_on_a_mesh_equals_one_device(blocky):
    from llada_jax import sharding

    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    prompts, answers = [[3, 17, 42], [9], [8, 1, 300, 65, 12]], [[250, 8, 1], [40, 41, 42, 43, 44], [7]]
    opts = dict(mc_num=8, batch_size=4, rng=2, examples_per_call=2)
    np.testing.assert_allclose(log_likelihood(blocky, prompts, answers, mesh=mesh, **opts),
                               log_likelihood(blocky, prompts, answers, **opts), rtol=1e-5)
    assert greedy_check(blocky, prompts, answers, mesh=mesh).tolist() == greedy_check(blocky, prompts, answers).tolist()


def block_greedy(model, prompt, length, blockwise=True):
    """The one-token-per-step greedy decode, from the definition: each step fills the masked position (of the
    first block with a mask left when `blockwise`) whose argmax has the highest probability."""
    x = [MASK] * length
    while MASK in x:
        lp = log_softmax(model(jnp.asarray([prompt + x]), block_anchor=len(prompt))[0, len(prompt):])
        candidates = [i for i in range(length) if x[i] == MASK]
        if blockwise:
            candidates = [i for i in candidates if i // BLOCK == candidates[0] // BLOCK]
        best = max(candidates, key=lambda i: (lp[i].max(), -i))
        x[best] = int(np.argmax(lp[best]))
    return x


def test_block_greedy_check_decodes_block_by_block(blocky):
    prompts = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77]]
    decoded = [block_greedy(blocky, p, 5) for p in prompts]
    assert greedy_check(blocky, prompts, decoded).tolist() == [True, True]
    wrong = [decoded[0], decoded[1][:3] + [(decoded[1][3] + 1) % 500] + decoded[1][4:]]
    assert greedy_check(blocky, prompts, wrong).tolist() == [True, False]
    anywhere = [block_greedy(blocky, p, 5, blockwise=False) for p in prompts]
    assert anywhere != decoded and not greedy_check(blocky, prompts, anywhere).all()


def test_block_greedy_check_agrees_with_the_block_diffusion_sampler(blocky):
    # one committed token per step (steps = gen_length), temperature 0: the sampler's decode is greedy
    prompts = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77]]
    ids = np.array([[MASK, MASK] + prompts[0], prompts[1]], np.int32)  # left-padded (the pad id is ignored)
    attn = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], np.int32)
    decoded = np.asarray(generate(blocky, ids, attn, method="block_diffusion", gen_length=6, steps=6))[:, 6:]
    assert greedy_check(blocky, prompts, decoded.tolist()).tolist() == [True, True]


def test_lm_eval_adapter_scores_a_block_model_with_the_block_estimator(tmp_path):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e '.[eval]')")
    from types import SimpleNamespace

    from llada_jax.data.bpe import build_bpe_tokenizer
    from llada_jax.eval.likelihood import encode_pair
    from llada_jax.eval.lm_eval_adapter import LLaDAJaxLM
    from llada_jax.tokenizer import config_overrides

    texts = ["two plus two is four.", "the sky is blue.", "grass is green."] * 4
    helper = build_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    model = LLaDAForMaskedLM(LLaDAConfig.tiny(**config_overrides(helper), attention_type="block_causal",
                                              block_size=BLOCK, max_sequence_length=64), rngs=nnx.Rngs(1))
    lm = LLaDAJaxLM(model=model, tokenizer=helper, mc_num=8, batch_size=4, seed=5, is_check_greedy=True,
                    sampling_method="block_diffusion", gen_length=4, steps=4)  # the sampler of block models
    pairs = [("two plus two is", " four."), ("the sky is", " blue and green."), ("grass is", " green")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs], disable_tqdm=True)
    encoded = [encode_pair(helper, *p) for p in pairs]
    prompts, answers = [p for p, _ in encoded], [a for _, a in encoded]
    assert max(map(len, answers)) > BLOCK  # several blocks
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(np.arange(len(pairs)))
    want = log_likelihood(model, prompts, answers, mc_num=8, batch_size=4, rng=keys)
    np.testing.assert_allclose([ll for ll, _ in got], want, rtol=1e-5)
    assert [g for _, g in got] == greedy_check(model, prompts, answers).tolist()
    bidirectional = LLaDAForMaskedLM(LLaDAConfig.tiny(**config_overrides(helper), max_sequence_length=64),
                                     rngs=nnx.Rngs(1))  # the same parameters, read by the LLaDA estimator
    other = log_likelihood(bidirectional, prompts, answers, mc_num=8, batch_size=4, rng=keys)
    assert np.abs(other - want).min() > 1e-3
