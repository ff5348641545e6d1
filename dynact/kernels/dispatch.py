"""Fused forward and backward passes of CRReLU and EAFOActivation: building, choosing and calling them.

Eager PyTorch runs one kernel per elementwise operation, so ``relu(x) + eps * s(x)`` written
with tensor ops reads and writes the tensor several times per direction. Here each direction is
one pass: the forward reads ``x`` and writes ``y``; the backward reads ``x`` and ``grad`` and
writes ``grad_x`` while summing ``grad * s(x)`` (the ``eps`` gradient) in the same loop, the
memory traffic of GELU's own kernels.

- CPU: ``dynact.kernels.cpu.SOURCE``, plain C++ (no PyTorch headers, a few seconds to build),
  compiled once per machine with the system's C++ compiler and cached under ``$DYNACT_CACHE``
  (default ``~/.cache/dynact``), then called through :mod:`ctypes`. The eps gradient is summed
  in double over fixed chunks, so it is the same bit for bit whatever the thread count
  (deterministic mode needs nothing more). Inside a chunk, runs of 512 elements are summed in
  the compute type first; for float32 with AVX2 in eight lanes, eight elements at a time, a
  run's last (< 8) elements added to the first lane one by one, then the lanes in order.
- CUDA: Triton kernels (:mod:`dynact.kernels.cuda`) when Triton is installed; per-block partial sums
  of the eps gradient are added by one deterministic ``torch.sum``.

Per call the eager path does only what must be done per call: one check (:func:`eager_fused`),
the kernel call, and the tables built once per change of the spline (:class:`SplineTables`,
cached by the module). The commonest call, an ``EAFOActivation`` on a float32 CPU input with ReLU
or GELU as its base, goes through a PyTorch operator with its autograd in C++
(``dynact_op::spline``, :mod:`dynact.kernels.cpu_op`, :func:`fused_spline`): the same kernels,
without the Python around them in either direction. It needs PyTorch's headers and 40-60 s
to build, so it builds once per machine in a background thread (cached beside the kernels, one
process at a time, once a process has made :data:`OP_BUILD_AFTER_CALLS` calls) while the Python
Function serves the calls.

``eps`` is read by the kernels from its own memory and its gradient is written in its dtype and
shape. Inputs whose elements fill their memory once each (contiguous, channels_last, a
transposed matrix) are used as they lie and the output has their layout.

Where a fast path cannot be built (no compiler, build error, no Triton) the reference path runs
instead (the autograd functions of :mod:`dynact.activations` and :mod:`dynact.spline`) and one
warning says why. ``DYNACT_KERNELS=reference`` turns the fused kernels off.

Under ``torch.jit.trace``, a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``) or
``torch.autograd.forward_ad`` the modules run plain tensor ops (:func:`plain_ops_needed`): a
traced module then holds only standard ops, and the transforms differentiate and batch them.

Under ``torch.compile``: on CPU the graph calls the C++ kernels as ``torch.library`` custom ops
(``dynact::spline_forward``, ``dynact::crrelu_forward``; opaque to the compiler, no graph
break); on CUDA the activations are plain tensor ops, which Inductor fuses with their
neighbours.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad as _forward_ad

from dynact.kernels import cpu, cpu_op
from dynact.kernels.reference import _compute_dtype, _tables

__all__: list[str] = []

#: "auto": fused kernels where they can be built, the reference path elsewhere; "reference":
#: never fused; "ops": plain tensor ops as under torch.compile (for tests and benchmarks). Read
#: from the environment variable DYNACT_KERNELS; tests change it directly.
MODE = os.environ.get("DYNACT_KERNELS", "auto").strip().lower()

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
          # Without these GCC leaves the loops scalar (errno and trap-free selects block it).
          "-fno-math-errno", "-fno-trapping-math",
          # Multiply-adds are fused exactly where the source says so (as ATen's addcmul does).
          "-ffp-contract=off"]
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_ABI = 6

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None  # why the CPU library is unavailable (None: not tried or built)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cache_dir() -> Path:
    root = os.environ.get("DYNACT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dynact"


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_id() -> str:
    # -march=native binds the library to this processor: its flags are part of the cache key.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cxx: str, force: bool = False, *, stem: str = "dynact_kernels", source: Optional[str] = None,
           flags: Optional[list[str]] = None, libs: tuple[str, ...] = (), key: str = "", lock: bool = False,
           before_compiling: Optional[Callable[[], None]] = None) -> Path:
    """Compile a library once per (source, compiler, flags, processor); return its path.

    By default the kernels' library (``cpu.SOURCE`` with ``_FLAGS``); :func:`_build_op` passes
    the operator's source, flags, libraries and a ``key`` naming what else the library depends on.
    A cached library is used only if it matches the size and SHA-256 recorded beside it
    (``<name>.so.sha256``) when it was built; anything else (a truncated copy, a foreign file, a
    cache from before the record existed) is rebuilt, as is everything when ``force``. Loading
    a truncated shared library can kill the process with SIGBUS, so nothing is loaded unchecked.
    Every file is written beside its target and renamed into place, so no process ever reads a
    half-written library or record, and one already loaded keeps its own copy when another
    process replaces it. With ``lock`` one process at a time builds (the others wait, then find
    the library built). ``before_compiling`` runs (and may block) when the cache does not have
    the library, before anything is compiled.
    """
    source = cpu.SOURCE if source is None else source
    flags = _FLAGS if flags is None else flags
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                             env=_environment()).stdout
    digest = hashlib.sha256(
        "\n".join([source, cxx, version, " ".join(flags), " ".join(libs), key, _cpu_id(), sys.platform]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{stem}_{digest}.so"
    if not force and _intact(target):
        return target
    if before_compiling is not None:
        before_compiling()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _one_builder(target, lock):
        if not force and _intact(target):  # built by the process this one waited for
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
            out, src = Path(tmp) / target.name, Path(tmp) / f"{stem}.cpp"
            src.write_text(source)
            errors = []
            # Compilers without OpenMP (Apple's clang) or -march=native still give a fused,
            # single-threaded library.
            for drop in ((), ("-fopenmp",), ("-fopenmp", "-march=native")):
                kept = [f for f in flags if f not in drop]
                rc, stderr = _compile([cxx, *kept, str(src), "-o", str(out), *libs])
                if rc == 0:
                    break
                errors.append(stderr.strip()[-1500:])
            else:
                raise RuntimeError(f"{cxx} failed: {errors[0]}")
            record = Path(tmp) / "record"
            record.write_text(_fingerprint(out))
            os.replace(out, target)
            # The record follows the library: a reader seeing the new library with the old record
            # (or none) rebuilds rather than loads.
            os.replace(record, _record_path(target))
    return target


_compiling: set = set()  # compiler processes running now (killed if the interpreter exits first)
_exiting = False


def _environment() -> Optional[dict[str, str]]:
    """A copy of the environment for a compiler's process (None: inherit it, if it kept changing).

    The operator builds in a background thread while the program goes on, and programs set
    environment variables (Lightning does at setup). A child started with the inherited
    environment reads the process's ``environ`` array after the fork, which a ``setenv`` in
    another thread may have just reallocated: the build then failed with ``OSError: [Errno 14]
    Bad address``. A copy is turned into the child's own array before the fork."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except KeyError:  # a variable deleted between the copy's listing of the keys and its read
            continue
    return None


