"""sm_90 compile report of every ddfast GPU kernel, built without a GPU.

Triton: the launches the ops make are recorded in the CPU interpreter (every public op with the
``triton`` backend, forward and backward, in fp32/fp64/bf16/fp16, each option that selects a
kernel variant), then every distinct specialisation is compiled for sm_90 by Triton's own compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), with the signature, constexprs
and alignment attributes Triton's runtime binder derives from those arguments. Variants the CPU
cannot produce are added: ``PRECISION="tf32"`` next to every fp32 "ieee" launch (a CUDA-only
setting), and the other value of a boolean constexpr seen with one value only.

CUDA: ``nvcc -arch=sm_90 -Xptxas -v`` over csrc/cuda/*.cu; SASS from cuobjdump.

Per kernel and specialisation: registers, spill bytes, shared memory, tensor-core instructions
(``wgmma``/``mma`` in PTX or SASS ``HGMMA``/``HMMA``...), 128-bit global loads (PTX
``ld.global.v4`` of 32-bit / ``.v2`` of 64-bit elements for Triton, SASS ``LDG.E.128`` for CUDA) —
static instruction counts. Results are cached on disk, keyed on the kernel's source hash (with the
sources it calls), the specialisation and the compiler version: ``$DDFAST_KERNEL_CACHE`` or
~/.cache/ddfast/kernels.

Recording and compiling run in subprocesses: recording needs ``TRITON_INTERPRET=1`` and compiling
needs it unset, and Triton reads the variable once per process.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = 90
DTYPES = ("float32", "float64", "bfloat16", "float16")
_REPORT_VERSION = "4"  # bump when the parsed fields change: invalidates the cache

# Kernels on the hot path of a DD step: a register spill there fails the gate.
HOT_TRITON = {
    "bn_stat": {"_bn_forward_kernel", "_bn_backward_kernel"},
    "class_means": {"_segment_mean_kernel", "_gather_scale_kernel"},
    "dsa": {"_dsa_fwd_kernel", "_dsa_bwd_kernel", "_color_mean_kernel", "_grad_sum_kernel"},
    "gradient_match": {"_partials_kernel", "_backward_kernel"},
    "mmd": None,  # None: every kernel of the module
    "param_match": {"_param_match_partials_kernel", "_param_match_backward_kernel"},
    "supcon_nce": None,
}
HOT_CUDA = {
    "bn_stat": {"forward_kernel", "backward_kernel"},
    "class_mean_loss": None,  # None: every kernel of the file
    "class_means": None,
    "dsa": {"forward_kernel", "backward_kernel", "color_mean_kernel", "grad_sum_kernel"},
    "gradient_match": {"partials_kernel", "backward_kernel"},
    "mmd": None,
    "param_match": {"partial_sums_kernel", "backward_kernel"},
    "supcon_nce": None,
}
# Hot kernels whose spills are known and allowed until their redesign (tensor-core issue): the
# gate fails once one of them stops spilling, so the entry gets removed.
KNOWN_SPILLS = {
}
# Kernels that spill in some specialisations the CI gate does not compile (only the full report
# reaches them): tolerated there, never reported stale.
MAY_SPILL = {
}


def cache_dir() -> str:
    return os.environ.get("DDFAST_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ddfast",
                                                                 "kernels")


def _in_set(table, key, name) -> bool:
    if key not in table:
        return False
    names = table[key]
    return names is None or name in names


def is_hot(source: str, module: str, kernel: str) -> bool:
    return _in_set(HOT_TRITON if source == "triton" else HOT_CUDA, module, kernel)


def _module_key(row: dict) -> str:
    """"kernels/mmd.py" / "csrc/cuda/mmd.cu" -> "mmd" (the keys of the spill tables)."""
    return os.path.splitext(os.path.basename(row["module"]))[0]


def is_known_spill(source: str, module: str, kernel: str) -> bool:
    return _in_set(KNOWN_SPILLS, (source, module), kernel)


# --- discovery --------------------------------------------------------------------------------

def kernel_modules() -> List[str]:
    import ddfast.kernels

    return sorted(m.name for m in pkgutil.iter_modules(ddfast.kernels.__path__))


def jit_functions() -> Dict[str, Dict[str, object]]:
    """module short name -> {function name: @triton.jit object} defined in ddfast/kernels/*.py
    (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.jit import KernelInterface

    found = {}
    for short in kernel_modules():
        mod = importlib.import_module(f"ddfast.kernels.{short}")
        fns = {name: obj for name, obj in vars(mod).items()
               if isinstance(obj, KernelInterface) and getattr(obj.fn, "__module__", None) == mod.__name__}
        if fns:
            found[short] = fns
    return found


def _called_names(fn) -> set:
    tree = ast.parse(inspect.getsource(fn).lstrip())  # lstrip: decorator lines may be indented
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def launchable_kernels() -> Dict[str, List[str]]:
    """module -> names of its @triton.jit functions that no other @triton.jit function calls
    (the kernels; the rest are device helpers, compiled inside their callers)."""
    fns = jit_functions()
    called = set()
    for mod_fns in fns.values():
        for obj in mod_fns.values():
            called |= _called_names(obj.fn)
    return {mod: sorted(n for n in mod_fns if n not in called) for mod, mod_fns in fns.items()}


# --- recording (runs under TRITON_INTERPRET=1) ------------------------------------------------

def _encode(value):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "align": value.data_ptr() % 16}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, tl.constexpr):
        return _encode(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def recording(launches: list, label: Callable[[], str]):
    """Append every interpreted kernel launch to ``launches`` (JSON-able dicts) while open."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__.rsplit(".", 1)[-1], "kernel": self.fn.__name__,
                         "dtype": label(), "args": [_encode(a) for a in args],
                         "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _op_calls(dtype):
    """(name, thunk) pairs: each public op with the triton backend, forward + backward, small shapes,
    one call per option that selects a different kernel variant."""
    import torch

    import ddfast

    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    def labels(n, c):
        return torch.arange(n) % c

    def backward(out):
        out.float().sum().backward()

    # sizes reach the caps of the shape-dependent block sizes (gradient_match's BLOCK, the mmd /
    # supcon_nce feature tiles), so the recorded constexprs are those of real DD shapes
    def gm(metric, grouped, reduction):
        shapes = [(4, 64, 3, 3), (4,), (5, 6)] if not grouped else [(2, 4, 64, 3, 3), (2, 4), (2, 5, 6)]
        syn = [rand(*s, grad=True) for s in shapes]
        real = [rand(*s) for s in shapes]
        backward(ddfast.gradient_match(syn, real, metric, grouped=grouped, reduction=reduction, backend="triton"))

    def mmd(kernel, estimator, labelled):
        x, y = rand(12, 128, grad=True), rand(10, 128, grad=True)
        kw = dict(x_labels=labels(12, 3), y_labels=labels(10, 3), num_classes=3) if labelled else {}
        backward(ddfast.mmd(x, y, kernel=kernel, estimator=estimator, backend="triton", **kw))

    def supcon(variant):
        fs, fr = rand(6, 128, grad=True), rand(8, 128, grad=True)
        backward(ddfast.supcon_nce(fs, labels(6, 3), fr, labels(8, 3), variant=variant, backend="triton"))

    def dsa(align, rng):
        x = rand(4, 3, 8, 8, grad=True)
        groups = torch.tensor([0, 0, 1, 1])
        backward(ddfast.dsa_augment(x, groups, "color_crop_cutout_flip_scale_rotate", [1, 2],
                                    align_corners=align, backend="triton", rng=rng))

    def class_mean_loss():
        fr, fs = rand(9, 5), rand(6, 5, grad=True)
        backward(ddfast.class_mean_loss(fr, labels(9, 3), fs, labels(6, 3), num_classes=3, backend="triton"))

    def bn():  # small rows (several per backward tile); then 2 splits per channel and rows > a tile
        for shape in ((3, 4, 5, 5), (2, 2, 48, 48)):
            x = rand(*shape, grad=True)
            c = shape[1]
            backward(ddfast.bn_stat_loss(x, torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype),
                                         backend="triton"))

    def bn_eval_stat(affine):  # fused with an eval-mode BatchNorm: y written forward, grad_y read backward
        x = rand(2, 2, 48, 48, grad=True)
        w, b = (rand(2), rand(2)) if affine else (None, None)
        y, loss = ddfast.bn_eval_stat(x, torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype), w, b,
                                      backend="triton")
        backward(y.float().sum() + loss)

    def param_match():
        s = rand(300, grad=True)
        backward(ddfast.param_match(s, rand(300), rand(300), backend="triton"))

    def class_means():
        x = rand(9, 5, grad=True)
        backward(ddfast.class_means(x, labels(9, 3), 3, backend="triton")[0])

    calls = [(f"gradient_match {m} grouped={gr} {red}", lambda m=m, gr=gr, red=red: gm(m, gr, red))
             for m in ("ours", "mse", "cos") for gr, red in ((False, "sum"), (True, "none"))]
    calls += [(f"mmd {k} {e} labelled={lab}", lambda k=k, e=e, lab=lab: mmd(k, e, lab))
              for k in ("gaussian", "linear") for e in ("biased", "unbiased") for lab in (False, True)]
    calls += [(f"supcon_nce {v}", lambda v=v: supcon(v)) for v in ("infonce", "nce")]
    calls += [(f"dsa_augment align_corners={a} rng={r}", lambda a=a, r=r: dsa(a, r))
              for a, r in ((False, "reference"), (True, "device"))]
    def norm_relu_pool(pool, affine):  # a CIFAR-sized plane, forward + the input gradient
        x = rand(2, 3, 32, 32, grad=True)
        w, b = (rand(3), rand(3)) if affine else (None, None)
        backward(ddfast.norm_relu_pool(x, w, b, 1e-5, pool, backend="triton"))

    calls += [(f"bn_eval_stat affine={a}", lambda a=a: bn_eval_stat(a)) for a in (True, False)]
    calls += [("class_means", class_means), ("class_mean_loss", class_mean_loss), ("bn_stat_loss", bn),
              ("param_match", param_match)]
    calls += [(f"norm_relu_pool pool={p} affine={a}", lambda p=p, a=a: norm_relu_pool(p, a))
              for p, a in ((True, True), (False, False))]
    return calls


def record_launches(dtypes: Iterable[str] = DTYPES) -> dict:
    """{"launches": [...], "errors": [...]} of every op call of ``_op_calls`` in each dtype
    (in-process: needs TRITON_INTERPRET=1 set before triton was imported)."""
    import torch

    import ddfast

    ddfast.op_modules()
    launches, errors = [], []
    current = {"dtype": ""}
    with recording(launches, lambda: current["dtype"]):
        for name in dtypes:
            current["dtype"] = name
            for call_name, thunk in _op_calls(getattr(torch, name)):
                try:
                    thunk()
                except Exception as exc:  # noqa: BLE001 - reported, the gate decides
                    errors.append(f"{call_name} [{name}]: {type(exc).__name__}: {str(exc)[:300]}")
    return {"launches": launches, "errors": errors}


# --- compiling (runs with TRITON_INTERPRET unset) --------------------------------------------

def _decode(enc):
    import torch
    import triton.language as tl
    from triton.runtime.jit import MockTensor

    if "tensor" in enc:
        mock = MockTensor(getattr(torch, enc["tensor"]))
        mock.data_ptr = (lambda a: (lambda: a))(enc["align"])  # the recorded misalignment (0: 16-byte aligned)
        return mock
    if "tl_dtype" in enc:
        return tl.dtype(enc["tl_dtype"])
    return enc["value"]


def _gpu_sizes(launch: dict) -> dict:
    """Integer arguments rounded up to a multiple of 16, as typical GPU shapes are: Triton
    specialises on divisibility by 16 (it decides vectorised loads) and on the value 1, and the
    small shapes of the recording are rarely multiples of 16. So every size is compiled as a
    general size divisible by 16; the value-1 and odd-size specialisations are not compiled."""
    def fix(enc):
        v = enc.get("value")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return {"value": -(-v // 16) * 16}
        return enc

    return {**launch, "args": [fix(a) for a in launch["args"]]}


def _constexpr_names(fn) -> List[str]:
    """Names of the tl.constexpr parameters (JITFunction or InterpretedFunction)."""
    if hasattr(fn, "params"):
        return [p.name for p in fn.params if p.is_constexpr]
    return [p.name for p in inspect.signature(fn.fn).parameters.values() if "constexpr" in str(p.annotation)]


def _expand(launches: List[dict], fns: Dict[str, Dict[str, object]]) -> List[dict]:
    """Add what the CPU cannot launch: tf32 next to fp32 'ieee' dots, and the unseen value of
    boolean constexprs (per kernel and dtype)."""
    out = [_gpu_sizes(launch) for launch in launches]
    launches = list(out)
    for launch in launches:
        prec = launch["kwargs"].get("PRECISION")
        if prec == {"value": "ieee"} and launch["dtype"] == "float32":
            out.append({**launch, "kwargs": {**launch["kwargs"], "PRECISION": {"value": "tf32"}}, "variant": "tf32"})
    by_kernel: Dict[tuple, List[dict]] = {}
    for launch in out:
        by_kernel.setdefault((launch["module"], launch["kernel"], launch["dtype"]), []).append(launch)
    for (module, kernel, _dtype), group in by_kernel.items():
        fn = fns.get(module, {}).get(kernel)
        if fn is None:
            continue
        for name in _constexpr_names(fn):
            seen = {json.dumps(l["kwargs"].get(name)) for l in group}
            if seen <= {json.dumps({"value": True}), json.dumps({"value": False})} and len(seen) == 1:
                flipped = {"value": not json.loads(seen.pop())["value"]}
                first = group[0]
                out.append({**first, "kwargs": {**first["kwargs"], name: flipped},
                            "variant": f"{name}={flipped['value']} (not launched on CPU)"})
    return out


def _features(launch: dict) -> set:
    kw = {("kw", k, json.dumps(v)) for k, v in launch["kwargs"].items()}
    return kw | {("dtype", launch["dtype"])} | {("arg", i, a["tensor"]) for i, a in enumerate(launch["args"])
                                                if "tensor" in a}


def _dedupe(launches: List[dict]) -> List[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps([launch["module"], launch["kernel"], launch["dtype"], launch["args"], launch["kwargs"]],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def _cover(launches: List[dict]) -> List[dict]:
    """Per kernel, a greedy small set of launches that covers every input dtype, constexpr value,
    launch option (num_warps...) and pointer dtype seen at least once (not every combination)."""
    groups: Dict[tuple, List[dict]] = {}
    for launch in launches:
        groups.setdefault((launch["module"], launch["kernel"]), []).append(launch)
    out = []
    for group in groups.values():
        todo = set().union(*(_features(l) for l in group))
        while todo:
            best = max(group, key=lambda l: len(_features(l) & todo))
            out.append(best)
            todo -= _features(best)
    return out


def _bind(fn, launch, backend):
    """(options, signature, constexprs, attrs) exactly as Triton's runtime binder derives them."""
    from triton.runtime.jit import create_function_from_signature

    args = [_decode(a) for a in launch["args"]]
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def fp32_float_arguments(launch: dict, signature: dict) -> List[str]:
    """Names of the launch's Python-float arguments that Triton's binder typed fp32 (its type for an
    unannotated float): on a GPU a float64 kernel then sees the value rounded (1e-5 → 9.99999974e-6)."""
    names = list(signature)
    passed = {names[i]: a for i, a in enumerate(launch["args"]) if i < len(names)}
    passed.update(launch["kwargs"])
    return [n for n, a in passed.items()
            if isinstance(a, dict) and isinstance(a.get("value"), float) and signature.get(n) == "fp32"]


def _spec_text(launch, signature, constexprs, options) -> str:
    names = list(signature)
    consts = [f"{names[k[0]]}={getattr(v, 'name', v)}" for k, v in sorted(constexprs.items())
              if signature[names[k[0]]] == "constexpr" and k[0] < len(names)]
    text = f"{launch['dtype']} {' '.join(consts)} warps={options.num_warps}"
    ptrs = sorted({t for t in signature.values() if t.startswith("*")})
    return text + f" ptrs={','.join(ptrs)}"


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTX_TC = re.compile(r"^\s*(?:@!?%\w+\s+)?(wgmma\.mma_async|mma\.sync|wmma\.mma)", re.M)
_PTX_LD128 = re.compile(r"^\s*(?:@!?%\w+\s+)?ld\.global(?:\.\w+)*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64|u64|s64)|v8\.(?:b16|f16|bf16))\b",
                        re.M)
_PTX_LD = re.compile(r"^\s*(?:@!?%\w+\s+)?ld\.global\b", re.M)


def _ptx_counts(ptx: str) -> dict:
    return {"tensor_core": len(_PTX_TC.findall(ptx)), "ldg128": len(_PTX_LD128.findall(ptx)),
            "ldg": len(_PTX_LD.findall(ptx))}


def _compile_one(job) -> dict:
    """Compile one specialisation; the row of the report (never raises)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, launch, key = job
    fn = jit_functions()[module][kernel]
    target = GPUTarget("cuda", ARCH, 32)
    row = {"source": "triton", "module": f"kernels/{module}.py", "kernel": kernel, "arch": f"sm_{ARCH}",
           "hot": is_hot("triton", module, kernel), "known_spill": is_known_spill("triton", module, kernel),
           "regs": None, "spills": None, "stack": None, "smem": None, "tensor_core": None, "ldg128": None,
           "ldg": None, "error": None, "spec": launch.get("spec", ""), "variant": launch.get("variant", "")}
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # ptxas must run (its log is the register report): this
    # specialisation already missed ddfast's cache, Triton's own cache would only skip the log
    log = io.StringIO()
    try:
        options, signature, constexprs, attrs = _bind(fn, launch, _backend())
        narrowed = fp32_float_arguments(launch, signature)
        if narrowed:  # compiles, but a float64 kernel would compute with a rounded scalar
            row["error"] = (f"float argument(s) {', '.join(narrowed)} typed fp32 (a Python float): "
                            "annotate them tl.float64 and convert with _common.acc_scalar")
            return row
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a compile error is a row of the report
        row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        return row
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    static_smem = _PTXAS_SMEM.search(text)
    row["regs"] = int(regs.group(1)) if regs else None
    row["stack"] = int(spill.group(1)) if spill else None
    row["spills"] = int(spill.group(2)) + int(spill.group(3)) if spill else None
    row["smem"] = compiled.metadata.shared + (int(static_smem.group(1)) if static_smem else 0)
    row.update(_ptx_counts(compiled.asm["ptx"]))
    return row


_BACKEND = []


def _backend():
    if not _BACKEND:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        _BACKEND.append(make_backend(GPUTarget("cuda", ARCH, 32)))
    return _BACKEND[0]


def _spec_key(fn, launch) -> tuple:
    """(cache key, spec text): the compile-cache key of the specialisation, as Triton computes it."""
    import triton
    from triton.compiler import ASTSource
    from triton.compiler.compiler import get_cache_key, get_cache_invalidating_env_vars

    backend = _backend()
    options, signature, constexprs, attrs = _bind(fn, launch, backend)
    src = ASTSource(fn, signature, constexprs, attrs)
    parsed = backend.parse_options(options.__dict__)
    key = get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
    digest = hashlib.sha256(f"{_REPORT_VERSION}-{triton.__version__}-{key}".encode()).hexdigest()
    return digest, _spec_text(launch, signature, constexprs, options)


def compile_launches(recorded: dict, jobs: Optional[int] = None, level: str = "full") -> dict:
    """Rows for every distinct specialisation of ``recorded["launches"]`` (deduplicated, cached),
    plus the kernels never launched and the recording errors. level "gate": per kernel only enough
    launches to compile every dtype and every constexpr value once (the CI budget); "full": all."""
    fns = jit_functions()
    kernels = launchable_kernels()
    launches = _dedupe(_expand(recorded["launches"], fns))
    if level == "gate":
        launches = _cover(launches)
    todo, rows, seen, dtypes = [], [], set(), {}
    errors = list(recorded.get("errors", []))
    for launch in launches:
        fn = fns.get(launch["module"], {}).get(launch["kernel"])
        if fn is None:
            errors.append(f"launched kernel not found: {launch['module']}.{launch['kernel']}")
            continue
        try:
            key, spec = _spec_key(fn, launch)
        except Exception as exc:  # noqa: BLE001 - a bind error (bad argument types) is a compile error
            key, spec = None, f"{launch['dtype']} (binding failed)"
            rows.append({"source": "triton", "module": f"kernels/{launch['module']}.py", "kernel": launch["kernel"],
                         "spec": spec, "error": f"{type(exc).__name__}: {exc}", "hot": True, "known_spill": False})
            continue
        dtypes.setdefault(key, set()).add(launch["dtype"])  # input dtypes sharing this compiled kernel
        if key in seen:
            continue
        seen.add(key)
        cached = _cache_get(key)
        if cached is not None:
            rows.append({**_with_flags(cached), "key": key})
        else:
            todo.append((launch["module"], launch["kernel"], {**launch, "spec": spec}, key))
    for job, row in zip(todo, _map(_compile_one, todo, jobs)):
        if row["error"] is None and row["regs"] is not None:
            _cache_put(job[3], row)
        rows.append({**row, "key": job[3]})
    for row in rows:
        row["dtypes"] = sorted(dtypes.get(row.pop("key", None), ()))
    launched = {(l["module"], l["kernel"]) for l in launches}
    never = [f"kernels/{m}.py:{k}" for m, names in kernels.items() for k in names if (m, k) not in launched]
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["spec"]))
    return {"rows": rows, "never_launched": never, "errors": errors, "compiled": len(todo),
            "specialisations": len(seen)}


def compile_as_given(launches: List[dict]) -> List[dict]:
    """One row per launch, in order, each compiled exactly as given (no tf32/constexpr expansion,
    sizes as recorded), through the disk cache: for tests that pin the specialisations a launcher issues."""
    fns = jit_functions()
    rows = []
    for launch in launches:
        key, spec = _spec_key(fns[launch["module"]][launch["kernel"]], launch)
        row = _cache_get(key)
        if row is None:
            row = _compile_one((launch["module"], launch["kernel"], {**launch, "spec": spec}, key))
            if row["error"] is None and row["regs"] is not None:
                _cache_put(key, row)
        rows.append(row)
    return rows


def _map(func, items, jobs):
    items = list(items)
    jobs = jobs or min(4, os.cpu_count() or 1)
    if jobs <= 1 or len(items) <= 1:
        return [func(x) for x in items]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # workers inherit the imported kernels: no re-import
    with ctx.Pool(jobs) as pool:
        return pool.map(func, items, chunksize=1)


def _cache_path(key: str) -> str:
    return os.path.join(cache_dir(), key[:2], key + ".json")


def _cache_get(key: str) -> Optional[dict]:
    try:
        with open(_cache_path(key)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _with_flags(row: dict) -> dict:
    """hot / known_spill from the current tables (a cached row carries the tables of its day)."""
    if row.get("kernel") and row.get("module", "").startswith(("kernels/", "csrc/cuda/")):
        module = os.path.splitext(os.path.basename(row["module"]))[0]
        row["hot"] = is_hot(row["source"], module, row["kernel"])
        row["known_spill"] = is_known_spill(row["source"], module, row["kernel"])
    return row


def _cache_put(key: str, row: dict) -> None:
    path = _cache_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, path)  # atomic: concurrent gates never read half a file


# --- CUDA sources ----------------------------------------------------------------------------

def cuda_home() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _tool(name: str) -> Optional[str]:
    """A CUDA binary tool: CUDA_HOME/bin, PATH, or the copy Triton ships."""
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def cuda_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))


def nvcc_command(cu: str, out: str) -> List[str]:
    """The sm_90 compile of one .cu (the flags of the extension build, warnings on, ptxas verbose)."""
    return [os.path.join(cuda_home(), "bin", "nvcc"), f"-arch=sm_{ARCH}", "-O3", "-std=c++17", "-lineinfo",
            "-Xcompiler", "-Wall", "-Xptxas", "-v", "-c", cu, "-o", out]


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_name(demangled: str):
    """(kernel name, template arguments) of 'void ns::(anon)::name<float, float>(args)'."""
    head = demangled.replace("(anonymous namespace)", "anon")
    if head.endswith(")"):  # drop the parameter list: the last balanced (...)
        depth = 0
        for i in range(len(head) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(head[i], 0)
            if depth == 0:
                head = head[:i]
                break
    head = head.split(" ", 1)[1] if head.startswith("void ") else head
    template = ""
    if "<" in head:
        template = head[head.index("<") + 1:head.rindex(">")]
        head = head[:head.index("<")]
    return head.rsplit("::", 1)[-1], template.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def parse_ptxas(stderr: str) -> Dict[str, dict]:
    """mangled kernel name -> {regs, stack, spills, smem} from ``-Xptxas -v`` output."""
    stats, current = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            stats[current] = {"regs": None, "stack": 0, "spills": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            stats[current].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            stats[current]["regs"] = int(m.group(1))
            smem = _PTXAS_SMEM.search(line)
            stats[current]["smem"] = int(smem.group(1)) if smem else 0
    return stats


def parse_sass(sass: str) -> Dict[str, dict]:
    """mangled kernel name -> {ldg128, ldg, tensor_core} from ``cuobjdump -sass``."""
    out, current = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = {"ldg128": 0, "ldg": 0, "tensor_core": 0}
        elif current is not None:
            if re.search(r"\bLDG\.E\.128\b|\bLDG\.E\.\w*\.?128\b|\bLDG\.E\.128\.", line):
                out[current]["ldg128"] += 1
            if re.search(r"\bLDG\b|\bLDG\.", line):
                out[current]["ldg"] += 1
            if re.search(r"\b(HGMMA|HMMA|IMMA|DMMA|WGMMA)\b", line):
                out[current]["tensor_core"] += 1
    return out


def _cuda_key(cu: str) -> str:
    h = hashlib.sha256(_REPORT_VERSION.encode())
    for path in [cu] + sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.h*")) +
                              glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cuh")) +
                              glob.glob(os.path.join(REPO, "csrc", "*.h"))):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    h.update(" ".join(nvcc_command("x", "y")[1:]).encode())
    nvcc_version = subprocess.run([os.path.join(cuda_home(), "bin", "nvcc"), "--version"], capture_output=True,
                                  text=True).stdout
    h.update(nvcc_version.encode())
    return h.hexdigest()


def compile_cuda(cu: str, workdir: str) -> dict:
    """nvcc + cuobjdump of one .cu: {"returncode", "stderr", "rows"} (rows: one per kernel instance)."""
    obj = os.path.join(workdir, os.path.basename(cu) + ".o")
    res = subprocess.run(nvcc_command(cu, obj), capture_output=True, text=True, timeout=900)
    result = {"returncode": res.returncode, "stderr": res.stderr, "rows": []}
    if res.returncode != 0:
        return result
    stats = parse_ptxas(res.stderr)
    cuobjdump = _tool("cuobjdump")
    sass = {}
    if cuobjdump:
        dump = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, timeout=600)
        sass = parse_sass(dump.stdout)
    names = _demangle(sorted(stats))
    module = os.path.splitext(os.path.basename(cu))[0]
    for mangled, st in sorted(stats.items(), key=lambda kv: names[kv[0]]):
        kernel, template = _short_name(names[mangled])
        s = sass.get(mangled, {})
        result["rows"].append({
            "source": "cuda", "module": f"csrc/cuda/{module}.cu", "kernel": kernel, "spec": template,
            "arch": f"sm_{ARCH}", "variant": "", "hot": is_hot("cuda", module, kernel),
            "known_spill": is_known_spill("cuda", module, kernel), "error": None, **st,
            "tensor_core": s.get("tensor_core"), "ldg128": s.get("ldg128"), "ldg": s.get("ldg")})
    return result


def cuda_file_report(cu: str, use_cache: bool = True) -> dict:
    """compile_cuda's result for one .cu, cached (successful compiles) on the sources' hash."""
    key = "cuda-" + _cuda_key(cu)
    cached = _cache_get(key) if use_cache else None
    if cached is not None:
        cached["rows"] = [_with_flags(r) for r in cached["rows"]]
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_cuda(cu, tmp)
    if result["returncode"] == 0:
        _cache_put(key, result)
    return result


def cuda_rows(use_cache: bool = True) -> List[dict]:
    """Report rows of every csrc/cuda/*.cu (empty without nvcc)."""
    if cuda_home() is None:
        return []
    rows = []
    for cu in cuda_sources():
        result = cuda_file_report(cu, use_cache)
        if result["returncode"] != 0:
            rows.append({"source": "cuda", "module": os.path.relpath(cu, REPO), "kernel": "(file)", "spec": "",
                         "hot": True, "known_spill": False, "error": result["stderr"][-2000:]})
        rows.extend(result["rows"])
    return rows


# --- the report --------------------------------------------------------------------------------

def _run_self(args: List[str], env_update: Dict[str, Optional[str]], timeout: float) -> str:
    env = dict(os.environ)
    for k, v in env_update.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    res = subprocess.run([sys.executable, "-m", "ddfast.kernel_report", *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ddfast.kernel_report {args[0]} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res.stdout


def _interpreting() -> bool:
    """Whether @triton.jit builds interpreter functions in this process (TRITON_INTERPRET=1 was set
    when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from ddfast.kernels import param_match

    return isinstance(param_match._param_match_partials_kernel, InterpretedFunction)


def triton_report(jobs: Optional[int] = None, level: str = "full", timeout: float = 1800) -> dict:
    """Record (in this process when it interprets, else in an interpreter subprocess), then compile
    (a subprocess without TRITON_INTERPRET): compile_launches's dict."""
    with tempfile.TemporaryDirectory() as tmp:
        launches = os.path.join(tmp, "launches.json")
        out = os.path.join(tmp, "report.json")
        if _interpreting():
            with open(launches, "w") as f:
                json.dump(record_launches(), f)
        else:
            _run_self(["record", launches], {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout)
        env = {"TRITON_INTERPRET": None}
        if "TRITON_DEFAULT_FP_FUSION" not in os.environ:
            env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
        _run_self(["compile", launches, out, f"--level={level}"] + ([f"--jobs={jobs}"] if jobs else []), env,
                  timeout)
        with open(out) as f:
            return json.load(f)


def kernel_report(triton: bool = True, cuda: bool = True, jobs: Optional[int] = None, level: str = "full") -> List[dict]:
    """One dict per compiled (kernel, specialisation) for sm_90: source ("triton"/"cuda"), module,
    kernel, spec, regs, spills (bytes, stores + loads), stack, smem (bytes), tensor_core, ldg128,
    ldg (static instruction counts), hot, known_spill, error. Never raises: a failure is a row with
    "error" set. Cold: tens of seconds of CPU; cached afterwards."""
    rows = []
    if triton:
        try:
            result = triton_report(jobs, level)
            rows.extend(result["rows"])
            rows.extend({"source": "triton", "module": n.split(":")[0], "kernel": n.split(":")[1], "spec": "",
                         "hot": True, "known_spill": False, "error": "never launched by the recorded op calls"}
                        for n in result["never_launched"])
            rows.extend({"source": "triton", "module": "(recording)", "kernel": "", "spec": "", "hot": True,
                         "known_spill": False, "error": e} for e in result["errors"])
        except Exception as exc:  # noqa: BLE001
            rows.append({"source": "triton", "module": "", "kernel": "", "spec": "", "hot": True,
                         "known_spill": False, "error": f"{type(exc).__name__}: {exc}"})
    if cuda:
        try:
            rows.extend(cuda_rows())
        except Exception as exc:  # noqa: BLE001
            rows.append({"source": "cuda", "module": "", "kernel": "", "spec": "", "hot": True,
                         "known_spill": False, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def gate_failures(rows: List[dict]) -> List[str]:
    """What fails the compile gate: errors, spills in hot kernels (unless known), and known
    spillers that no longer spill (remove them from KNOWN_SPILLS)."""
    failures = [f"{r['module']}:{r['kernel']} [{r.get('spec', '')}]: {r['error']}" for r in rows if r.get("error")]
    known_spilling = {}
    for r in rows:
        if r.get("error") or r.get("spills") is None:
            continue
        if r["known_spill"]:
            known_spilling[(r["module"], r["kernel"])] = known_spilling.get((r["module"], r["kernel"]), 0) + r["spills"]
        elif r["hot"] and r["spills"] > 0 and not _in_set(MAY_SPILL, (r.get("source", "triton"), _module_key(r)), r["kernel"]):
            failures.append(f"{r['module']}:{r['kernel']} [{r['spec']}]: {r['spills']} bytes of register spills "
                            f"in a hot kernel ({r['regs']} registers)")
    failures += [f"{m}:{k}: listed in KNOWN_SPILLS but no longer spills: remove it" for (m, k), total
                 in known_spilling.items() if total == 0]
    return failures


def format_table(rows: List[dict]) -> str:
    head = f"{'kernel':44s} {'spec':58s} {'regs':>4s} {'spill':>6s} {'smem':>6s} {'tc':>4s} {'ld128':>5s} {'ld':>4s}  note"
    lines = [head, "-" * len(head)]

    def fmt(v):
        return "-" if v is None else str(v)

    for r in rows:
        note = "ERROR " + r["error"].splitlines()[0][:80] if r.get("error") else ""
        if not note:
            note = ("hot" if r.get("hot") else "") + (" known-spill" if r.get("known_spill") else "")
            note += f" {r['variant'].split()[0]}" if r.get("variant") else ""
            if r.get("hot") and r.get("spills") and not r.get("known_spill"):
                note += " SPILLS"
        name = f"{os.path.basename(r['module'])}:{r['kernel']}"
        lines.append(f"{name[:44]:44s} {r.get('spec', '')[:58]:58s} {fmt(r.get('regs')):>4s} {fmt(r.get('spills')):>6s} "
                     f"{fmt(r.get('smem')):>6s} {fmt(r.get('tensor_core')):>4s} {fmt(r.get('ldg128')):>5s} "
                     f"{fmt(r.get('ldg')):>4s}  {note.strip()}")
    return "\n".join(lines)


def print_report(file=None, triton: bool = True, cuda: bool = True) -> List[dict]:
    rows = kernel_report(triton=triton, cuda=cuda)
    print(f"sm_{ARCH} compile report (no GPU needed; static counts: tc = tensor-core instructions, "
          "ld128 = 128-bit global loads, ld = global loads; Triton from PTX, CUDA from SASS)", file=file)
    print(format_table(rows), file=file)
    failures = gate_failures(rows)
    print(f"\n{len(rows)} kernel specialisations; gate: " + ("pass" if not failures else f"{len(failures)} failures"),
          file=file)
    for f in failures:
        print(f"  {f}", file=file)
    return rows


def _main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ddfast.kernel_report")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_rec = sub.add_parser("record", help="record the op launches (needs TRITON_INTERPRET=1)")
    p_rec.add_argument("out")
    p_comp = sub.add_parser("compile", help="compile recorded launches for sm_90 (TRITON_INTERPRET unset)")
    p_comp.add_argument("launches")
    p_comp.add_argument("out")
    p_comp.add_argument("--jobs", type=int, default=None)
    p_comp.add_argument("--level", choices=("gate", "full"), default="full")
    p_given = sub.add_parser("compile-given", help="compile a JSON list of launches as given; rows as JSON on stdout")
    p_given.add_argument("launches")
    sub.add_parser("print", help="the whole report as a table")
    args = parser.parse_args(argv)
    if args.cmd == "record":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("record needs TRITON_INTERPRET=1")
        with open(args.out, "w") as f:
            json.dump(record_launches(), f)
    elif args.cmd == "compile":
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("compile needs TRITON_INTERPRET unset")
        with open(args.launches) as f:
            recorded = json.load(f)
        with open(args.out, "w") as f:
            json.dump(compile_launches(recorded, args.jobs, args.level), f)
    elif args.cmd == "compile-given":
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("compile-given needs TRITON_INTERPRET unset")
        with open(args.launches) as f:
            print(json.dumps(compile_as_given(json.load(f))))
    else:
        rows = print_report()
        return 1 if gate_failures(rows) else 0
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
