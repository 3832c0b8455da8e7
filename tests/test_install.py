"""The package imports the same whether or not it is installed from this checkout.

setup.py installs the top-level kernels/ as tokemb_fast.kernels. A checkout's tokemb_fast has no
kernels of its own, yet it is what Python imports whenever the checkout is on the path (`python -m
pytest` in it, a script run from it), installed copy or not: tokemb_fast/_source_tree.py serves
tokemb_fast.kernels from ../kernels then. CI also runs part of the suite after a non-editable
install, from the checkout and from another directory (.ci/run).
"""
import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_checkout_runs_its_kernels_without_being_installed(tmp_path):
    checkout = tmp_path / "checkout"
    for name in ("tokemb_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent("""
        import torch, tokemb_fast, tokemb_fast.kernels
        from tokemb_fast import fused_input_embedding
        ids, token_weight, position_weight = torch.tensor([[1, 2, 3]]), torch.randn(5, 4), torch.randn(3, 4)
        out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
        assert torch.equal(out, token_weight[ids] + position_weight), out
        print(tokemb_fast.__file__)
        print(tokemb_fast.kernels.__file__)
        print(tokemb_fast.kernels.forward.__file__)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    package, kernels, forward = done.stdout.strip().splitlines()
    assert package == str(checkout / "tokemb_fast" / "__init__.py")
    assert kernels == str(checkout / "kernels" / "__init__.py")
    assert forward == str(checkout / "kernels" / "forward.py")


def test_an_installed_package_does_not_add_the_finder():
    import tokemb_fast
    from tokemb_fast import _source_tree
    installed = os.path.isdir(os.path.join(os.path.dirname(tokemb_fast.__file__), "kernels"))
    finders = [finder for finder in sys.meta_path if type(finder).__name__ == "_SourceKernelsFinder"]
    assert (finders == []) == installed, (tokemb_fast.__file__, finders)
    assert os.path.dirname(sys.modules["tokemb_fast.kernels"].__file__) in (
        os.path.join(os.path.dirname(tokemb_fast.__file__), "kernels"), _source_tree._SOURCE_KERNELS)
