"""Tensor parallelism (tokemb_fast.parallel): 2 and 4 spawned CPU processes with gloo, real
collectives, against the single-process op in each process.

Each (group size, path) spawns its processes once and runs every case there (spawning and
importing cost more than the cases); a case's failure on any rank fails its test here, with that
rank's traceback. The Triton path runs on the interpreter; NCCL on GPUs is not run here (see
bench/gpu_check.sh's tp step).
"""
import json
import os
import socket
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import BACKENDS

VOCAB, CONTEXT, DIM = 37, 12, 8  # 37 rows: uneven shards over 2 (19, 18) and 4 (10, 10, 10, 7)
PADDING_ROW = 33                 # in the last shard for both group sizes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- what each rank runs ------------------------------------------------------------------------

def _modules(dtype, **options):
    """(module to parallelise, single-process module with the same tables)."""
    from tokemb_fast import FusedInputEmbedding
    torch.manual_seed(0)
    parallel = FusedInputEmbedding(VOCAB, CONTEXT, DIM, dtype=dtype, **options)
    single = FusedInputEmbedding(VOCAB, CONTEXT, DIM, dtype=dtype, **options)
    single.load_state_dict(parallel.state_dict())
    return parallel, single


def _parallelise(module, mesh, layout, **style):
    from torch.distributed.tensor.parallel import parallelize_module
    from tokemb_fast.parallel import FusedEmbeddingParallel
    return parallelize_module(module, mesh, FusedEmbeddingParallel(output_layouts=layout, **style))


def _sequence_part(full, rank, world):
    """This rank's part of a [B, T, ...] tensor under Shard(1) (torch.chunk's split, as DTensor's)."""
    sizes = [len(part) for part in torch.arange(full.shape[1]).chunk(world)]
    start = sum(sizes[:rank])
    return full[:, start:start + (sizes[rank] if rank < len(sizes) else 0)]


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _ids(kind, generator):
    ids = torch.randint(0, VOCAB, (3, 10), generator=generator)
    if kind == "one-shard":  # every id in the last shard of 2 and of 4
        ids = torch.randint(30, VOCAB, (3, 10), generator=generator)
    elif kind == "padding":
        ids[0, :3] = PADDING_ROW
        ids[2, 5] = PADDING_ROW
    return ids


def _check_lookup(ctx, dtype, layout_name, kind, call=None, **options):
    """Forward output and both tables' gradients equal the single-process op's, exactly."""
    from torch.distributed.tensor import Replicate, Shard
    layout = Replicate() if layout_name == "replicate" else Shard(1)
    parallel, single = _modules(dtype, **options)
    _parallelise(parallel, ctx.mesh, layout)
    generator = torch.Generator().manual_seed(7)
    ids = _ids(kind, generator)
    call = call or {}
    out = parallel(ids, **call)
    expected = single(ids, **call)
    grad = torch.randn(expected.shape, generator=generator, dtype=dtype)
    if layout_name == "sequence":
        expected_local, grad_local = _sequence_part(expected, ctx.rank, ctx.world), _sequence_part(grad, ctx.rank,
                                                                                                 ctx.world)
    else:
        expected_local, grad_local = expected, grad
    assert torch.equal(out, expected_local), (out - expected_local).abs().max()
    out.backward(grad_local)
    expected.backward(grad)
    assert torch.equal(_full(parallel.tok_emb.weight.grad), single.tok_emb.weight.grad)
    # The position table is replicated: every rank's copy has the whole gradient.
    assert torch.equal(parallel.pos_emb.weight.grad.to_local(), single.pos_emb.weight.grad)


