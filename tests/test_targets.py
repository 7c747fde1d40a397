"""Every target file is valid data and gives a TVM target; every target builds."""
from __future__ import annotations

import shutil

import pytest

from mbn_codegen import targets
from mbn_codegen._tvm import Target

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
REQUIRED = {"x86_64", "x86_64-avx512", "arm64", "rpi3", "rpi5", "jetson-orin", "cuda"}


def test_required_targets_exist():
    assert REQUIRED <= set(targets.names())


@pytest.mark.parametrize("name", targets.names())
def test_target_file_gives_valid_tvm_target(name):
    spec = targets.load(name)
    t = spec.tvm_target()
    assert isinstance(t, Target)
    cpu = t.host if spec.device == "cuda" else t
    assert cpu is not None and cpu.kind.name == "llvm"
    triple = str(cpu.attrs.get("mtriple", ""))
    if spec.arch == "aarch64":
        assert triple.startswith("aarch64"), triple
        assert "arm_cpu" in list(cpu.keys)
        assert spec.cross_compiler == "aarch64-linux-gnu-g++"
    else:
        assert triple in ("", "x86_64-linux-gnu") or triple.startswith("x86_64")
    if spec.device == "cuda":
        assert t.kind.name == "cuda"
        assert str(t.attrs["arch"]) == spec.cuda_arch
        assert int(t.attrs["max_threads_per_block"]) > 0


def test_board_cpus():
    assert targets.load("arm64").target["mcpu"] == "cortex-a72"
    assert targets.load("rpi3").target["mcpu"] == "cortex-a53"
    assert targets.load("rpi5").target["mcpu"] == "cortex-a76"
    assert targets.load("jetson-orin").cuda_arch == "sm_87"
    assert bool(targets.load("rpi5").tvm_target().attrs.get("feature.has_dotprod", False))


def test_custom_target_file(tmp_path):
    src = (targets.HERE / "arm64.toml").read_text().replace("cortex-a72", "cortex-a55")
    (tmp_path / "mypi.toml").write_text(src)
    spec = targets.load(tmp_path / "mypi.toml")
    assert spec.name == "mypi" and spec.tvm_target().attrs["mcpu"] == "cortex-a55"


def _elf_machine(path) -> int:
    data = open(path, "rb").read(20)
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


@pytest.mark.parametrize("name", targets.names())
def test_every_target_builds(tmp_path, name):
    """`mbn-codegen build` works for every target file; the library is for the target's CPU."""
    from mbn_codegen.build import BuildConfig, build

    spec = targets.load(name)
    if spec.cross_compiler and shutil.which(spec.cross_compiler) is None:
        pytest.skip(f"{spec.cross_compiler} missing: apt-get install {spec.cross_compiler_package}")
    if spec.device == "cuda":
        from mbn_codegen.cuda import find_nvcc
        if find_nvcc() is None:
            pytest.skip("nvcc missing: CUDA targets compile their kernels with nvcc")
    out = build(BuildConfig(alpha=0.25, resolution=64, target=name, out=str(tmp_path / "a")),
                log=lambda s: None)
    assert _elf_machine(out / "lib.so") == ELF_MACHINE[spec.arch]
    import json
    man = json.loads((out / "manifest.json").read_text())
    assert man["arch"] == spec.arch and man["target"]["name"] == name
    if spec.device == "cuda":
        from mbn_codegen.cuda import module_binary_format
        assert module_binary_format(out / "lib.so") in ("fatbin", "cubin")
