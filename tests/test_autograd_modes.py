"""Every autograd mode a user may reach, on both paths, against nn.Embedding (two F.embedding summed):
double backward (create_graph), forward-mode AD, torch.func transforms, vmap randomness, and that
the plain training path pays for none of it."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from conftest import TRITON_DEVICE
from tokemb_fast import (EmbeddingGradFunction, FusedInputEmbedding, FusedInputEmbeddingFunction, LookupOptions,
                         TableOptions, dropout_seed, fused_input_embedding, triton_ops)

DEVICE = TRITON_DEVICE
IDS = [[1, 4, 4, 0], [6, 4, 1, 1]]
POSITION_MODES = ["default", "past_length", "shared", "per_row", "one_dim"]
OPTION_SETS = {
    "plain": {},
    "padding_idx": dict(padding_idx=4, position_padding_idx=2),
    "scale_grad_by_freq": dict(scale_grad_by_freq=True, position_scale_grad_by_freq=True),
    "both": dict(padding_idx=1, scale_grad_by_freq=True, position_padding_idx=0, position_scale_grad_by_freq=True),
}


def lookup(position_mode):
    """(ids, position_ids, past_length) of a mode."""
    ids = torch.tensor(IDS, device=DEVICE)
    if position_mode == "default":
        return ids, None, 0
    if position_mode == "past_length":
        return ids, None, 2
    if position_mode == "shared":
        return ids, torch.tensor([5, 0, 5, 2], device=DEVICE), 0
    if position_mode == "per_row":
        return ids, torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]], device=DEVICE), 0
    return ids[0], torch.tensor([3, 3, 1, 0], device=DEVICE), 0


def tables(dtype=torch.float64, requires_grad=True):
    return (torch.randn(7, 3, dtype=dtype, device=DEVICE, requires_grad=requires_grad),
            torch.randn(6, 3, dtype=dtype, device=DEVICE, requires_grad=requires_grad))


def reference(ids, token_weight, position_weight, position_ids=None, past_length=0, **options):
    """nn.Embedding's answer: two F.embedding summed (the plain-PyTorch path)."""
    return fused_input_embedding(ids, token_weight, position_weight, position_ids, past_length, backend="torch",
                                 **options)


def ours(ids, token_weight, position_weight, position_ids=None, past_length=0, **options):
    return fused_input_embedding(ids, token_weight, position_weight, position_ids, past_length, backend="triton",
                                 **options)


def kernel_options(options, past_length=0, dropout_p=0.0):
    """fused_input_embedding's keywords as the Function's LookupOptions."""
    return LookupOptions(
        token=TableOptions(options.get("padding_idx"), options.get("scale_grad_by_freq", False)),
        position=TableOptions(options.get("position_padding_idx"), options.get("position_scale_grad_by_freq", False)),
        past_length=past_length, dropout_p=dropout_p)


needs_kernels = pytest.mark.skipif(not (triton_ops.INTERPRETED or torch.cuda.is_available()),
                                   reason="runs the Triton path's kernels")


# --- double backward ------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("position_mode", POSITION_MODES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_gradgradcheck_through_the_kernels(position_mode, option_set):
    ids, position_ids, past_length = lookup(position_mode)
    options = kernel_options(OPTION_SETS[option_set], past_length)

    def fn(token_weight, position_weight):
        return FusedInputEmbeddingFunction.apply(ids, token_weight, position_weight, position_ids, options, None)

    # fast_mode checks random projections of the Jacobians (the interpreter is slow); the
    # per_row/both case runs the full check.
    assert torch.autograd.gradgradcheck(fn, tables(), fast_mode=(position_mode, option_set) != ("per_row", "both"))


@needs_kernels
@pytest.mark.parametrize("dropout_p", [0.3, 1.0])
def test_gradgradcheck_with_dropout(dropout_p):
    # A fixed seed makes the dropped function deterministic, as gradcheck needs.
    # (padding_idx and scale_grad_by_freq make nn.Embedding's backward differ from the forward's
    # derivative on purpose, so the first-order check runs without them.)
    ids, position_ids, _ = lookup("per_row")
    seed = dropout_seed(DEVICE)

    def fn(options):
        return lambda token_weight, position_weight: FusedInputEmbeddingFunction.apply(
            ids, token_weight, position_weight, position_ids, options, seed)

    assert torch.autograd.gradcheck(fn(kernel_options({}, dropout_p=dropout_p)), tables(), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn(kernel_options(OPTION_SETS["both"], dropout_p=dropout_p)), tables(),
                                        fast_mode=dropout_p == 1.0)


