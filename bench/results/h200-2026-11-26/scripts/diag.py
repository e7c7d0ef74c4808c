"""Is the GPU MISMATCH of dc_step/dm_step TF32 (cudnn default) or a bug? errors vs the same-precision
reference and vs the fp64 reference, for cudnn.allow_tf32 on/off."""
import os, sys, torch
DEV = torch.device(os.environ.get("DIAG_DEVICE", "cuda"))
from ddfast.bench.runner import _run_step, _rel_err
from ddfast.bench.cases import dc_step, dm_step

def to64(inp):
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.nn.Module): out[k] = v.double()
        elif torch.is_tensor(v) and v.is_floating_point():
            out[k] = v.detach().double().requires_grad_(v.requires_grad)
        else: out[k] = v
    return out

def run(case, providers):
    print(f"== {case.name}", flush=True)
    res = {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        inp = case.make_inputs(DEV)
        res[("ref", tf32)] = _run_step(lambda: case.reference(**inp), inp, case.grad_inputs)
        for p in providers:
            res[(p, tf32)] = _run_step(lambda: case.fused(p, **inp), inp, case.grad_inputs)
    torch.backends.cudnn.allow_tf32 = False
    inp = to64(case.make_inputs(DEV))
    r64 = _run_step(lambda: case.reference(**inp), inp, case.grad_inputs)
    for p in providers[:1]:
        f64 = _run_step(lambda: case.fused(p, **inp), inp, case.grad_inputs)
        print(f"fp64 {p} vs fp64 ref: loss {_rel_err(f64[0], r64[0]):.3e} grad {_rel_err(f64[1]['x_syn'], r64[1]['x_syn']):.3e}", flush=True)
    for (p, tf32), (loss, g) in res.items():
        print(f"tf32={tf32!s:5} {p:10s} vs ref same precision: loss {_rel_err(loss, res[('ref', tf32)][0]):.3e} "
              f"grad {_rel_err(g['x_syn'], res[('ref', tf32)][1]['x_syn']):.3e} | vs fp64 ref: loss "
              f"{_rel_err(loss, r64[0]):.3e} grad {_rel_err(g['x_syn'], r64[1]['x_syn']):.3e}", flush=True)

small = os.environ.get("DIAG_SMALL") == "1"
dc = [c for c in dc_step.cases() if c.name.endswith("16px" if small else "cifar10-ipc10")][0]
dm = [c for c in dm_step.cases() if c.name.endswith("tiny-c3-ipc2" if small else "cifar10-ipc50")][0]
run(dc, ["segmented", "loop"])
run(dm, ["auto"])
