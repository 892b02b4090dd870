"""csrc/diffloss_ops_cuda.cu compiles with nvcc for Hopper (sm_90) and Ada (sm_89), on a
machine without a GPU: the native CUDA kernels otherwise build only where a GPU is present."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from diffloss_fast.ops.native import source_dir

NVCC = shutil.which("nvcc")
ARCHS = (90, 89)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_kernels_compile_for_hopper_and_ada(tmp_path):
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(source_dir())]
    generated = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if not any((Path(i) / generated).is_file() for i in includes):
        # torch's CPU wheels leave out this header, which a CUDA build generates; for a
        # shared-library build it holds one define
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path))
    obj = tmp_path / "diffloss_ops_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    done = subprocess.run(
        [NVCC, "-c", str(source_dir() / "diffloss_ops_cuda.cu"), "-o", str(obj),
         *(f"-I{i}" for i in includes), "-std=c++20", "-O3", *cpp_extension.COMMON_NVCC_FLAGS,
         *gencode, "-DTORCH_EXTENSION_NAME=diffloss_fast_native_cuda",
         "-DTORCH_API_INCLUDE_EXTENSION_H", "-Xcompiler", "-fPIC"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-4000:]
    elves = subprocess.run([str(_cuobjdump()), "--list-elf", str(obj)], capture_output=True,
                           text=True, check=True).stdout
    for arch in ARCHS:  # a cubin for each architecture is in the object
        assert f"sm_{arch}" in elves, elves


def _cuobjdump() -> Path:
    """The toolkit's cuobjdump, or the copy Triton ships."""
    beside = Path(NVCC).resolve().with_name("cuobjdump")
    if beside.is_file():
        return beside
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