def _compile(cmd: list[str]) -> tuple[int, str]:
    """Run one compiler command; ``(return code, stderr)``."""
    if _exiting:
        raise RuntimeError("the interpreter is exiting")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_environment())
    _compiling.add(proc)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    finally:
        _compiling.discard(proc)
    return proc.returncode, stderr


@atexit.register
def _stop_compiling() -> None:
    # A background build still running when the interpreter exits: stop its compiler rather than
    # leave it to finish a library that nobody will move into place.
    global _exiting
    _exiting = True
    for proc in list(_compiling):
        proc.kill()


@contextlib.contextmanager
def _one_builder(target: Path, lock: bool):
    """Hold ``<target>.lock`` (an advisory file lock) while building, if ``lock`` and the
    platform has one; a process that waited then finds the library built."""
    if not lock:
        yield
        return
    try:
        import fcntl
    except ImportError:  # no advisory locks here: builders may race, each renaming a whole file
        yield
        return
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _fingerprint(path: Path) -> str:
    """``"<size> <sha256>"`` of a file's bytes."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _intact(library: Path) -> bool:
    """Whether ``library`` is exactly the file its record describes."""
    try:
        return _record_path(library).read_text().strip() == _fingerprint(library)
    except OSError:  # either file missing or unreadable
        return False


def _load() -> Optional[ctypes.CDLL]:
    """The CPU library, built on first use; None (and one warning) if it cannot be built."""
    global _lib, _failure, _gelu_built
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is not None or _failure is not None:
            return _lib
        cxx = _compiler()
        try:
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            try:
                lib = ctypes.CDLL(str(_build(cxx)))
            except OSError:  # a file matching its record that still does not load: build it afresh
                lib = ctypes.CDLL(str(_build(cxx, force=True)))
            if lib.dynact_abi_version() != _ABI:
                raise RuntimeError("stale library in the cache")
            _declare(lib)
            _gelu_built = bool(lib.dynact_gelu_in_kernel())
            _lib = lib
        except Exception as err:  # any failure means: use the reference path
            _failure = f"{type(err).__name__}: {err}"
            _warn_once("cpu", f"dynact: the fused CPU kernels could not be built ({_failure}); "
                              "using the slower reference path")
    return _lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.dynact_eafo_forward.argtypes = [i32, i32, p, p, p, i64, p, f64, f64, i32, p, i32, i32]
    lib.dynact_eafo_backward.argtypes = [i32, i32, p, p, p, p, i32, i64, p, f64, f64, i32, p, i32, i32]
    lib.dynact_crrelu_forward.argtypes = [i32, p, p, i64, p, i32, i32]
    lib.dynact_crrelu_backward.argtypes = [i32, p, p, p, p, i32, i64, p, i32, i32]
    lib.dynact_gelu_in_kernel.argtypes = []
    lib.dynact_bin_rows.argtypes = [i32, i32, p, i64, i64, p, p, p, p, p, i32]
    lib.dynact_bin_rows.restype = i32
    for fn in (lib.dynact_eafo_forward, lib.dynact_eafo_backward, lib.dynact_crrelu_forward,
               lib.dynact_crrelu_backward, lib.dynact_gelu_in_kernel):
        fn.restype = i32


def _reset() -> None:
    """Forget the library and the warnings (tests)."""
    global _lib, _failure
    _lib, _failure = None, None
    _warned.clear()
    _cuda().reset()


# ----------------------------------------------------------------------------- the C++ operator
# dynact_op::spline (dynact.kernels.cpu_op): the fused spline with its autograd in C++, for the
# common eager call (float32 CPU input, ReLU or GELU computed in the kernel). Built in a background
# thread from the first such call; until it is loaded (or if it cannot be built) the Python
# Function FusedSpline runs the same kernels. Never reset: a loaded operator stays registered.
_op = None  # torch.ops.dynact_op.spline.default once loaded
_sample = None  # torch.ops.dynact_op.sample.default once loaded
_op_thread: Optional[threading.Thread] = None
_op_failure: Optional[str] = None  # why the operator is unavailable (None: building, built or not tried)
_op_gelu = False  # whether its library computes GELU in the kernel (BASE_GELU_KERNEL: AVX2 and FMA)
#: Calls the Python Function serves before a process compiles the operator, when no cached copy
#: exists: a short script (a test, a quick check) ends before a minute's build could pay off, and
#: its exit would kill the compiler anyway; a training run reaches this within a few hundred steps.
#: A cached operator is loaded at the first call.
OP_BUILD_AFTER_CALLS = 10_000
_op_calls = 0  # eager calls served while the operator was not loaded
_op_wanted = False  # set by torch_op(wait=True): build now


def _wait_for_calls() -> None:
    while _op_calls < OP_BUILD_AFTER_CALLS and not _op_wanted and not _exiting:
        time.sleep(0.25)


def _op_build_flags() -> tuple[list[str], tuple[str, ...], str]:
    """Compiler flags, libraries and cache key of the operator: PyTorch's headers and libraries."""
    import logging

    # Importing cpp_extension on a machine without CUDA logs a warning about CUDA_HOME that does
    # not concern a CPU operator.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        includes, lib_dirs = cpp_extension.include_paths(), cpp_extension.library_paths()
    finally:
        log.setLevel(level)
    flags = [f for f in _FLAGS if not f.startswith("-std=")] + [
        "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # PyTorch's headers warn about things that do not concern this file.
        "-w", *(f"-I{d}" for d in includes)]
    libs = (*(f"-L{d}" for d in lib_dirs), "-lc10", "-ltorch_cpu", "-ltorch", *(f"-Wl,-rpath,{d}" for d in lib_dirs))
    return flags, libs, f"torch {torch.__version__} {' '.join(includes)}"