def _lookup_cases():
    cases = {}
    for dtype in (torch.float32, torch.float64):
        for layout in ("replicate", "sequence"):
            for kind in ("uniform", "one-shard", "padding"):
                options = {"padding_idx": PADDING_ROW} if kind == "padding" else {}
                cases[f"{layout}-{kind}-{str(dtype)[6:]}"] = \
                    lambda ctx, d=dtype, l=layout, k=kind, o=options: _check_lookup(ctx, d, l, k, **o)
        cases[f"replicate-position_ids-{str(dtype)[6:]}"] = lambda ctx, d=dtype: _check_lookup(
            ctx, d, "replicate", "uniform", call={"position_ids": torch.randint(0, CONTEXT, (3, 10),
                                                                               generator=torch.Generator())})
        cases[f"sequence-past_length-{str(dtype)[6:]}"] = lambda ctx, d=dtype: _check_lookup(
            ctx, d, "sequence", "uniform", call={"past_length": 2})
    cases["replicate-scale_grad_by_freq-token_scale-float64"] = lambda ctx: _check_lookup(
        ctx, torch.float64, "replicate", "padding", padding_idx=-4, scale_grad_by_freq=True,
        position_scale_grad_by_freq=True, token_scale=2.5)
    return cases


def _case_dropout(ctx):
    # One mask for the group; on the Triton path, the single-process op's for the same seed.
    from torch.distributed.tensor import Replicate, Shard
    for layout in (Replicate(), Shard(1)):
        parallel, single = _modules(torch.float64, dropout=0.5)
        _parallelise(parallel, ctx.mesh, layout)
        ids = _ids("uniform", torch.Generator().manual_seed(3))
        torch.manual_seed(11 + ctx.rank)  # different generators: the group must still agree
        out = parallel(ids)
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, out.detach())
        if layout == Replicate():
            assert all(torch.equal(part, gathered[0]) for part in gathered)
            full = gathered[0]
        else:
            full = torch.cat(gathered, dim=1)
        single.eval()
        plain = single(ids)
        kept = full != 0
        assert torch.equal(full[kept], plain[kept] * 2.0)
        assert 0.3 < kept.double().mean() < 0.7
        out.backward(torch.ones_like(out))
        if ctx.backend == "triton":
            torch.manual_seed(11)  # rank 0's generator drew the group's seed
            single.train()
            expected = single(ids)
            assert torch.equal(full, expected)
            expected.backward(torch.ones_like(expected))
            assert torch.equal(parallel.tok_emb.weight.grad.full_tensor(), single.tok_emb.weight.grad)
            assert torch.equal(parallel.pos_emb.weight.grad.to_local(), single.pos_emb.weight.grad)
        else:
            # Each kept element passes 2 (= 1/(1-p)) to its rows, each dropped one nothing.
            grad_mask = (kept.double() * 2.0).sum(-1)
            expected = torch.zeros(VOCAB, dtype=torch.float64).index_add_(0, ids.flatten(), grad_mask.flatten())
            assert torch.equal(parallel.tok_emb.weight.grad.full_tensor().sum(1), expected)


def _case_call_variants(ctx):
    # The other ways in: 1-D ids, [T] and [1, T] position ids, ids as a DTensor, the DTensor
    # output, the function with DTensor tables; and inf table values, unchecked bad ids.
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from tokemb_fast import fused_input_embedding
    parallel, single = _modules(torch.float64)
    _parallelise(parallel, ctx.mesh, Shard(1))
    generator = torch.Generator().manual_seed(6)
    ids = _ids("uniform", generator)
    for position_ids in (torch.randint(0, CONTEXT, (10,), generator=generator),
                         torch.randint(0, CONTEXT, (1, 10), generator=generator)):
        assert torch.equal(parallel(ids, position_ids=position_ids),
                           _sequence_part(single(ids, position_ids=position_ids), ctx.rank, ctx.world))
    parallel, single = _modules(torch.float64)
    _parallelise(parallel, ctx.mesh, Replicate(), use_local_output=False)
    out = parallel(distribute_tensor(ids, ctx.mesh, [Replicate()]))
    assert isinstance(out, DTensor) and tuple(out.placements) == (Replicate(),)
    assert torch.equal(out.to_local(), single(ids))
    assert torch.equal(parallel(ids[1]).to_local(), single(ids[1]))  # [T] ids: [T, D]
    functional = fused_input_embedding(ids, parallel.tok_emb.weight, parallel.pos_emb.weight, past_length=2)
    assert isinstance(functional, DTensor) and torch.equal(functional.to_local(), single(ids, past_length=2))
    # An infinite position row stays infinite (not inf - inf), and its gradient is the true one.
    parallel, single = _modules(torch.float64)
    with torch.no_grad():
        for module in (parallel, single):
            module.pos_emb.weight[3, 0] = float("inf")
    _parallelise(parallel, ctx.mesh, Replicate())
    out, expected = parallel(ids), single(ids)
    assert torch.equal(out, expected) and torch.isinf(out[:, 3, 0]).all()
    # check_ids=False: an id outside the vocabulary gives a NaN row, as on one process's kernels.
    parallel, _ = _modules(torch.float32, check_ids=False)
    _parallelise(parallel, ctx.mesh, Replicate())
    bad = ids.clone()
    bad[0, 4] = VOCAB + 5
    out = parallel(bad)
    assert torch.isnan(out[0, 4]).all() and not torch.isnan(out[0, :4]).any()
    # A split that leaves a rank without rows is refused on every rank, before any collective.
    from tokemb_fast import FusedInputEmbedding
    rows = {2: 1, 4: 9}[ctx.world]
    with pytest.raises(ValueError, match="leaves a rank without rows"):
        _parallelise(FusedInputEmbedding(rows, CONTEXT, DIM), ctx.mesh, Replicate())
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        fused_input_embedding(ids, parallel.tok_emb.weight, parallel.pos_emb.weight, padding_idx=2.0)


