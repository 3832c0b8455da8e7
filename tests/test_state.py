"""Correct however it is called: nothing a call leaves behind (caches, id flags, a swapped model's
counters) changes what a later call does, whichever thread, mode or outcome either had.

Each numbered case of the issue that asked for this is a regression test here, on both paths
(plain PyTorch, and the kernels: compiled on a GPU, interpreted on a CPU): a first call under
``torch.inference_mode()`` or ``FakeTensorMode`` poisoning later ones, bad ids raised in the wrong
thread or lost, concurrent interpreted launches, first calls racing on the import, a failing
cached forward moving its counter, and the smaller ones. The stress test at the end mixes all of
it in several threads for a fixed time and counts wrong results, spurious and lost errors.
"""
import copy
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from conftest import BACKENDS, TRITON_DEVICE, requires_cuda
from gpt_models import Block, GPTModel, GPTModelKVOptimized, MinGPT, NanoConfig, NanoGPT
from helpers import TOLERANCES
from tokemb_fast import (FusedInputEmbedding, autograd, check_ids_now, functional, fused_input_embedding, id_check,
                         input_embedding_reference, swap_input_embeddings)

DEVICE = TRITON_DEVICE
HAS_TRITON_PATH = "triton" in BACKENDS
triton_only = pytest.mark.skipif(not HAS_TRITON_PATH, reason="the id flag is the Triton path's")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_caches():
    """Forget every process-wide cache, so that the test's first call is the first of its key."""
    functional._positions.clear()
    functional._prepared.clear()
    autograd._constants.clear()
    yield