def _build_op() -> None:
    """Build (or find in the cache) and load the operator; on failure record why."""
    global _op, _op_failure, _op_gelu, _sample
    try:
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        flags, libs, key = _op_build_flags()
        path = _build(cxx, stem="dynact_op", source=cpu.SOURCE + cpu_op.GLUE, flags=flags, libs=libs, key=key,
                      lock=True, before_compiling=_wait_for_calls)
        torch.ops.load_library(str(path))
        _op_gelu = bool(ctypes.CDLL(str(path)).dynact_gelu_in_kernel())
        _register_compiled()
        _sample = torch.ops.dynact_op.sample.default
        _op = torch.ops.dynact_op.spline.default
    except Exception as err:  # the Python Function keeps serving every call
        _op_failure = f"{type(err).__name__}: {err}"


def sampler():
    """``dynact_op::sample`` (draw positions as ``torch.randint`` does and gather a float32 CPU
    input's values there, in one call) if the operator library is loaded, else None. Starts
    nothing: the spline's calls decide when the library loads (:func:`torch_op`)."""
    return _sample


def torch_op(wait: bool = False):
    """The C++ operator if it is loaded, else None; the first call starts a background thread that
    loads it from the cache, or builds it once the process has made :data:`OP_BUILD_AFTER_CALLS`
    calls.

    ``wait``: build now if needed and block until it is loaded or has failed (tests, benchmarks,
    compiled graphs); :data:`_op_failure` then says why it is None.
    """
    global _op_thread, _op_wanted
    if _op is not None or MODE != "auto" or (_op_thread is not None and not wait):
        return _op
    if wait:
        _op_wanted = True
    with _lock:
        if _op_thread is None:
            _op_thread = threading.Thread(target=_build_op, name="dynact-op-build", daemon=True)
            _op_thread.start()
    if wait and _op_thread is not None:
        _op_thread.join()
    return _op


def _cuda():
    """The Triton kernels (:mod:`dynact.kernels.cuda`), imported on first use."""
    from dynact.kernels import cuda  # optional dependency: Triton (imported by the first CUDA call)

    return cuda


def available(x: torch.Tensor) -> bool:
    """Whether a fused kernel serves ``x`` (its device and dtype) in this process."""
    if MODE != "auto" or x.dtype not in _DTYPES:
        return False
    if x.is_cpu:
        return _lib is not None or _load() is not None
    if x.is_cuda and x.dtype != torch.float64:
        return _cuda().available()
    return False


def eager_fused(x: torch.Tensor) -> bool:
    """Whether an eager call on ``x`` runs the fused kernels: every per-call check in one place
    (``DYNACT_KERNELS``, ``torch.compile``, :func:`plain_ops_needed`, :func:`available`)."""
    return (MODE == "auto" and not torch.compiler.is_compiling() and not plain_ops_needed()
            and available(x))


# ----------------------------------------------------------------------------- CPU calls
def bin_rows_cpu(kind: str, bins: int, values: torch.Tensor, filled: Optional[torch.Tensor], lo: torch.Tensor,
                 hi: torch.Tensor, out: torch.Tensor, ends: Optional[torch.Tensor]) -> bool:
    """:func:`dynact.density.rows.bin_rows` by the C++ library, written into its ``out`` (the
    same states bit for bit) and, unless None, ``ends`` (the extremes, found in the same pass).
    False, writing nothing, where it does not apply (not CPU float32, kernels off or not built):
    the caller then runs the tensor ops."""
    if (MODE != "auto" or not values.is_cpu or values.dtype != torch.float32 or values.dim() != 2
            or _load() is None):
        return False
    rows, n = values.shape
    values = values.contiguous()
    lo, hi = (t.to(torch.float64).contiguous() for t in (lo, hi))
    if filled is not None:
        filled = filled.to(torch.int64).contiguous()
    _check(_lib.dynact_bin_rows(0 if kind == "kde" else 1, bins, values.data_ptr(), rows, n,
                                None if filled is None else filled.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                                out.data_ptr(), None if ends is None else ends.data_ptr(), torch.get_num_threads()))
    return True


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError("dynact fused kernel: unsupported arguments")


