"""Shipping a trained model: torch.export (and its decompositions), ONNX run in onnxruntime,
AOTInductor, TorchScript; on both paths, for the module and for every family swap_input_embeddings
knows (the encoders' included). docs/shipping.md says what each gives.

Exported programs are pure functions: on the Triton path they hold ``tokemb_fast::input_embedding``
or ``tokemb_fast::encoder_embedding`` (no id flag is written while exporting: bad rows are NaN,
nothing raises), which ``tokemb_fast.export.decomposition_table()`` decomposes into PyTorch's own
ops (lookups, adds, the LayerNorm) for consumers that do not know them; the ONNX exporter finds
those decompositions itself.
"""
import copy
import io

import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE, requires_cuda
from gpt_models import GPTModel, GPTModelKV, GPTModelKVOptimized, MinGPT, NanoGPT
from tokemb_fast import FusedInputEmbedding, check_ids_now, swap_input_embeddings
from tokemb_fast.export import decomposition_table

DEVICE = TRITON_DEVICE
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # (PyTorch's own, while exporting)
              pytest.mark.filterwarnings("ignore:`torch.jit.trace.* is deprecated:DeprecationWarning")]


def tokemb_ops(program):
    return [str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and "tokemb_fast" in str(node.target)]


def assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- the module --------------------------------------------------------------------------------

def test_the_module_exports_runs_saves_and_decomposes(backend):
    module = FusedInputEmbedding(50, 16, 8, token_scale=1.5, device=DEVICE).eval()
    ids = torch.randint(0, 50, (2, 5), device=DEVICE)
    batch, seq_len = torch.export.Dim("batch", max=64), torch.export.Dim("seq_len", max=16)
    program = torch.export.export(module, (ids,), dynamic_shapes=({0: batch, 1: seq_len},))
    other = torch.randint(0, 50, (3, 9), device=DEVICE)
    for inputs in (ids, other):
        assert_same(program.module()(inputs), module(inputs))
    assert tokemb_ops(program) == (["tokemb_fast.input_embedding.default"] if backend == "triton" else [])
    # Nothing is mutated, lifted as a constant or added as a buffer: the id flag is not in the graph.
    signature = program.graph_signature
    assert not signature.buffers_to_mutate and not signature.user_inputs_to_mutate and not program.constants
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert_same(torch.export.load(buffer).module()(other), module(other))
    assert_same(program.run_decompositions().module()(other), module(other))
    decomposed = program.run_decompositions(decomposition_table())
    assert tokemb_ops(decomposed) == []
    assert_same(decomposed.module()(other), module(other))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_exported_program_checks_no_ids_and_writes_no_state(backend, strict):
    module = FusedInputEmbedding(10, 6, 4, device=DEVICE).eval()
    program = torch.export.export(module, (torch.tensor([[1, 2, 3]], device=DEVICE),), strict=strict)
    if backend == "triton":  # a pure function: bad rows are NaN, nothing raises now or later
        out = program.module()(torch.tensor([[1, 12, 3]], device=DEVICE))
        assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()
        check_ids_now()
    assert not program.graph_signature.buffers_to_mutate and not program.constants


def test_a_training_mode_export_decomposes_its_dropout(backend):
    module = FusedInputEmbedding(50, 16, 64, dropout=0.5, device=DEVICE).train()
    ids = torch.randint(0, 50, (8, 16), device=DEVICE)
    program = torch.export.export(module, (ids,)).run_decompositions(decomposition_table())
    assert tokemb_ops(program) == []
    out = program.module()(ids)
    expected = module.tok_emb.weight[ids] + module.pos_emb.weight[:16]
    kept = out != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(out[kept], (2 * expected)[kept], rtol=1e-5, atol=1e-5)


def test_jit_script_is_refused_saying_why():
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile FusedInputEmbedding"):
        torch.jit.script(FusedInputEmbedding(10, 6, 4))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile GPTModel .*swapped"):
        torch.jit.script(swap_input_embeddings(GPTModel()))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the test models' attention unpacks a tensor)
