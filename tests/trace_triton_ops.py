"""torch.compile(fullgraph=True) through the GPU path's triton_ops, on a machine without a GPU.

Run by tests/test_compile_sm90.py in a process of its own (it replaces Triton's active driver),
with TRITON_INTERPRET unset: python tests/trace_triton_ops.py OUT.json

Under the interpreter the ops are opaque custom ops, so the CPU compile tests never see what
Dynamo and AOT autograd do with the real ones: trace into each triton_op's body and turn every
wrap_triton launch into a triton_kernel_wrapper_functional node (what lets Inductor schedule our
kernels). Here the ops are the GPU's triton_ops, the kernels compile for sm_90a, and the stand-in
driver of bench/compile_report.py records launches instead of running them, so CPU tensors
stand in for CUDA ones: the traced graphs are the GPU's, the values are never computed (the
interpreter tests check those). Writes, per case, the call targets of every forward and backward
graph AOT autograd compiled (our kernels as "triton:<name>").
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "bench"), os.path.join(ROOT, "examples")]

from compile_report import CompileOnlyDriver  # noqa: E402  (exits if TRITON_INTERPRET=1)
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

driver.set_active(CompileOnlyDriver())

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402

from gpt_models import GPTModel  # noqa: E402
from tokemb_fast import FusedInputEmbedding, functional, swap_input_embeddings, triton_ops  # noqa: E402

assert not triton_ops.INTERPRETED
# The Triton path refuses CPU tensors without the interpreter; here they only carry shapes.
functional.resolve_backend = lambda backend, device: "triton"


def _kernel_name(node) -> str:
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    # Dynamo may wrap a plain kernel in a one-config Autotuner; ours has several configs.
    prefix = "triton:autotuned:" if isinstance(kernel, Autotuner) and len(kernel.configs) > 1 else "triton:"
    while hasattr(kernel, "fn"):  # Autotuner -> JITFunction -> the Python function
        kernel = kernel.fn
    return prefix + kernel.__name__


def _targets(graph_module):
    names = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            names.append(_kernel_name(node))
        else:
            names.append(str(getattr(node.target, "_name", None) or getattr(node.target, "__name__", node.target)))
    return names


def trace(fn, calls, dynamic=False):
    """Compile fn with fullgraph=True, run forward and backward for each call's arguments."""
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(_targets(graph_module))
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True,
                             dynamic=dynamic)
    for args in calls:
        compiled(*args).backward()
    return graphs


def main(path):
    torch.manual_seed(0)
    module = FusedInputEmbedding(50, 32, 64, check_ids=False, dropout=0.1, padding_idx=3,
                                 scale_grad_by_freq=True)

    def loss(ids, position_ids=None, past_length=0):
        return module(ids, position_ids=position_ids, past_length=past_length).float().square().mean()

    ids = torch.randint(0, 50, (3, 5))
    results = {
        "dropout, padding_idx, scale_grad_by_freq": trace(loss, [(ids,)]),
        "position_ids [B, T]": trace(loss, [(ids, torch.randint(0, 32, (3, 5)))]),
        "past_length, dynamic seq_len": trace(loss, [(ids, None, 4), (torch.randint(0, 50, (3, 9)), None, 2)],
                                              dynamic=True),
    }
    large = FusedInputEmbedding(50, 1024, 1024, check_ids=False)  # 2^20 outputs: the autotuned forward
    results["autotuned forward"] = trace(lambda ids: large(ids).float().mean(), [(torch.randint(0, 50, (1, 1024)),)])
    model = swap_input_embeddings(GPTModel(), verify=False)  # verify would compare uncomputed logits
    results["swapped GPTModel"] = trace(
        lambda ids: nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()),
        [(torch.randint(0, 61, (2, 16)),)])
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:  # the [hf] extra is optional
        GPT2LMHeadModel = None
    if GPT2LMHeadModel is not None:
        config = GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                            eos_token_id=0)
        hf_model = swap_input_embeddings(GPT2LMHeadModel(config), verify=False)
        results["swapped GPT2LMHeadModel"] = trace(
            lambda ids: nn.functional.cross_entropy(hf_model(input_ids=ids).logits.flatten(0, 1), ids.flatten()),
            [(torch.randint(0, 61, (2, 16)),)])
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