@needs_kernels
@pytest.mark.parametrize("option_set", ["plain", "padding_idx"])
@pytest.mark.parametrize("position_mode", ["default", "per_row"])
def test_double_backward_matches_nn_embedding(option_set, position_mode):
    # The case a user found silently wrong: the second derivative through the table gradient.
    ids, position_ids, past_length = lookup(position_mode)
    start = tables()
    results = []
    for fn in (ours, reference):
        token_weight, position_weight = (t.detach().clone().requires_grad_() for t in start)
        out = fn(ids, token_weight, position_weight, position_ids, past_length, **OPTION_SETS[option_set])
        first = torch.autograd.grad((out * out).sum(), (token_weight, position_weight), create_graph=True)
        assert all(g.requires_grad for g in first)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first) + token_weight.pow(3).sum(),
                                     (token_weight, position_weight))
        results.append((first, second))
    for got, expected in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(got, expected)


@needs_kernels
def test_scale_grad_by_freq_double_backward_is_exact_where_pytorchs_is_not():
    # Documented difference: PyTorch's embedding double backward drops the 1/count factor of
    # scale_grad_by_freq (embedding_dense_double_backward), so gradgradcheck fails on nn.Embedding
    # itself; the Triton path's is the derivative of the backward it computed. If PyTorch fixes
    # theirs, the first assertion fails and the README's difference can go.
    ids, _, _ = lookup("default")
    token_weight = torch.randn(7, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    position_weight = torch.randn(6, 3, dtype=torch.float64, device=DEVICE)
    pytorch = lambda w: F.embedding(ids, w, scale_grad_by_freq=True)  # noqa: E731
    assert not torch.autograd.gradgradcheck(pytorch, (token_weight,), raise_exception=False)
    assert torch.autograd.gradgradcheck(
        lambda w: ours(ids, w, position_weight, scale_grad_by_freq=True), (token_weight,))


@needs_kernels
def test_triple_backward():
    ids, position_ids, _ = lookup("per_row")
    token_weight, position_weight = tables()
    out = ours(ids, token_weight, position_weight, position_ids, padding_idx=4)
    g1, = torch.autograd.grad(out.pow(3).sum(), token_weight, create_graph=True)
    g2, = torch.autograd.grad(g1.pow(2).sum(), token_weight, create_graph=True)
    g3, = torch.autograd.grad(g2.sum(), token_weight)
    ref_weight = token_weight.detach().clone().requires_grad_()
    ref = reference(ids, ref_weight, position_weight.detach(), position_ids, padding_idx=4)
    r1, = torch.autograd.grad(ref.pow(3).sum(), ref_weight, create_graph=True)
    r2, = torch.autograd.grad(r1.pow(2).sum(), ref_weight, create_graph=True)
    r3, = torch.autograd.grad(r2.sum(), ref_weight)
    torch.testing.assert_close(g3, r3)


@needs_kernels
def test_sparse_gradient_double_backward_is_pytorchs():
    # Sparse gradients are built by PyTorch's own (differentiable) sparse embedding backward.
    ids, _, _ = lookup("default")
    start = tables()
    results = []
    for fn in (ours, reference):
        token_weight, position_weight = (t.detach().clone().requires_grad_() for t in start)
        out = fn(ids, token_weight, position_weight, sparse=True)
        g, = torch.autograd.grad(out.pow(2).sum(), token_weight, create_graph=True)
        assert g.is_sparse and g.requires_grad
        h, = torch.autograd.grad(g.coalesce().values().pow(2).sum(), token_weight)
        results.append((g.to_dense(), h.to_dense()))
    torch.testing.assert_close(results[0], results[1])


# --- forward-mode AD ----------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_forward_ad_against_finite_differences(position_mode):
    ids, position_ids, past_length = lookup(position_mode)
    options = kernel_options({}, past_length)

    def fn(token_weight, position_weight):
        return FusedInputEmbeddingFunction.apply(ids, token_weight, position_weight, position_ids, options, None)

    assert torch.autograd.gradcheck(fn, tables(), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_forward_grad=False)


@pytest.mark.parametrize("backend", ["torch", "triton"] if triton_ops.INTERPRETED or torch.cuda.is_available()
                         else ["torch"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS) + ["dropout", "max_norm"])
def test_forward_ad_matches_nn_embedding(backend, option_set):
    # nn.Embedding's tangent is the gather of the tables' tangents (the padding row's too, no
    # 1/count): this op's on both paths; with dropout, masked by the forward's own mask.
    ids, position_ids, _ = lookup("per_row")
    options = dict(OPTION_SETS.get(option_set, {}))
    if option_set == "max_norm":
        options["max_norm"] = 0.5
    token_weight, position_weight = tables(requires_grad=False)
    token_tangent, position_tangent = torch.randn_like(token_weight), torch.randn_like(position_weight)
    dropout_p = 0.5 if option_set == "dropout" else 0.0
    with fwAD.dual_level():
        out = fused_input_embedding(ids, fwAD.make_dual(token_weight, token_tangent),
                                    fwAD.make_dual(position_weight, position_tangent), position_ids,
                                    dropout_p=dropout_p, backend=backend, **options)
        primal, tangent = fwAD.unpack_dual(out)
    # Renormalised in place, as F.embedding does (on the primal; the tangent is not renormalised).
    expected = F.embedding(ids, token_tangent) + F.embedding(position_ids, position_tangent)
    if dropout_p:
        kept = primal != 0
        assert 0 < kept.double().mean() < 1
        expected = torch.where(kept, expected / (1 - dropout_p), 0.0)
    torch.testing.assert_close(tangent, expected)
    if option_set == "max_norm":
        assert token_weight[ids.flatten()].norm(dim=1).max() <= 0.5 + 1e-9


@needs_kernels
def test_jvp_of_the_table_gradient_is_the_table_gradient_of_the_tangent():
    # Forward-over-reverse: what torch.func.hessian runs.
    ids, position_ids, _ = lookup("per_row")
    options = kernel_options(OPTION_SETS["both"])
    grad_out = torch.randn(2, 4, 3, dtype=torch.float64, device=DEVICE)
    tangent = torch.randn_like(grad_out)

    def table_grads(upstream):
        return EmbeddingGradFunction.apply(upstream, ids, position_ids, None, options, (7, 6), (True, True))

    _, tangents = jvp(table_grads, (grad_out,), (tangent,))
    for got, expected in zip(tangents, table_grads(tangent)):
        torch.testing.assert_close(got, expected)


# --- torch.func -----------------------------------------------------------------------------------

def _loss(fn, ids, position_ids, **options):
    return lambda w, p: (fn(ids, w, p, position_ids, **options) ** 3).sum()


def _both(backend):
    return ours if backend == "triton" else reference


BACKENDS = ["torch"] + (["triton"] if triton_ops.INTERPRETED or torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option_set", ["plain", "both"])
def test_func_grad_vjp_jacrev_jacfwd_hessian(backend, option_set):
    ids, position_ids, _ = lookup("per_row")
    options = OPTION_SETS[option_set]
    token_weight, position_weight = (t.detach() for t in tables())
    fn, ref = _both(backend), reference
    for transform in (lambda f: grad(f, argnums=(0, 1)), lambda f: jacrev(f, argnums=(0, 1)),
                      lambda f: jacfwd(f, argnums=(0, 1))):
        got = transform(_loss(fn, ids, position_ids, **options))(token_weight, position_weight)
        expected = transform(_loss(ref, ids, position_ids, **options))(token_weight, position_weight)
        torch.testing.assert_close(got, expected)
    if option_set == "plain":  # PyTorch's own hessian is wrong with scale_grad_by_freq (see above)
        got = hessian(_loss(fn, ids, position_ids))(token_weight, position_weight)
        expected = hessian(_loss(ref, ids, position_ids))(token_weight, position_weight)
        torch.testing.assert_close(got, expected)
    out, pullback = vjp(lambda w: fn(ids, w, position_weight, position_ids, **options), token_weight)
    cotangent = torch.randn_like(out)
    expected_out, expected_pullback = vjp(lambda w: ref(ids, w, position_weight, position_ids, **options),
                                          token_weight)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(pullback(cotangent), expected_pullback(cotangent))
    tangents = (torch.randn_like(token_weight), torch.randn_like(position_weight))
    torch.testing.assert_close(
        jvp(lambda w, p: fn(ids, w, p, position_ids, **options), (token_weight, position_weight), tangents),
        jvp(lambda w, p: ref(ids, w, p, position_ids, **options), (token_weight, position_weight), tangents))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", ["ids", "tables", "both", "positions"])
def test_vmap(backend, batched):
    token_weight, position_weight = (t.detach() for t in tables())
    many_ids = torch.randint(0, 7, (3, 2, 4), device=DEVICE)
    many_tables = torch.randn(3, 7, 3, dtype=torch.float64, device=DEVICE)
    many_positions = torch.randint(0, 6, (3, 4), device=DEVICE)
    fn = _both(backend)
    if batched == "ids":
        call = (lambda f: vmap(lambda i: f(i, token_weight, position_weight)), (many_ids,))
    elif batched == "tables":
        call = (lambda f: vmap(lambda w: f(many_ids[0], w, position_weight)), (many_tables,))
    elif batched == "both":
        call = (lambda f: vmap(lambda i, w: f(i, w, position_weight)), (many_ids, many_tables))
    else:
        call = (lambda f: vmap(lambda i, p: f(i, token_weight, position_weight, p), in_dims=(None, 0)),
                (many_ids[0], many_positions))
    transform, args = call
    torch.testing.assert_close(transform(fn)(*args), transform(reference)(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_vmap_of_grad(backend):
    # The Opacus-style use: a gradient per sample of the batch.
    token_weight, position_weight = (t.detach() for t in tables())
    many_ids = torch.randint(0, 7, (5, 4), device=DEVICE)

    def per_sample(fn):
        loss = lambda w, p, i: (fn(i, w, p, padding_idx=2) ** 2).sum()  # noqa: E731
        return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(token_weight, position_weight, many_ids)

    torch.testing.assert_close(per_sample(_both(backend)), per_sample(reference))


@needs_kernels
def test_dropout_under_vmap_follows_randomness():
    token_weight, position_weight = (t.detach() for t in tables())
    same_ids = torch.randint(0, 7, (4, 2, 3), device=DEVICE)[:1].expand(4, 2, 3)

    def dropped(i):
        return ours(i, token_weight, position_weight, dropout_p=0.5)

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(dropped)(same_ids)
    different = vmap(dropped, randomness="different")(same_ids)
    same = vmap(dropped, randomness="same")(same_ids)
    masks_different = [(row == 0) for row in different]
    masks_same = [(row == 0) for row in same]
    assert all(torch.equal(mask, masks_same[0]) for mask in masks_same)
    assert not all(torch.equal(mask, masks_different[0]) for mask in masks_different)


@needs_kernels
def test_sync_id_check_works_under_vmap():
    token_weight, position_weight = (t.detach() for t in tables())
    bad = torch.tensor([[1, 2], [3, 9]], device=DEVICE)
    with pytest.raises(IndexError, match="token id 9 is out of range for vocab size 7"):
        vmap(lambda i: ours(i, token_weight, position_weight, check_ids="sync"))(bad)


@pytest.mark.parametrize("check_ids", [True, "sync"])
@pytest.mark.parametrize("op", ["decoder", "encoder"])
def test_a_bad_id_under_vmap_on_the_plain_path_raises_our_index_error(op, check_ids):
    # The range check reads the ids on the host, which a vmapped tensor cannot hand over itself: it
    # once raised "Cannot access data pointer of Tensor that doesn't have storage" instead.
    from tokemb_fast import fused_encoder_embedding
    token_weight, position_weight = (t.detach() for t in tables())
    bad = torch.tensor([[1, 2], [3, 9]], device=DEVICE)
    function = fused_input_embedding if op == "decoder" else fused_encoder_embedding
    with pytest.raises(IndexError, match="token id 9 is out of range for vocab size 7"):
        vmap(lambda i: function(i, token_weight, position_weight, check_ids=check_ids, backend="torch"))(bad)
    with pytest.raises(IndexError, match="token id 9 is out of range for vocab size 7"):  # two levels
        vmap(vmap(lambda i: function(i, token_weight, position_weight, check_ids=check_ids, backend="torch")))(
            bad[None])


@needs_kernels
def test_module_under_torch_func_functional_call():
    module = FusedInputEmbedding(7, 6, 3, padding_idx=1, dtype=torch.float64).to(DEVICE)
    ids = torch.tensor(IDS, device=DEVICE)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(parameters):
        return (torch.func.functional_call(module, parameters, (ids,)) ** 2).sum()

    grads = grad(loss)(params)
    module.zero_grad()
    loss(dict(module.named_parameters())).backward()
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad)