def _case_bad_id(ctx):
    # Checked against the whole vocabulary, on every rank, with the single-process message.
    from torch.distributed.tensor import Replicate
    for check_ids in (True, "sync"):
        parallel, _single = _modules(torch.float32, check_ids=check_ids)
        _parallelise(parallel, ctx.mesh, Replicate())
        ids = torch.randint(0, VOCAB, (2, 5))
        ids[1, 2] = VOCAB
        with pytest.raises(IndexError, match=f"id {VOCAB} .*{VOCAB}"):
            parallel(ids).sum().backward()  # raised in the forward or, deferred, in the backward


def _case_gpt_model_trains(ctx):
    # A swapped GPTModel (llms-from-scratch's own class), the embedding tensor-parallel and the
    # rest replicated, trained 3 steps: the same parameters as one process.
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    from torch.distributed.tensor import DTensor
    from tokemb_fast import swap_input_embeddings
    config = {"vocab_size": 61, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
              "qkv_bias": False}
    torch.manual_seed(0)
    parallel = swap_input_embeddings(ch04.GPTModel(config))
    single = swap_input_embeddings(ch04.GPTModel(config))
    single.load_state_dict(parallel.state_dict())
    _parallelise(parallel.tok_emb, ctx.mesh, None)
    assert isinstance(parallel.tok_emb.weight, DTensor)
    batches = torch.randint(0, 61, (3, 2, 4, 16), generator=torch.Generator().manual_seed(5))
    for model in (parallel, single):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for ids, targets in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
    expected = dict(single.named_parameters())
    for name, parameter in parallel.named_parameters():
        torch.testing.assert_close(_full(parameter.detach()), expected[name].detach(), rtol=1e-6, atol=1e-7,
                                   msg=name)