def _threads(n: int) -> int:
    # The kernels split work in chunks of 16384 elements and stay on one thread below four of
    # them; asking torch for its thread count is then a call saved.
    return torch.get_num_threads() if n >= 65536 else 1


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where its elements fill their span of memory once each, in any order of the
    dimensions (contiguous, channels_last, a transposed matrix), else a contiguous copy. The
    kernels are elementwise: they run over that memory as one flat array, and an output made
    by ``torch.empty_like(x)`` has the same layout, so a channels_last input gives a
    channels_last output."""
    if x.is_contiguous():
        return x
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride(), strict=True), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return x.contiguous()
            expected *= size
    return x


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``x``) in ``x``'s dtype and memory layout, copied only if it is not already."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _on_memory(op, *tensors: torch.Tensor) -> torch.Tensor:
    """An elementwise ATen op on dense tensors of one layout, run over their memory as one flat
    array and returned in that layout: ATen's GELU took 1.6x as long on a channels_last input
    as on the same numbers in NCHW."""
    x = tensors[-1]
    if x.is_contiguous():
        return op(*tensors)
    n = x.numel()
    flat = op(*(t.as_strided((n,), (1,)) for t in tensors))
    return flat.as_strided(x.shape, x.stride())


def pack(value: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``(K + 3, 2)`` table of ``(value[j], slope[j])`` pairs (``slope`` padded with a zero), from
    the tables of ``dynact.kernels.reference._tables``: the kernels fetch both numbers with one load."""
    return torch.stack([value, torch.cat([slope, slope.new_zeros(1)])], 1).contiguous()