def test_jit_trace_records_pytorch_ops_on_both_paths(backend):
    torch.manual_seed(0)
    module = FusedInputEmbedding(61, 16, 32, device=DEVICE).eval()
    original = GPTModel().to(DEVICE).eval()
    for model, reference in ((module, module), (swap_input_embeddings(copy.deepcopy(original)), original)):
        traced = torch.jit.trace(model, (torch.randint(0, 61, (2, 9), device=DEVICE),))
        assert "tokemb_fast::" not in str(traced.inlined_graph)  # (no op of ours: PyTorch's own)
        other = torch.randint(0, 61, (2, 9), device=DEVICE)
        assert_same(traced(other), reference(other))


# --- every swapped family: torch.export and ONNX ------------------------------------------------

class Logits(nn.Module):
    """What a user exports: ids in, logits out (Hugging Face models without their KV cache)."""

    def __init__(self, model, call):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, ids):
        return self.call(self.model, ids)


def _families():
    families = {
        "llms-from-scratch": (GPTModel, lambda m, ids: m(ids)),
        "llms-from-scratch-kv": (GPTModelKV, lambda m, ids: m(ids)),
        "llms-from-scratch-kv-optimized": (GPTModelKVOptimized, lambda m, ids: m(ids)),
        "nanogpt": (NanoGPT, lambda m, ids: m(ids, ids)[0]),
        "mingpt": (MinGPT, lambda m, ids: m(ids)[0]),
    }
    try:
        from llms_from_scratch import ch04
        from llms_from_scratch.kv_cache import gpt2 as kv_gpt2
        config = {"vocab_size": 61, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                  "drop_rate": 0.1, "qkv_bias": False}
        families["package ch04.GPTModel"] = (lambda: ch04.GPTModel(config), lambda m, ids: m(ids))
        families["package kv_cache.gpt2"] = (lambda: kv_gpt2.GPTModel(config), lambda m, ids: m(ids))
    except ImportError:
        pass
    try:
        import transformers
    except ImportError:
        return families
    special = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)
    hf = {
        "hf gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, **special)),
        "hf gpt-neo": lambda: transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            vocab_size=61, max_position_embeddings=16, hidden_size=32, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=8, **special)),
        "hf gpt-bigcode": lambda: transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
            vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, **special)),
        "hf opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=61, max_position_embeddings=16, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
            ffn_dim=64, num_attention_heads=4, **special)),
        "hf biogpt": lambda: transformers.BioGptForCausalLM(transformers.BioGptConfig(
            vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, scale_embedding=True, **special)),
    }
    for name, build in hf.items():
        families[name] = (build, lambda m, ids: m(input_ids=ids, use_cache=False).logits)
    encoder = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=24, pad_token_id=1)
    encoders = {
        "hf bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**encoder)),
        "hf roberta": lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(**encoder, type_vocab_size=1)),
        "hf distilbert": lambda: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=61, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=24, pad_token_id=1)),
        "hf electra": lambda: transformers.ElectraForMaskedLM(transformers.ElectraConfig(**encoder, embedding_size=16)),
        "hf xlm-roberta": lambda: transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(
            **encoder, type_vocab_size=1)),
    }
    for name, build in encoders.items():
        families[name] = (build, lambda m, ids: m(input_ids=ids).logits)
    return families