def _case_hugging_face_gpt2(ctx):
    # A swapped Hugging Face GPT2Model with its token table ("wte") tensor-parallel: the same
    # hidden states and gradients as one process.
    transformers = pytest.importorskip("transformers")
    from tokemb_fast import swap_input_embeddings
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    parallel = swap_input_embeddings(transformers.GPT2Model(config).eval())
    single = transformers.GPT2Model(config).eval()
    single.load_state_dict(parallel.state_dict())
    _parallelise(parallel.wte, ctx.mesh, None)
    ids = _ids("padding", torch.Generator().manual_seed(4))
    out, expected = parallel(ids).last_hidden_state, single(ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(parallel.wte.weight.grad.full_tensor(), single.wte.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parallel.wpe.weight.grad, single.wpe.weight.grad, rtol=1e-6, atol=1e-6)


def _case_compile(ctx):
    # torch.compile (aot_eager: Inductor needs a GPU for the kernels) over the DTensor path.
    from torch.distributed.tensor import Replicate
    parallel, single = _modules(torch.float64)
    _parallelise(parallel, ctx.mesh, Replicate())
    ids = _ids("uniform", torch.Generator().manual_seed(9))
    compiled = torch.compile(parallel, backend="aot_eager", fullgraph=False)
    out = compiled(ids)
    expected = single(ids)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(_full(parallel.tok_emb.weight.grad), single.tok_emb.weight.grad)


def _case_refusals(ctx):
    from torch.distributed.tensor import Replicate, Shard
    from tokemb_fast.parallel import TENSOR_PARALLEL_ATTR, FusedEmbeddingParallel
    with pytest.raises(ValueError, match="output_layouts must be"):
        FusedEmbeddingParallel(output_layouts=Shard(2))
    with pytest.raises(TypeError, match="applies to a tokemb_fast.FusedInputEmbedding"):
        _parallelise(nn.Linear(VOCAB, DIM), ctx.mesh, Replicate())
    for options, table in (({"max_norm": 1.0}, "token"), ({"sparse": True}, "token"),
                           ({"position_sparse": True}, "position")):
        module, _ = _modules(torch.float32, **options)
        with pytest.raises(NotImplementedError, match=f"on the {table} table is not supported"):
            _parallelise(module, ctx.mesh, Replicate())
    from torch.distributed.device_mesh import init_device_mesh
    with pytest.raises(ValueError, match="takes a 1-D mesh"):
        _parallelise(_modules(torch.float32)[0], init_device_mesh("cpu", (1, ctx.world)), Replicate())
    tied, _ = _modules(torch.float32)
    head = nn.Linear(DIM, VOCAB, bias=False)
    head.weight = tied.tok_emb.weight  # an output layer tied to the token table, as GPT-2's lm_head
    with pytest.raises(ValueError, match="shared with another module"):
        _parallelise(tied, ctx.mesh, Replicate())
    module, _ = _modules(torch.float64)
    _parallelise(module, ctx.mesh, Replicate())
    with pytest.raises(ValueError, match="is a DTensor already"):
        _parallelise(module, ctx.mesh, Replicate())
    module.tok_emb.__dict__[TENSOR_PARALLEL_ATTR] = (Shard(1), True)
    with pytest.raises(ValueError, match=r"Shard\(1\) output shards the sequence"):
        module(torch.randint(0, VOCAB, (5,)))
    module.tok_emb.__dict__[TENSOR_PARALLEL_ATTR] = (Replicate(), True)
    out = module(torch.randint(0, VOCAB, (2, 5)))
    if ctx.backend == "triton":
        # Double backward would need the group's collectives: a clear error, not a wrong gradient.
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(out.sum(), module.pos_emb.weight, create_graph=True)


def _case_checkpoint(ctx):
    # torch.distributed.checkpoint: load what one process saved (the test saved it before the
    # spawn), then save for one process to load (the test loads it after).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate
    parallel, single = _modules(torch.float32)
    _parallelise(parallel, ctx.mesh, Replicate())
    state = parallel.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(ctx.out_dir, "one-process"))
    saved = torch.load(os.path.join(ctx.out_dir, "one-process.pt"))
    for name, value in state.items():
        assert torch.equal(_full(value), saved[name]), name
    parallel.load_state_dict(state)
    assert torch.equal(parallel.tok_emb.weight.full_tensor(), saved["tok_emb.weight"])
    dcp.save(parallel.state_dict(), checkpoint_id=os.path.join(ctx.out_dir, "group"))


CASES = {**_lookup_cases(), "dropout": _case_dropout, "call-variants": _case_call_variants, "bad-id": _case_bad_id, "gpt-model-3-steps": _case_gpt_model_trains,
         "hugging-face-gpt2": _case_hugging_face_gpt2,
         "compile-aot_eager": _case_compile, "refusals": _case_refusals, "checkpoint": _case_checkpoint}


# The slow cases (a model's imports and steps, Dynamo) run in groups of 2 only: what they check
# does not depend on the group size, which the lookup cases cover at 2 and 4.
TWO_RANKS_ONLY = {"gpt-model-3-steps", "hugging-face-gpt2", "compile-aot_eager"}


class _Context:
    def __init__(self, rank, world, backend, mesh, out_dir):
        self.rank, self.world, self.backend, self.mesh, self.out_dir = rank, world, backend, mesh, out_dir