class SplineTables:
    """A spline's tables as the fused kernels take them, built once per change of the spline.

    ``value``, ``slope``, ``a``, ``b``: :func:`dynact.kernels.reference._tables` (tensors, for
    the differentiable formulas); ``pairs``: :func:`pack`; ``a_f``, ``b_f``, ``last``: the map
    and the last segment as Python numbers for the C++ calls (read once here, not per call).
    """

    __slots__ = ("value", "slope", "a", "b", "pairs", "a_f", "b_f", "last", "zero")

    def __init__(self, value: torch.Tensor, slope: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        self.value, self.slope, self.a, self.b = value, slope, a, b
        self.pairs = pack(value, slope)
        self.last = self.pairs.shape[0] - 2
        # Read to the host for the C++ kernels only: on CUDA that would synchronise, and the
        # Triton kernels read the tensors themselves.
        self.a_f, self.b_f = (float(a), float(b)) if a.is_cpu else (math.nan, math.nan)
        #: Whether the spline is 0 everywhere (CPU only; False on CUDA, where reading it would
        #: synchronise): a GELU base then runs as ATen's GELU, see :func:`gelu_base`.
        self.zero = bool(not self.pairs.any()) if self.pairs.is_cpu else False

    def as_tuple(self) -> tuple:
        return self.value, self.slope, self.a, self.b, self.pairs


#: Base codes of the fused spline: ``BASE_GIVEN`` the base's output comes in as ``y0``;
#: ``BASE_RELU`` ReLU is computed inside the kernel; ``BASE_GELU`` (CPU) GELU (erf form) runs as
#: ATen's own kernels inside the autograd function (bit for bit ``nn.GELU``'s values and
#: gradient), so the module is one autograd node and the kernel adds the spline's gradient to
#: GELU's in place, the addition autograd would make with a separate base; ``BASE_GELU_KERNEL``
#: (CPU, float32, AVX2) GELU computed inside the kernel in the same pass as the spline, chosen
#: for ``BASE_GELU`` by :func:`gelu_base` whenever the correction is not exactly 0.
BASE_GIVEN, BASE_RELU, BASE_GELU, BASE_GELU_KERNEL = 0, 1, 2, 3


def gelu_base(x: torch.Tensor, t: SplineTables, eps: torch.Tensor) -> int:
    """The code that computes a plain GELU base on the CPU: :data:`BASE_GELU_KERNEL` for float32
    where the library has it (AVX2 and FMA) and the correction ``eps * s`` is not exactly 0;
    :data:`BASE_GELU` otherwise.

    In the kernel, GELU and its derivative come out of the same pass over the tensor as the
    spline: forward and backward read and write the tensor once each, where ATen's GELU and a
    second pass read it twice (at 128x256 on a 2-core Zen 3, forward and backward went from
    1.83x to 1.18x ``nn.GELU``'s time; ``benchmarks/bench_depth.py``). Its values are within 8
    ulp of ``x * Phi(x)`` (``nn.GELU``'s within 9 on [-1, 1]), so they differ from ``nn.GELU``'s
    in the last bits. Where the correction is 0 (a zero spline,
    ``eps == 0``: a conversion that must not change the model) ATen's GELU runs, and the output
    is ``nn.GELU``'s bit for bit.
    """
    if x.dtype is not torch.float32 or t.zero or not _gelu_in_kernel():
        return BASE_GELU
    return BASE_GELU if eps.item() == 0 else BASE_GELU_KERNEL


def _gelu_in_kernel() -> bool:
    return _lib is not None and _gelu_built


_gelu_built = False  # whether the loaded library has BASE_GELU_KERNEL (set by _load)


def _spline_fwd(x: torch.Tensor, y0: Optional[torch.Tensor], t: SplineTables, base: int,
                eps: torch.Tensor) -> torch.Tensor:
    x = _dense(x)
    if base == BASE_GELU:
        y0, base = _on_memory(torch._C._nn.gelu, x), BASE_GIVEN
    elif base == BASE_GELU_KERNEL:
        y0 = None
    y0 = None if y0 is None else _like(y0, x)
    if x.is_cuda:
        return _cuda().eafo_forward(x, y0, t.pairs, t.a, t.b, eps)
    if not (eps.is_cpu and t.pairs.is_cpu):  # the kernel reads them from host memory
        raise RuntimeError(f"dynact: input on the CPU but the activation's tables and eps on {eps.device}")
    out = torch.empty_like(x)
    n = x.numel()
    _check(_lib.dynact_eafo_forward(_DTYPES[x.dtype], base, x.data_ptr(), None if y0 is None else y0.data_ptr(),
                                    out.data_ptr(), n, t.pairs.data_ptr(), t.a_f, t.b_f, t.last, eps.data_ptr(),
                                    _DTYPES[eps.dtype], _threads(n)))
    return out


def _spline_bwd(grad: torch.Tensor, x: torch.Tensor, t: SplineTables, base: int, eps: torch.Tensor,
                need_x: bool, need_eps: bool):
    x = _dense(x)
    grad = _like(grad, x)
    if x.is_cuda:
        gx, geps = _cuda().eafo_backward(grad, x, base == BASE_RELU, t.pairs, t.a, t.b, eps, need_x, need_eps)
        return gx, (None if geps is None else geps.to(eps.dtype).reshape(eps.shape))
    if base == BASE_GELU:  # GELU's gradient by ATen, the spline's added by the kernel
        gx = _on_memory(torch.ops.aten.gelu_backward, grad, x) if need_x else None
        base = BASE_GELU if need_x else BASE_GIVEN
    else:
        gx = torch.empty_like(x) if need_x else None
    geps = torch.empty_like(eps, memory_format=torch.contiguous_format) if need_eps else None
    n = x.numel()
    _check(_lib.dynact_eafo_backward(_DTYPES[x.dtype], base, grad.data_ptr(), x.data_ptr(),
                                     None if gx is None else gx.data_ptr(), None if geps is None else geps.data_ptr(),
                                     _DTYPES[eps.dtype], n, t.pairs.data_ptr(), t.a_f, t.b_f, t.last,
                                     eps.data_ptr(), _DTYPES[eps.dtype], _threads(n)))
    return gx, geps


def _tables_of(pairs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> SplineTables:
    t = SplineTables.__new__(SplineTables)
    t.pairs, t.a, t.b, t.last = pairs, a, b, pairs.shape[0] - 2
    t.a_f, t.b_f = (float(a), float(b)) if a.is_cpu else (math.nan, math.nan)
    return t


def eafo_forward(x: torch.Tensor, y0: Optional[torch.Tensor], pairs: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``base(x) + eps * s(x)``: ReLU as the base if ``y0`` is None, else ``y0 + eps * s(x)``.

    ``pairs`` (see :func:`pack`), ``a``, ``b``: the spline's tables in the compute dtype (float32
    for half inputs); ``eps`` one element. Scalars stay tensors so that CUDA never synchronises.
    """
    return _spline_fwd(x, y0, _tables_of(pairs, a, b), BASE_RELU if y0 is None else BASE_GIVEN, eps)


def eafo_backward(grad: torch.Tensor, x: torch.Tensor, relu: bool, pairs: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, eps: torch.Tensor, need_x: bool, need_eps: bool):
    """``(grad_x, grad_eps)``: ``grad_x`` includes ReLU's derivative if ``relu``; ``grad_eps`` 0-d
    in ``eps``'s dtype (callers reshape it to ``eps``'s shape)."""
    gx, geps = _spline_bwd(grad, x, _tables_of(pairs, a, b), BASE_RELU if relu else BASE_GIVEN, eps, need_x,
                           need_eps)
    return gx, (None if geps is None else geps.reshape(()))


def crrelu_forward(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    x = _dense(x)
    if x.is_cuda:
        return _cuda().crrelu_forward(x, eps)
    if not eps.is_cpu:  # the kernel reads it from host memory
        raise RuntimeError(f"dynact: input on the CPU but CRReLU's eps on {eps.device}")
    out = torch.empty_like(x)
    n = x.numel()
    _check(_lib.dynact_crrelu_forward(_DTYPES[x.dtype], x.data_ptr(), out.data_ptr(), n, eps.data_ptr(),
                                      _DTYPES[eps.dtype], _threads(n)))
    return out


def crrelu_backward(grad: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, need_x: bool, need_eps: bool):
    """``(grad_x, grad_eps)``, ``grad_eps`` 0-d in ``eps``'s dtype."""
    gx, geps = _crrelu_bwd(grad, x, eps, need_x, need_eps)
    return gx, (None if geps is None else geps.reshape(()))


def _crrelu_bwd(grad: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, need_x: bool, need_eps: bool):
    """``(grad_x, grad_eps)``, ``grad_eps`` in ``eps``'s shape and dtype."""
    x = _dense(x)
    grad = _like(grad, x)
    if x.is_cuda:
        gx, geps = _cuda().crrelu_backward(grad, x, eps, need_x, need_eps)
        return gx, (None if geps is None else geps.to(eps.dtype).reshape(eps.shape))
    gx = torch.empty_like(x) if need_x else None
    geps = torch.empty_like(eps, memory_format=torch.contiguous_format) if need_eps else None
    n = x.numel()
    _check(_lib.dynact_crrelu_backward(_DTYPES[x.dtype], grad.data_ptr(), x.data_ptr(),
                                       None if gx is None else gx.data_ptr(),
                                       None if geps is None else geps.data_ptr(), _DTYPES[eps.dtype], n,
                                       eps.data_ptr(), _DTYPES[eps.dtype], _threads(n)))
    return gx, geps


# ----------------------------------------------------------------------------- the formulas in tensor ops
# The kernels' arithmetic in differentiable tensor ops: the backward under create_graph=True
# (a kernel's result has no graph), the custom ops' fallback, and their second derivatives.

#: ``x*x`` is capped here before ``exp(-x*x/2)``: beyond it the Gaussian is exactly 0 in every
#: dtype (``exp(-5000)``), and the cap keeps ``(1 - x*x) * exp(-x*x/2)`` at 0 where ``x*x``
#: overflows (``|x| >= 256`` in float16, ``1.8e19`` in float32/bfloat16) instead of
#: ``-inf * 0 = NaN``. The C++ and Triton kernels cap it the same way.
X2_CAP = 1e4


def gauss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x2, exp(-x2/2))`` with ``x2 = min(x*x, X2_CAP)``: finite for finite ``x``, NaN stays NaN."""
    x2 = (x * x).clamp_max(X2_CAP)
    return x2, torch.exp(-0.5 * x2)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def crrelu_grads(grad, x, eps, need_x: bool = True, need_eps: bool = True):
    """CRReLU's backward ``(grad_x, grad_eps)`` in differentiable tensor ops; ``grad_eps`` has
    ``eps``'s shape and is summed in float32 or wider."""
    x2, g = gauss(x)
    gx = geps = None
    if need_x:
        gx = grad * ((x > 0).to(x.dtype) + eps.reshape(()).to(x.dtype) * (1 - x2) * g)
    if need_eps:
        geps = (grad * x * g).sum(dtype=_acc(x.dtype)).to(eps.dtype).reshape(eps.shape)
    return gx, geps