def run_in_threads(*bodies, timeout=300):
    """Run each body in its own thread; re-raise the first exception any of them raised."""
    errors = []

    def wrapped(body):
        def run():
            try:
                body()
                check_ids_now()  # a thread ends with nothing of its own left unraised
            except BaseException as error:  # noqa: BLE001  (reported to the test below)
                errors.append(error)
        return run

    threads = [threading.Thread(target=wrapped(body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def expected_sum(module, ids, **kwargs):
    return input_embedding_reference(ids, module.tok_emb.weight.detach(), module.pos_emb.weight.detach(), **kwargs)


def assert_gradients_match(module, ids, grad_out):
    tok = module.tok_emb.weight.detach().clone().requires_grad_()
    pos = module.pos_emb.weight.detach().clone().requires_grad_()
    input_embedding_reference(ids, tok, pos).backward(grad_out)
    torch.testing.assert_close(module.tok_emb.weight.grad, tok.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(module.pos_emb.weight.grad, pos.grad, **TOLERANCES[torch.float32])


# --- 1. modes: what the first call of a key leaves must serve every later call -----------------

def test_a_first_call_under_inference_mode_leaves_training_working(backend, fresh_caches):
    module = FusedInputEmbedding(20, 12, 8, dropout=0.25, token_scale=2.0, device=DEVICE)
    other = FusedInputEmbedding(20, 12, 8, device=DEVICE)
    ids = torch.randint(0, 20, (3, 7), device=DEVICE)
    with torch.inference_mode():
        assert module(ids).is_inference()
        other(ids)
    module.eval()  # (dropout off: compared with the reference)
    for layer in (module, other):
        out = layer(ids)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)  # (saved for the backward: the positions the inference call made)
        torch.testing.assert_close(out, expected_sum(layer, ids, token_scale=layer.token_scale), rtol=0, atol=0)
    assert_gradients_match(other, ids, grad_out)
    module.train()  # dropout's constants were made under inference mode too
    (grad,) = torch.autograd.grad(module(ids).square().sum(), module.tok_emb.weight, create_graph=True)
    grad.sum().backward()


def test_a_swapped_model_trains_after_an_inference_mode_generation(backend, fresh_caches):
    torch.manual_seed(0)
    original = GPTModel().to(DEVICE)
    swapped = swap_input_embeddings(copy.deepcopy(original))
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    with torch.inference_mode():
        swapped.eval()(ids)
    for model in (original, swapped):
        model.eval()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, parameter), twin in zip(original.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(twin.grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_first_call_under_fake_tensor_mode_leaves_real_calls_working(backend, fresh_caches):
    module = FusedInputEmbedding(20, 12, 8, device=DEVICE)
    ids = torch.randint(0, 20, (3, 7), device=DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = module(ids)
    assert isinstance(fake, FakeTensor) and fake.shape == (3, 7, 8)
    out = module(ids)
    assert not isinstance(out, FakeTensor)
    torch.testing.assert_close(out, expected_sum(module, ids), rtol=0, atol=0)
    out.sum().backward()
    # The other way round: after real calls, a strict FakeTensorMode (fake inputs only) gets nothing real.
    with FakeTensorMode() as mode:
        fake = fused_input_embedding(mode.from_tensor(ids), mode.from_tensor(module.tok_emb.weight),
                                     mode.from_tensor(module.pos_emb.weight))
    assert isinstance(fake, FakeTensor) and fake.shape == (3, 7, 8)


def test_every_cache_holds_plain_tensors_whatever_mode_filled_it(backend, fresh_caches):
    module = FusedInputEmbedding(20, 12, 8, dropout=0.5, token_scale=3.0, device=DEVICE)
    ids = torch.randint(0, 20, (2, 5), device=DEVICE)

    def in_a_new_thread_under(mode_factory):
        def body():
            with mode_factory():
                module(ids)
                module(ids)
        run_in_threads(body)

    in_a_new_thread_under(torch.inference_mode)
    in_a_new_thread_under(lambda: FakeTensorMode(allow_non_fake_inputs=True))
    with torch.inference_mode():
        module(ids)
    kept = list(functional._positions.values()) + list(autograd._constants.values()) + \
        list(id_check._graph_flags.values()) + \
        [tensor for guard in id_check._thread_guards().values() for tensor in (guard.flag, guard.host)]
    assert kept, "nothing was cached: the test checks nothing"
    for tensor in kept:
        assert not tensor.is_inference() and type(tensor) is torch.Tensor, tensor


@triton_only
def test_an_id_flag_made_under_inference_mode_serves_calls_outside_it(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")

    def body():  # a new thread: its first call makes its flag
        module = FusedInputEmbedding(10, 6, 4, device=DEVICE)
        with torch.inference_mode():
            module(torch.tensor([[1, 2]], device=DEVICE))
        out = module(torch.tensor([[1, 12]], device=DEVICE))
        with pytest.raises(IndexError, match="token id 12 is out of range"):
            out.sum().backward()
        with torch.inference_mode():
            module(torch.tensor([[1, 13]], device=DEVICE))
        with pytest.raises(IndexError, match="token id 13 is out of range"):
            module(torch.tensor([[1, 2]], device=DEVICE))  # the next call, outside inference mode
    run_in_threads(body)


# --- 2. threads: a bad id is its own thread's error ----------------------------------------------

@triton_only
def test_a_bad_id_is_raised_in_its_own_thread_and_nowhere_else(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    good_module, bad_module = FusedInputEmbedding(40, 6, 4, device=DEVICE), FusedInputEmbedding(30, 6, 4, device=DEVICE)
    good_ids = torch.tensor([[35, 2, 3]], device=DEVICE)  # valid for the 40-row table only
    phase = threading.Barrier(2, timeout=60)

    def bad():
        pending = bad_module(torch.tensor([[-3, 1]], device=DEVICE))  # a training call: raised by its backward
        phase.wait()
        phase.wait()  # (the other thread's calls)
        with pytest.raises(IndexError, match="token id -3 is out of range for vocab size 30"):
            pending.sum().backward()
        assert bad_module.tok_emb.weight.grad is None
        with torch.no_grad():
            bad_module(torch.tensor([[1, 99]], device=DEVICE))  # inference: raised at this thread's next call
        phase.wait()
        phase.wait()
        with pytest.raises(IndexError, match="token id 99 is out of range for vocab size 30"):
            bad_module(torch.tensor([[1, 2]], device=DEVICE))

    def good():
        for _ in range(2):
            phase.wait()
            for _ in range(3):
                good_module(good_ids).sum().backward()
                with torch.no_grad():
                    good_module(good_ids)
            check_ids_now()
            phase.wait()

    run_in_threads(bad, good)


@triton_only
def test_check_ids_now_raises_the_calling_threads_errors_only(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(10, 6, 4, device=DEVICE)
    recorded = threading.Event()
    checked = threading.Event()

    def bad():
        with torch.no_grad():
            module(torch.tensor([[11]], device=DEVICE))
        recorded.set()
        checked.wait(60)
        with pytest.raises(IndexError, match="token id 11"):
            check_ids_now()

    def other():
        recorded.wait(60)
        check_ids_now()
        check_ids_now(DEVICE)
        checked.set()

    run_in_threads(bad, other)


@triton_only
def test_a_raise_for_one_call_covers_the_later_pending_calls_instead_of_losing_them(monkeypatch):
    # Two training calls with bad ids, then the first one's backward: its error is raised (and the
    # flag cleared); the second call's bad id must not vanish with it. It is either in that error
    # (the flag is sticky: one error can stand for several calls) or raised by its own backward.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(10, 6, 4, device=DEVICE)
    first = module(torch.tensor([[1, 99]], device=DEVICE))
    second = module(torch.tensor([[1, -7]], device=DEVICE))
    with pytest.raises(IndexError) as raised:
        first.sum().backward()
    if "token id -7" not in str(raised.value):
        with pytest.raises(IndexError, match="token id -7"):
            second.sum().backward()
    check_ids_now()


@triton_only
def test_a_thread_that_ends_with_a_bad_id_pending_leaves_it_to_check_ids_now(monkeypatch):
    import gc
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(10, 6, 4, device=DEVICE)

    def body():
        with torch.no_grad():
            module(torch.tensor([[1, 42]], device=DEVICE))  # raised at this thread's next call: none comes

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    gc.collect()  # (the ended thread's table and its guard are collected)
    with pytest.raises(IndexError, match="token id 42 is out of range"):
        check_ids_now()
    check_ids_now()


@triton_only
@pytest.mark.parametrize("option", ["max_norm", "dropout"])
def test_a_call_raising_an_earlier_calls_error_changes_nothing_first(monkeypatch, option):
    # The next call raises the earlier inference call's error: before it renormalises anything or
    # draws a dropout seed from the generator.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    kwargs = {"max_norm": 0.5} if option == "max_norm" else {"dropout_p": 0.5}
    token_weight = torch.randn(10, 4, device=DEVICE) * 3
    position_weight = torch.randn(6, 4, device=DEVICE)
    with torch.no_grad():
        fused_input_embedding(torch.tensor([[1, 50]], device=DEVICE), token_weight, position_weight)
    before, state = token_weight.clone(), torch.random.get_rng_state()
    with pytest.raises(IndexError, match="token id 50"):
        fused_input_embedding(torch.tensor([[1, 2]], device=DEVICE), token_weight, position_weight, **kwargs)
    assert torch.equal(token_weight, before) and torch.equal(torch.random.get_rng_state(), state)


# --- 3. the interpreter and the import from many threads at once ---------------------------------

def test_first_calls_from_many_threads_at_once_import_and_launch_safely():
    # A fresh interpreter, so that the first calls really are the first: the kernels' module is
    # imported by whichever thread gets there first while the others call too.
    script = textwrap.dedent("""
        import threading, torch
        from tokemb_fast import fused_input_embedding, check_ids_now
        barrier, errors, results = threading.Barrier(8), [], []
        token_weight, position_weight = torch.randn(50, 16), torch.randn(12, 16)
        def body(seed):
            try:
                ids = torch.randint(0, 50, (2 + seed % 3, 12), generator=torch.Generator().manual_seed(seed))
                barrier.wait()
                for _ in range(3):
                    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
                    expected = token_weight[ids] + position_weight[torch.arange(12)]
                    results.append(torch.equal(out, expected))
                check_ids_now()
            except BaseException as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=body, args=(seed,)) for seed in range(8)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        print("errors", errors, "results", len(results), all(results))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", TOKEMB_FAST_BACKEND="auto")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "errors [] results 24 True", done.stdout + done.stderr[-3000:]


def test_the_function_on_cpu_tensors_without_the_interpreter_says_how_to_fix_it():
    script = textwrap.dedent("""
        import torch
        from tokemb_fast import FusedInputEmbeddingFunction, fused_input_embedding
        ids, token_weight, position_weight = torch.tensor([[1, 2]]), torch.randn(5, 4), torch.randn(3, 4)
        for call in (lambda: FusedInputEmbeddingFunction.apply(ids, token_weight, position_weight),
                     lambda: fused_input_embedding(ids, token_weight, position_weight, backend="triton")):
            try:
                call()
            except RuntimeError as error:
                print(type(error).__name__, str(error))
    """)
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "TOKEMB_FAST_BACKEND")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], done.stdout
    assert "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1" in lines[0]


# --- 4. a failing call changes nothing: swapped KV-cache forwards fail as the originals do ----------

class GPTModelKVAsserting(GPTModelKVOptimized):
    """The later gpt_with_kv_cache_optimized.py: its cached forward asserts that the positions fit
    before its counter moves."""

    def forward(self, in_idx, use_cache=False):
        if use_cache:
            assert self.ptr_current_pos + in_idx.shape[1] <= self.pos_emb.num_embeddings, "Position embedding overflow"
        return super().forward(in_idx, use_cache)


def overflow(model, ids):
    try:
        model(ids, use_cache=True)
    except Exception as error:  # noqa: BLE001
        return type(error)
    return None


@pytest.mark.parametrize("cls, expected_error, moves", [(GPTModelKVAsserting, AssertionError, False),
                                                        (GPTModelKVOptimized, IndexError, True)])
def test_a_cached_forward_that_overflows_fails_as_the_originals_does(backend, cls, expected_error, moves):
    torch.manual_seed(0)
    original = cls().to(DEVICE).eval()  # context_length 16
    swapped = swap_input_embeddings(copy.deepcopy(original))
    prompt = torch.randint(0, 61, (1, 14), device=DEVICE)
    too_long = torch.randint(0, 61, (1, 3), device=DEVICE)
    with torch.no_grad():
        for model in (original, swapped):
            model.reset_kv_cache()
            model(prompt, use_cache=True)
        for attempt in range(3):
            got = [(overflow(model, too_long), model.ptr_current_pos) for model in (original, swapped)]
            position = 14 + (3 * (attempt + 1) if moves else 0)
            assert got == [(expected_error, position)] * 2, got
        if not moves:  # nothing moved: the model can go on with a step that fits
            step = torch.randint(0, 61, (1, 1), device=DEVICE)
            torch.testing.assert_close(swapped(step, use_cache=True), original(step, use_cache=True))


def test_the_packages_kv_cache_model_fails_as_the_original_does(backend):
    kv_gpt2 = pytest.importorskip("llms_from_scratch.kv_cache.gpt2", reason="llms-from-scratch is not installed")
    config = {"vocab_size": 61, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
              "qkv_bias": False}
    torch.manual_seed(0)
    original = kv_gpt2.GPTModel(config).to(DEVICE).eval()
    swapped = swap_input_embeddings(copy.deepcopy(original))
    ids = torch.randint(0, 61, (1, 6), device=DEVICE)
    with torch.no_grad():
        for model in (original, swapped):
            model(ids, use_cache=True)
        got = [(overflow(model, ids), model.current_pos) for model in (original, swapped)]
    assert got == [(IndexError, 6)] * 2


# --- 5. the smaller ones --------------------------------------------------------------------------

def oracle(ids, token_weight, position_weight, grad_out, **options):
    """The unchecked op's promise, from the reference: bad ids give NaN rows and add nothing to any
    gradient (or count). Bad ids look up an extra row appended to the token table instead."""
    vocab_size = token_weight.shape[0]
    extended = torch.cat([token_weight.detach(), torch.zeros_like(token_weight[:1])]).requires_grad_()
    position_weight = position_weight.detach().clone().requires_grad_()
    bad = (ids < 0) | (ids >= vocab_size)
    out = input_embedding_reference(ids.masked_fill(bad, vocab_size), extended, position_weight, **options)
    out.backward(grad_out)
    grad = extended.grad.to_dense() if extended.grad.is_sparse else extended.grad
    # (A bad token id's position row still gets that row's gradient: the position lookup was fine.)
    return (out.detach().masked_fill(bad.unsqueeze(-1), float("nan")), extended.detach()[:vocab_size],
            grad[:vocab_size], position_weight.grad)


@pytest.mark.parametrize("options", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True}, {"sparse": True},
                                     {"max_norm": 1.0}], ids=lambda options: ",".join(options) or "plain")
def test_unchecked_bad_ids_give_nan_rows_and_no_gradient_on_both_paths(backend, options):
    module = FusedInputEmbedding(10, 6, 4, check_ids=False, device=DEVICE, **options)
    ids = torch.tensor([[1, 12, 3, 1], [-1, 2, 2, 10]], device=DEVICE)
    grad_out = torch.randn(2, 4, 4, device=DEVICE)
    expected, token_table, token_grad, position_grad = oracle(ids, module.tok_emb.weight, module.pos_emb.weight,
                                                              grad_out, **options)
    out = module(ids)
    torch.testing.assert_close(out, expected, equal_nan=True, **TOLERANCES[torch.float32])
    out.backward(grad_out)
    grad = module.tok_emb.weight.grad
    torch.testing.assert_close(grad.to_dense() if grad.is_sparse else grad, token_grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(module.pos_emb.weight.grad, position_grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(module.tok_emb.weight.detach(), token_table)  # max_norm: only valid rows renormalised
    check_ids_now()  # and nothing was recorded


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("make", [lambda w: w.to_sparse(), lambda w: w.to_sparse_csr()], ids=["coo", "csr"])
def test_a_sparse_table_gets_a_clear_error(backend, make):
    token_weight, position_weight = torch.randn(10, 4, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    ids = torch.tensor([[1, 2]], device=DEVICE)
    with pytest.raises(TypeError, match=r"token_weight must be a dense \(strided\) tensor, got layout torch.sparse"):
        fused_input_embedding(ids, make(token_weight), position_weight)
    fused_input_embedding(ids, token_weight, position_weight)  # the same shapes, dense: cached as such
    with pytest.raises(TypeError, match=r"position_weight must be a dense \(strided\) tensor"):
        fused_input_embedding(ids, token_weight, make(position_weight))
    with pytest.raises(TypeError, match=r"input_ids must be a dense \(strided\) tensor"):
        fused_input_embedding(ids.to_sparse(), token_weight, position_weight)
    module = FusedInputEmbedding(10, 6, 4, device=DEVICE)
    module.tok_emb.weight = nn.Parameter(make(module.tok_emb.weight.detach()))
    with pytest.raises(TypeError, match=r"token_weight must be a dense \(strided\) tensor"):
        module(ids)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_a_nested_ids_tensor_gets_a_clear_error(backend):
    token_weight, position_weight = torch.randn(10, 4, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    ids = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])], device=DEVICE)
    with pytest.raises(TypeError, match=r"input_ids must be a dense \(strided\) tensor, got a nested tensor"):
        fused_input_embedding(ids, token_weight, position_weight)


class MinGPTBlock(Block):
    """minGPT's Block: its MLP's forward is a lambda held by the block, closing over the MLP's
    modules, so a copy.deepcopy of the model still calls the original's modules."""

    def __init__(self, dim, heads, dropout):
        super().__init__(dim, heads, dropout)
        ff, drop = self.ff, self.drop
        self.mlpf = lambda x: drop(ff(x))

    def forward(self, x):
        x = x + self.drop(self.att(self.norm1(x)))
        return x + self.mlpf(self.norm2(x))


def mingpt_with_lambdas():
    model = MinGPT(NanoConfig(dropout=0.3))
    for index in range(len(model.transformer.h)):
        model.transformer.h[index] = MinGPTBlock(32, 4, 0.3)
    return model.to(DEVICE)


def test_a_mingpt_deepcopy_sharing_train_mode_dropout_with_its_original_swaps(backend):
    original = mingpt_with_lambdas().train()
    copied = copy.deepcopy(original)
    assert any(cell.cell_contents is original.transformer.h[0].ff for cell in copied.transformer.h[0].mlpf.__closure__)
    swap_input_embeddings(copied)  # the probes draw the shared modules' dropout from one seed each
    assert copied.tokemb_fast_family == "minGPT GPT"


class CountingBlock(Block):
    """A block whose output depends on how often it ran (state the probe's snapshot does not reset)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = [0]

    def forward(self, x):
        self.calls[0] += 1
        out = super().forward(x)
        return out + self.calls[0] * torch.linspace(0, 1, out.shape[-1], device=out.device)  # (not a shift LayerNorm undoes)


def test_a_model_whose_own_forward_is_not_deterministic_is_refused_saying_so():
    model = NanoGPT()
    model.transformer.h[0] = CountingBlock(32, 4, 0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="two probe runs of the unswapped model already differ"):
        swap_input_embeddings(model)
    assert "forward" not in model.__dict__
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_threads_calling_one_swapped_hugging_face_model_get_their_own_results(backend):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    original = transformers.GPT2Model(config).to(DEVICE).eval()
    swapped = swap_input_embeddings(copy.deepcopy(original))
    inputs = [torch.randint(0, 61, (1 + index % 2, 5 + index), device=DEVICE) for index in range(4)]
    with torch.no_grad():
        expected = [original(input_ids=ids).last_hidden_state for ids in inputs]
    barrier = threading.Barrier(len(inputs))

    def caller(index):
        def body():
            barrier.wait()
            for _ in range(6):
                with torch.no_grad():
                    got = swapped(input_ids=inputs[index]).last_hidden_state
                torch.testing.assert_close(got, expected[index], rtol=1e-5, atol=1e-5)
        return body

    run_in_threads(*[caller(index) for index in range(len(inputs))])


# --- 6. CUDA streams (GPU only) --------------------------------------------------------------------

@requires_cuda
def test_a_bad_id_on_one_stream_is_raised_on_that_stream_only(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(10, 6, 4, device="cuda")
    good, bad = torch.tensor([[1, 2]], device="cuda"), torch.tensor([[1, 12]], device="cuda")
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(first):
        pending = module(bad)
    with torch.cuda.stream(second):
        for _ in range(3):
            module(good).sum().backward()  # another stream's training calls: not this error
    with torch.cuda.stream(first), pytest.raises(IndexError, match="token id 12"):
        pending.sum().backward()
    with torch.cuda.stream(first), torch.no_grad():
        module(bad)  # an inference call: the thread's next call on the device raises, on any stream
    with torch.cuda.stream(second), pytest.raises(IndexError, match="token id 12"):
        module(good)
    torch.cuda.synchronize()
    check_ids_now()


@requires_cuda
def test_streams_of_several_threads_keep_their_own_errors(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(10, 6, 4, device="cuda")

    def body(index):
        def run():
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for step in range(50):
                    bad_step = index == 0 and step % 5 == 0
                    ids = torch.tensor([[1, 12 if bad_step else 2]], device="cuda")
                    out = module(ids)
                    if bad_step:
                        with pytest.raises(IndexError, match="token id 12"):
                            out.sum().backward()
                    else:
                        out.sum().backward()
        return run

    run_in_threads(*[body(index) for index in range(4)])


# --- 7. everything at once, for a while --------------------------------------------------------------

STRESS_SECONDS = float(os.environ.get("TOKEMB_FAST_STRESS_SECONDS", "12"))


def test_threads_mixing_paths_shapes_modes_and_bad_ids_see_no_wrong_result_and_no_stray_error(monkeypatch):
    """Five threads for STRESS_SECONDS: training and inference on both paths with mixed shapes
    and modes, and one thread feeding bad ids. Every result is compared with the reference;
    every error must be the bad thread's own, raised where the README promises."""
    monkeypatch.delenv("TOKEMB_FAST_BACKEND", raising=False)
    backends = ["torch"] + (["triton"] if HAS_TRITON_PATH else [])
    deadline = time.monotonic() + STRESS_SECONDS
    counts = {"calls": 0, "wrong": [], "spurious": [], "lost": [], "raised": 0}
    lock = threading.Lock()

    def tally(key, value=1):
        with lock:
            if isinstance(counts[key], list):
                counts[key].append(value)
            else:
                counts[key] += value

    def good_worker(seed, modes):
        def run():
            rng = random.Random(seed)
            generator = torch.Generator().manual_seed(seed)
            modules = {(backend, vocab_size): FusedInputEmbedding(vocab_size, 16, 8, backend=backend, device=DEVICE)
                       for backend in backends for vocab_size in (20, 40)}
            while time.monotonic() < deadline:
                backend, vocab_size = rng.choice(list(modules))
                module = modules[backend, vocab_size]
                batch, seq_len, past = rng.choice([(1, 4, 0), (2, 7, 3), (3, 5, 0), (2, 16, 0)])
                ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(DEVICE)
                mode = rng.choice(modes)
                try:
                    if mode == "train":
                        module.zero_grad(set_to_none=True)
                        out = module(ids, past_length=past)
                        grad_out = torch.randn(out.shape, generator=generator).to(DEVICE)
                        out.backward(grad_out)
                        grads_ok = _gradients_ok(module, ids, past, grad_out)
                    else:
                        with (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()):
                            out = module(ids, past_length=past)
                        grads_ok = True
                    expected = expected_sum(module, ids, past_length=past)
                    if not (torch.equal(out, expected) and grads_ok):
                        tally("wrong", (backend, mode, tuple(ids.shape)))
                except IndexError as error:
                    tally("spurious", f"{backend} {mode}: {error}")
                tally("calls")
            try:
                check_ids_now()
            except IndexError as error:
                tally("spurious", f"check_ids_now: {error}")
        return run

    def bad_worker():
        rng = random.Random(99)
        modules = {backend: FusedInputEmbedding(30, 16, 8, backend=backend, device=DEVICE) for backend in backends}
        good_ids = torch.tensor([[1, 2, 3]], device=DEVICE)
        while time.monotonic() < deadline:
            backend = rng.choice(backends)
            module = modules[backend]
            bad_id = rng.choice([30, 99, -3])
            ids = torch.tensor([[1, bad_id, 2]], device=DEVICE)
            if rng.random() < 0.5:  # training: raised by the backward at the latest, before any gradient
                module.zero_grad(set_to_none=True)
                try:
                    module(ids).sum().backward()
                    tally("lost", f"{backend} training call with id {bad_id}")
                except IndexError as error:
                    if f"token id {bad_id} is out of range for vocab size 30" not in str(error):
                        tally("wrong", f"message: {error}")
                    tally("raised")
                if module.tok_emb.weight.grad is not None:
                    tally("lost", f"{backend}: gradients returned for id {bad_id}")
            else:  # inference: raised by this thread's next call on the device at the latest
                try:
                    with torch.no_grad():
                        module(ids)
                        module(good_ids)
                    tally("lost", f"{backend} inference call with id {bad_id}")
                except IndexError as error:
                    if f"token id {bad_id} is out of range for vocab size 30" not in str(error):
                        tally("wrong", f"message: {error}")
                    tally("raised")
            tally("calls")

    run_in_threads(good_worker(1, ["train"]), good_worker(2, ["no_grad", "inference_mode"]),
                   good_worker(3, ["train", "inference_mode", "no_grad"]), good_worker(4, ["train", "no_grad"]),
                   bad_worker)
    assert counts["wrong"] == [] and counts["spurious"] == [] and counts["lost"] == [], counts
    assert counts["calls"] >= 100 and counts["raised"] >= 10, counts


def _gradients_ok(module, ids, past, grad_out):
    tok = module.tok_emb.weight.detach().clone().requires_grad_()
    pos = module.pos_emb.weight.detach().clone().requires_grad_()
    input_embedding_reference(ids, tok, pos, past_length=past).backward(grad_out)
    return all(torch.allclose(got, expected, **TOLERANCES[torch.float32])
               for got, expected in ((module.tok_emb.weight.grad, tok.grad), (module.pos_emb.weight.grad, pos.grad)))
