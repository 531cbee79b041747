"""The top-level kernels/ folder ships as qtune.kernels and never poses as the 'kernels' hub package."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_qtune_kernels_imports_from_anywhere(tmp_path):
    result = _python("import qtune.kernels.nf4, qtune.kernels.w4a16, qtune.kernels.qlora_linear", tmp_path)
    assert result.returncode == 0, result.stderr


def test_kernels_is_not_importable_outside_the_checkout(tmp_path):
    result = _python("import kernels", tmp_path)
    assert result.returncode != 0 and "No module named 'kernels'" in result.stderr


def test_from_the_repository_root_kernels_is_an_empty_namespace_that_libraries_treat_as_absent():
    # Python makes any folder in the working directory importable by name; with no __init__.py ours is an
    # empty namespace, so bitsandbytes' probe fails and transformers reports the hub package missing.
    code = (
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'get_kernel')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('get_kernel imported')\n"
    )
    result = _python(code, REPO)
    assert result.returncode == 0, result.stderr
    assert not (REPO / "kernels" / "__init__.py").exists()