def _spline_parts(x, pairs, a, b):
    """``(s(x), slope_j)`` in the compute dtype ``pairs.dtype``; differentiable in ``x``
    (``ds/dx = a * slope_j``)."""
    last = pairs.shape[0] - 2
    u = torch.addcmul(b, x.to(pairs.dtype), a).clamp(0.0, float(last))
    j = u.to(torch.int32).clamp(0, last).long()
    slope = pairs[j, 1]
    return torch.addcmul(pairs[j, 0], u - j, slope), slope


def spline_grads(grad, x, relu: bool, pairs, a, b, eps, need_x: bool = True, need_eps: bool = True):
    """The spline's backward ``(grad_x, grad_eps)`` in differentiable tensor ops (``grad_x``
    includes ReLU's derivative if ``relu``; ``grad_eps`` has ``eps``'s shape)."""
    s, slope = _spline_parts(x, pairs, a, b)
    g = grad.to(pairs.dtype)
    gx = geps = None
    if need_x:
        gx = g * slope * (a * eps.reshape(()).to(pairs.dtype))
        gx = (gx + g * (x > 0) if relu else gx).to(x.dtype)
    if need_eps:
        geps = (g * s).sum().to(eps.dtype).reshape(eps.shape)
    return gx, geps


# ----------------------------------------------------------------------------- autograd
class FusedSpline(torch.autograd.Function):
    """``base(x) + eps * s(x)`` in one pass per direction. ``base``: a code of :data:`BASE_GIVEN`
    (``y0`` holds the base's output), :data:`BASE_RELU`, :data:`BASE_GELU` or
    :data:`BASE_GELU_KERNEL` (the base computed inside the node, with its derivative in the
    backward; ``y0`` is None), as :func:`fused_spline` resolved it. ``tables``: a
    :class:`SplineTables`. Saves only ``x`` and ``eps``. Under ``create_graph=True`` the backward
    runs :func:`spline_grads` (and ATen's GELU backward for that base), so second derivatives
    (through ``x``, ``eps`` and the incoming gradient) are those of the reference path."""

    @staticmethod
    def forward(ctx, x, eps, y0, tables, base):  # noqa: D102
        ctx.tables, ctx.base = tables, base
        ctx.save_for_backward(x, eps)
        return _spline_fwd(x, y0, tables, base, eps)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, eps = ctx.saved_tensors
        need_x, need_eps, need_y0 = ctx.needs_input_grad[:3]
        t, base = ctx.tables, ctx.base
        if torch.is_grad_enabled():  # create_graph=True: the kernel's result would have no graph
            gx, geps = spline_grads(grad, x, base == BASE_RELU, t.pairs, t.a, t.b, eps, need_x, need_eps)
            if need_x and base in (BASE_GELU, BASE_GELU_KERNEL):
                gx = torch.ops.aten.gelu_backward(grad, x) + gx
        elif need_x or need_eps:
            gx, geps = _spline_bwd(grad, x, t, base, eps, need_x, need_eps)
        else:
            gx = geps = None
        return gx, geps, (grad if need_y0 else None), None, None


def fused_spline(x: torch.Tensor, eps: torch.Tensor, y0: Optional[torch.Tensor], t: SplineTables,
                 base: int) -> torch.Tensor:
    """The eager fused spline (``EAFOActivation``'s common call): the C++ operator
    ``dynact_op::spline`` where it serves the call (float32 on the CPU, ReLU or GELU computed in
    the kernel) and is loaded, else :class:`FusedSpline`. Both run the same kernels on the same
    arguments: the numbers are the same bit for bit, the operator spends less time around them."""
    global _op_calls
    if base == BASE_GELU:
        base = gelu_base(x, t, eps)
    if ((base == BASE_RELU or base == BASE_GELU_KERNEL) and x.dtype is torch.float32 and x.is_cpu
            and eps.dtype is torch.float32 and eps.is_cpu and t.pairs.is_cpu and t.pairs.dtype is torch.float32):
        op = _op
        if op is None:
            _op_calls += 1
            op = torch_op()
        if op is not None:
            return op(x, eps, t.pairs, t.a, t.b, base)
    return FusedSpline.apply(x, eps, y0, t, base)