def _worker(rank, world, port, backend, out_dir):
    os.environ["TOKEMB_FAST_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    results = {}
    try:
        ctx = _Context(rank, world, backend, init_device_mesh("cpu", (world,)), out_dir)
        for name, case in CASES.items():
            if world != 2 and name in TWO_RANKS_ONLY:
                continue
            try:
                case(ctx)
                results[name] = "ok"
            except pytest.skip.Exception as skip:
                results[name] = f"skip: {skip}"
            except BaseException:  # noqa: B036  (reported to the test, which fails with it)
                results[name] = traceback.format_exc()
            dist.barrier()  # a rank that failed early must not leave the others in a collective
        if world == 4:
            results["fsdp2-x-tp"] = _fsdp2_times_tp(rank, backend)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
        dist.destroy_process_group()
    # (As in test_distributed.py: skip the interpreter's teardown, which rarely aborts after the work.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fsdp2_times_tp(rank, backend):
    """2-D: fully_shard over data parallel (2), this style over tensor parallel (2); one step on
    each half of the batch gives the single-process gradients of the whole batch (mean loss)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from gpt_models import GPTModel
        from tokemb_fast import swap_input_embeddings
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = swap_input_embeddings(GPTModel(drop_rate=0.0))
        single = swap_input_embeddings(GPTModel(drop_rate=0.0))
        single.load_state_dict(model.state_dict())
        _parallelise(model.tok_emb, mesh["tp"], Replicate())
        fully_shard(model, mesh=mesh["dp"])
        generator = torch.Generator().manual_seed(1)
        ids, targets = torch.randint(0, 61, (2, 8, 16), generator=generator)
        half = slice(4 * mesh.get_local_rank("dp"), 4 * mesh.get_local_rank("dp") + 4)
        nn.functional.cross_entropy(model(ids[half]).flatten(0, 1), targets[half].flatten()).backward()
        nn.functional.cross_entropy(single(ids).flatten(0, 1), targets.flatten()).backward()
        expected = dict(single.named_parameters())
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(_full(parameter.grad), expected[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        return "ok"
    except BaseException:  # noqa: B036
        return traceback.format_exc()


# --- the tests ----------------------------------------------------------------------------------

_runs = {}


def _run(world, backend, tmp_path_factory):
    key = (world, backend)
    if key not in _runs:
        out_dir = tmp_path_factory.mktemp(f"tp{world}-{backend}")
        # What one process saved, for the checkpoint case to load on the group.
        import torch.distributed.checkpoint as dcp
        _save_one_process(dcp, out_dir)
        mp.spawn(_worker, args=(world, _free_port(), backend, str(out_dir)), nprocs=world, join=True)
        _runs[key] = (out_dir, [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)])
    return _runs[key]


def _save_one_process(dcp, out_dir):
    from tokemb_fast import FusedInputEmbedding
    torch.manual_seed(123)
    module = FusedInputEmbedding(VOCAB, CONTEXT, DIM)
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    torch.save(state, out_dir / "one-process.pt")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(out_dir / "one-process"), no_dist=True)


def _assert_case(results, name):
    for rank, rank_results in enumerate(results):
        outcome = rank_results.get(name, "did not run")
        if outcome.startswith("skip: "):
            pytest.skip(outcome[6:])
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, world", [(case, world) for case in CASES for world in (2, 4)
                                         if world == 2 or case not in TWO_RANKS_ONLY])
def test_tensor_parallel(case, world, backend, tmp_path_factory):
    _out_dir, results = _run(world, backend, tmp_path_factory)
    _assert_case(results, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_times_tensor_parallel(backend, tmp_path_factory):
    _out_dir, results = _run(4, backend, tmp_path_factory)
    _assert_case(results, "fsdp2-x-tp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_saved_by_the_group_loads_in_one_process(backend, tmp_path_factory):
    import torch.distributed.checkpoint as dcp
    from tokemb_fast import FusedInputEmbedding
    out_dir, results = _run(2, backend, tmp_path_factory)
    _assert_case(results, "checkpoint")
    module = FusedInputEmbedding(VOCAB, CONTEXT, DIM)
    state = module.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(out_dir / "group"), no_dist=True)
    saved = torch.load(out_dir / "one-process.pt")  # the group loaded this, then saved it
    for name, value in state.items():
        assert torch.equal(value, saved[name]), name


def test_readme_example_runs_under_torchrun(tmp_path):
    # The README's tensor-parallel example as a user runs it: torchrun, 2 CPU processes (gloo).
    pytest.importorskip("llms_from_scratch", reason="the example builds llms-from-scratch's GPTModel")
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    start = readme.index("# torchrun --nproc-per-node 2 tp.py")
    script = tmp_path / "tp.py"
    script.write_text(readme[start:readme.index("```", start)])
    env = {**os.environ, "TOKEMB_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = sorted(line for line in result.stdout.splitlines() if line[:2] in ("0 ", "1 "))
    assert rows == ["0 torch.Size([25129, 128])", "1 torch.Size([25128, 128])"], result.stdout


# --- one process: the shard maths of the autograd Function, without a group --------------------

@pytest.mark.skipif("triton" not in BACKENDS, reason="the Function is the Triton path")
@pytest.mark.parametrize("position_ids", [False, True])
def test_shards_of_the_function_sum_to_the_whole_op(position_ids):
    from conftest import TRITON_DEVICE
    from tokemb_fast import FusedInputEmbeddingFunction, LookupOptions, TableOptions, TokenShard
    generator = torch.Generator().manual_seed(2)
    token_weight = torch.randn(VOCAB, DIM, generator=generator, dtype=torch.float64).to(TRITON_DEVICE)
    position_weight = torch.randn(CONTEXT, DIM, generator=generator, dtype=torch.float64).to(TRITON_DEVICE)
    ids = _ids("padding", generator).to(TRITON_DEVICE)
    positions = torch.randint(0, CONTEXT, ids.shape, generator=generator).to(TRITON_DEVICE) if position_ids else None
    grad = torch.randn(*ids.shape, DIM, generator=generator, dtype=torch.float64).to(TRITON_DEVICE)
    whole_options = LookupOptions(token=TableOptions(PADDING_ROW, True), position=TableOptions(None, True),
                                  past_length=1 if positions is None else 0, token_scale=1.5)
    tables = [token_weight.clone().requires_grad_(), position_weight.clone().requires_grad_()]
    whole = FusedInputEmbeddingFunction.apply(ids, *tables, positions, whole_options, None)
    whole.backward(grad)
    total, token_grads = torch.zeros_like(whole), []
    for start, stop in ((0, 10), (10, 30), (30, VOCAB)):  # uneven; the padding row in the last
        padding = PADDING_ROW - start if start <= PADDING_ROW < stop else None
        shard_options = whole_options._replace(token=TableOptions(padding, True),
                                               shard=TokenShard(start, VOCAB, start == 0))
        shard_tables = [token_weight[start:stop].clone().requires_grad_(), position_weight.clone().requires_grad_()]
        part = FusedInputEmbeddingFunction.apply(ids, *shard_tables, positions, shard_options, None)
        part.backward(grad)
        total += part.detach()
        token_grads.append(shard_tables[0].grad)
        assert torch.equal(shard_tables[1].grad, tables[1].grad)  # every shard: the whole position gradient
    assert torch.equal(total, whole)
    assert torch.equal(torch.cat(token_grads), tables[0].grad)


def test_a_shard_that_does_not_fit_its_vocabulary_is_refused():
    from tokemb_fast import FusedInputEmbeddingFunction, LookupOptions, TableOptions, TokenShard
    ids = torch.randint(0, VOCAB, (2, 4))
    tables = torch.randn(20, DIM), torch.randn(CONTEXT, DIM)
    for shard in (TokenShard(20, VOCAB, True), TokenShard(-1, VOCAB, True), TokenShard(0, VOCAB, 1)):
        with pytest.raises(ValueError, match="options.shard must place"):
            FusedInputEmbeddingFunction.apply(ids, *tables, None, LookupOptions(shard=shard), None)
    with pytest.raises(ValueError, match="dense gradients"):
        FusedInputEmbeddingFunction.apply(ids, *tables, None, LookupOptions(
            token=TableOptions(sparse=True), shard=TokenShard(0, VOCAB, True)), None)
    with pytest.raises(TypeError, match="options.shard must be"):
        FusedInputEmbeddingFunction.apply(ids, *tables, None, LookupOptions(shard=(0, VOCAB, True)), None)