FAMILIES = _families()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_swapped_family_exports_decomposes_and_runs_in_onnxruntime(backend, family, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxscript, onnxruntime)")
    build, call = FAMILIES[family]
    torch.manual_seed(0)
    original = Logits(build(), call).to(DEVICE).eval()
    swapped = copy.deepcopy(original)
    swap_input_embeddings(swapped.model)
    ids = torch.randint(3, 61, (2, 7), device=DEVICE)
    expected = original(ids)

    program = torch.export.export(swapped, (ids,))
    assert len(tokemb_ops(program)) == (1 if backend == "triton" else 0)
    assert_same(program.module()(ids), expected)
    if backend == "triton":  # (the plain path's program holds PyTorch's own ops: nothing of ours to decompose)
        decomposed, error = _decompose(program)
        if error is None:
            assert tokemb_ops(decomposed) == []
            assert_same(decomposed.module()(ids), expected)
        else:
            # Only where the unswapped model's own decomposition fails the same way (HF GPT-2 under
            # transformers 5.25: a view of attention's transposed output): the swap made it no worse.
            assert _decompose(torch.export.export(original, (ids,)))[1] == error

    # From the model as users call it for one family; from the program just exported for the rest
    # (the exporter's own first step, done once), without the ONNX optimiser's pass.
    if family == "llms-from-scratch":
        onnx_program = torch.onnx.export(swapped, (ids,), dynamo=True, verbose=False)
    else:
        onnx_program = torch.onnx.export(program, (ids,), dynamo=True, verbose=False, optimize=False)
    path = str(tmp_path / "model.onnx")
    onnx_program.save(path)
    ops = {node.op_type for node in onnx_program.model_proto.graph.node}
    domains = {node.domain for node in onnx_program.model_proto.graph.node}
    assert "Gather" in ops and domains <= {"", "ai.onnx"}, (ops, domains)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.cpu().numpy()})
    assert_same(torch.from_numpy(got), expected.cpu())


def _decompose(program):
    """(the decomposed program, None) or (None, the error's type and first line)."""
    try:
        return program.run_decompositions(decomposition_table()), None
    except Exception as error:  # noqa: BLE001  (compared between the two models)
        return None, (type(error), str(error).splitlines()[0])


def test_an_exported_program_holding_the_op_exports_to_onnx(backend, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxscript, onnxruntime)")
    module = FusedInputEmbedding(50, 16, 8, token_scale=2.0, device=DEVICE).eval()
    ids = torch.randint(0, 50, (2, 5), device=DEVICE)
    program = torch.export.export(module, (ids,))
    onnx_program = torch.onnx.export(program, (ids,), dynamo=True, verbose=False)  # finds the decomposition itself
    path = str(tmp_path / "embedding.onnx")
    onnx_program.save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.cpu().numpy()})
    assert_same(torch.from_numpy(got), module(ids).detach().cpu())


def test_bad_ids_in_onnxruntime_are_as_docs_shipping_says(tmp_path):
    # docs/shipping.md: past the table, onnxruntime raises; a negative id counts from the end of the
    # table (ONNX Gather's definition), with no error. (The docs once said every bad id raised.)
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxscript, onnxruntime)")
    module = FusedInputEmbedding(50, 8, 16).eval()
    ids = torch.tensor([[1, 2, 3]])
    path = str(tmp_path / "embedding.onnx")
    torch.onnx.export(module, (ids,), dynamo=True, verbose=False).save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (got,) = session.run(None, {name: torch.tensor([[1, -3, 3]]).numpy()})
    assert torch.equal(torch.from_numpy(got), module(torch.tensor([[1, 47, 3]])).detach())
    with pytest.raises(Exception, match="(?i)indices|out of bounds|invalid"):
        session.run(None, {name: torch.tensor([[1, 50, 3]]).numpy()})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the exporter is PyTorch's legacy one, and says so)
def test_the_torchscript_onnx_exporter_works_on_both_paths(backend, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxscript, onnxruntime)")
    module = FusedInputEmbedding(50, 16, 8, device=DEVICE).eval()
    ids = torch.randint(0, 50, (2, 5), device=DEVICE)
    path = str(tmp_path / "embedding.onnx")
    torch.onnx.export(module, (ids,), path, dynamo=False, input_names=["ids"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"ids": ids.cpu().numpy()})
    assert_same(torch.from_numpy(got), module(ids).detach().cpu())


# --- AOTInductor ---------------------------------------------------------------------------------

# On the CPU path AOTInductor compiles a swapped GPTModel to C++: docs/shipping.md's block does it
# and compares the package's logits with the model's (tests/test_docs.py runs it; ~30 s of compile).


@requires_cuda
def test_aot_inductor_compiles_the_triton_path_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    original = GPTModel().cuda().eval()
    swapped = swap_input_embeddings(copy.deepcopy(original))
    ids = torch.randint(0, 61, (2, 9), device="cuda")
    program = torch.export.export(swapped, (ids,))
    assert tokemb_ops(program) == ["tokemb_fast.input_embedding.default"]
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "gpt.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    assert_same(loaded(ids), original(ids))