class FusedCRReLU(torch.autograd.Function):
    """``relu(x) + eps * x * exp(-x**2/2)`` in one pass per direction; saves only ``x`` and ``eps``."""

    @staticmethod
    def forward(ctx, x, eps):  # noqa: D102
        ctx.save_for_backward(x, eps)
        return crrelu_forward(x, eps)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, eps = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (second derivatives, e.g. dynact.eafo.derivatives): the same
            # formulas in differentiable tensor ops; the kernel's result would have no graph.
            return crrelu_grads(grad, x, eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return _crrelu_bwd(grad, x, eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def plain_ops_needed() -> bool:
    """Whether an eager call must run plain tensor ops instead of an autograd Function.

    True under ``torch.jit.trace`` (a Python Function cannot be saved in a TorchScript module),
    a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``: the kernels read raw
    memory, which batched or wrapped tensors do not have) and ``torch.autograd.forward_ad``
    (the Functions have no forward-mode formula). Costs a few attribute reads per call.
    """
    return (torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
            or _forward_ad._current_level >= 0)


# ----------------------------------------------------------------------------- under torch.compile (CPU)
# Inductor fuses the plain-ops formulas into one loop per direction, but on CPU its loop with
# the table gather (and ReLU's mask) ran 1.4-4.4x GELU where the C++ kernels run ~0.9x. So on
# CPU the compiled graph calls the kernels as opaque custom ops (no graph break; Inductor
# compiles everything around them). The choice is made when tracing, before anything is
# built: if the library then cannot be built, the ops compute the same formulas with tensor
# ops (after the one warning). The backward ops are differentiable too (second derivatives
# under create_graph=True), with the formulas of the section above.
def _fused_cpu() -> bool:
    return MODE == "auto" and _load() is not None


def _fake_out(x: torch.Tensor) -> torch.Tensor:
    """The fake tensors' result shaped as ``x``: the kernels write it in ``x``'s own layout where
    ``x`` is dense (a channels_last input gives a channels_last output), else contiguous
    (:func:`_dense`); a fake with other strides fails Inductor's check of the real output."""
    return torch.empty_like(_dense(x))


def _fake_grads(x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake tensors of a backward op's ``(grad_x, grad_eps)``."""
    return _fake_out(x), eps.new_empty(eps.shape)


@torch.library.custom_op("dynact::spline_forward", mutates_args=(), device_types="cpu")
def _spline_forward_op(x: torch.Tensor, y0: Optional[torch.Tensor], pairs: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    if _fused_cpu():
        return eafo_forward(x, y0, pairs, a, b, eps)
    s, _ = _spline_parts(x, pairs, a, b)
    base = torch.relu(x.to(pairs.dtype)) if y0 is None else y0.to(pairs.dtype)
    return torch.addcmul(base, s, eps.reshape(()).to(pairs.dtype)).to(x.dtype)


@_spline_forward_op.register_fake
def _fake_spline_forward(x, y0, pairs, a, b, eps):
    return _fake_out(x)


@torch.library.custom_op("dynact::spline_backward", mutates_args=(), device_types="cpu")
def _spline_backward_op(grad: torch.Tensor, x: torch.Tensor, relu: bool, pairs: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused_cpu():
        gx, geps = eafo_backward(grad, x, relu, pairs, a, b, eps, True, True)
        return gx, geps.reshape(eps.shape)
    return spline_grads(grad, x, relu, pairs, a, b, eps)


@_spline_backward_op.register_fake
def _fake_spline_backward(grad, x, relu, pairs, a, b, eps):
    return _fake_grads(x, eps)


def _spline_setup(ctx, inputs, output):
    x, y0, pairs, a, b, eps = inputs
    ctx.relu = y0 is None
    ctx.save_for_backward(x, pairs, a, b, eps)


def _spline_grads(ctx, grad):
    x, pairs, a, b, eps = ctx.saved_tensors
    gx, geps = _spline_backward_op(grad, x, ctx.relu, pairs, a, b, eps)
    return gx, (None if ctx.relu else grad), None, None, None, geps


_spline_forward_op.register_autograd(_spline_grads, setup_context=_spline_setup)


def _materialize(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _spline_backward_setup(ctx, inputs, output):
    grad, x, relu, pairs, a, b, eps = inputs
    ctx.relu = relu
    ctx.save_for_backward(grad, x, pairs, a, b, eps)


def _spline_backward_grads(ctx, ggx, ggeps):
    # gx = grad * (eps * ds/dx + relu * 1[x > 0]) with ds/dx = a * slope_j piecewise constant;
    # geps = sum(grad * s(x)).
    grad, x, pairs, a, b, eps = ctx.saved_tensors
    ggx, ggeps = _materialize(ggx, grad), _materialize(ggeps, eps)
    cdt = pairs.dtype
    s, slope = _spline_parts(x, pairs, a, b)
    ds = slope * a
    g, ggx = grad.to(cdt), ggx.to(cdt)
    ggeps = ggeps.reshape(()).to(cdt)
    d_grad = ggx * (eps.reshape(()).to(cdt) * ds) + ggeps * s
    if ctx.relu:
        d_grad = d_grad + ggx * (x > 0)
    d_x = (ggeps * g * ds).to(x.dtype)
    d_eps = (ggx * g * ds).sum().to(eps.dtype).reshape(eps.shape)
    return d_grad.to(grad.dtype), d_x, None, None, None, None, d_eps


_spline_backward_op.register_autograd(_spline_backward_grads, setup_context=_spline_backward_setup)


@torch.library.custom_op("dynact::crrelu_forward", mutates_args=(), device_types="cpu")
def _crrelu_forward_op(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    if _fused_cpu():
        return crrelu_forward(x, eps)
    return torch.relu(x) + eps.reshape(()).to(x.dtype) * x * gauss(x)[1]


@_crrelu_forward_op.register_fake
def _fake_crrelu_forward(x, eps):
    return _fake_out(x)


@torch.library.custom_op("dynact::crrelu_backward", mutates_args=(), device_types="cpu")
def _crrelu_backward_op(grad: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused_cpu():
        gx, geps = crrelu_backward(grad, x, eps, True, True)
        return gx, geps.reshape(eps.shape)
    return crrelu_grads(grad, x, eps)


@_crrelu_backward_op.register_fake
def _fake_crrelu_backward(grad, x, eps):
    return _fake_grads(x, eps)


def _crrelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _crrelu_grads(ctx, grad):
    x, eps = ctx.saved_tensors
    return _crrelu_backward_op(grad, x, eps)


_crrelu_forward_op.register_autograd(_crrelu_grads, setup_context=_crrelu_setup)


def _crrelu_backward_grads(ctx, ggx, ggeps):
    # gx = grad * (1[x > 0] + eps (1 - x^2) G), geps = sum(grad x G), G = exp(-x^2/2);
    # d/dx [(1 - x^2) G] = x (x^2 - 3) G and d/dx [x G] = (1 - x^2) G.
    grad, x, eps = ctx.saved_tensors
    ggx, ggeps = _materialize(ggx, grad), _materialize(ggeps, eps)
    x2, g = gauss(x)
    e, ggeps = eps.reshape(()).to(x.dtype), ggeps.reshape(()).to(x.dtype)
    d_grad = ggx * ((x > 0).to(x.dtype) + e * (1 - x2) * g) + ggeps * x * g
    d_x = grad * (ggx * e * (x2 - 3) * g * x + ggeps * (1 - x2) * g)
    d_eps = (ggx * grad * (1 - x2) * g).sum(dtype=_acc(x.dtype)).to(eps.dtype).reshape(eps.shape)
    return d_grad, d_x, d_eps


def _crrelu_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_crrelu_backward_op.register_autograd(_crrelu_backward_grads, setup_context=_crrelu_backward_setup)


def compiled_on_cpu(x: torch.Tensor) -> bool:
    """Whether a compiled graph should call the kernels as custom ops (CPU, kernels not off)."""
    return MODE == "auto" and x.device.type == "cpu" and x.dtype in _DTYPES


# The same four custom ops in C++ (dynact_op::spline_forward, ...; dynact.kernels.cpu_op): the
# same kernels with the same arguments, without a Python call per op and direction (about 0.3 ms
# per layer and training step of a compiled model on a 2-core Zen 3). Their fake tensors are
# registered from Python once the library is loaded, their autograd is C++ with the Python ops'
# formulas (compiled graphs have no double backward, so the backward ops need none); the spline's
# build the tables from the module's knots and grid ends themselves. A plain GELU base runs
# inside the C++ op's kernel (float32), one pass per direction. A graph traced on the CPU waits for the library's
# build (once per machine, 40-60 s), so that every trace makes the same choice: the C++ ops
# where the library could be built.
_compiled_registered = False


def _register_compiled() -> None:
    """Fake tensors of the C++ custom ops (called once, after loading the library; their autograd
    is C++, see :mod:`dynact.kernels.cpu_op`)."""
    global _compiled_registered
    if _compiled_registered:
        return
    fakes = (("spline_forward", lambda x, y0, s, lo, hi, eps, base: _fake_out(x)),
             ("spline_backward", lambda grad, x, base, s, lo, hi, eps: _fake_grads(x, eps)),
             ("crrelu_forward", _fake_crrelu_forward), ("crrelu_backward", _fake_crrelu_backward))
    for name, fake in fakes:
        torch.library.register_fake(f"dynact_op::{name}")(fake)
    _compiled_registered = True


@torch.compiler.assume_constant_result
def _compiled_ops_in_cpp() -> bool:
    # Evaluated once per trace, outside the graph (a constant in it): waits for the build.
    return torch_op(wait=True) is not None and _compiled_registered


def spline_op(x, eps, y0, s, lo, hi, gelu: bool = False):
    """The fused spline as a custom op (for compiled graphs on CPU): ``y0 + eps * s(x)`` (ReLU as
    the base if ``y0`` is None), for the spline of knot values ``s`` on ``[lo, hi]`` (the
    module's buffers). ``gelu``: the base is GELU (erf form) and ``y0`` its output; with the C++
    ops, for float32 where the library has it, GELU is then computed in the kernel and ``y0`` is
    not used (one pass per direction; its values within 8 ulp of ``x Phi(x)``, see
    :func:`gelu_base`). The C++ ops build the kernels' tables from ``s``, ``lo`` and ``hi``
    themselves, the same numbers as :func:`dynact.kernels.reference._tables`, so the graph
    carries no table arithmetic; the Python ops get them computed in the graph."""
    if _compiled_ops_in_cpp():
        if gelu and x.dtype == torch.float32 and _op_gelu:
            return torch.ops.dynact_op.spline_forward.default(x, None, s, lo, hi, eps, BASE_GELU_KERNEL)
        base = BASE_RELU if y0 is None else BASE_GIVEN
        return torch.ops.dynact_op.spline_forward.default(x, y0, s, lo, hi, eps, base)
    value, slope, a, b = _tables(s, lo, hi, _compute_dtype(x.dtype))
    return _spline_forward_op(x, y0, pack(value, slope), a, b, eps)


def crrelu_op(x, eps):
    """Fused CRReLU as a custom op (for compiled graphs on CPU)."""
    if _compiled_ops_in_cpp():
        return torch.ops.dynact_op.crrelu_forward.default(x, eps)
    return _crrelu_forward_op(x, eps)
