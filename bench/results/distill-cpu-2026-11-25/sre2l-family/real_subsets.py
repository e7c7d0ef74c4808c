"""How real-subsets-ipc1-online-teacher.json / herding-ipc10-online-teacher.json were made: real subsets
(random seeds 0-2, the most teacher-confident image per class, herding picks in the teacher embedding)
evaluated with the SRe2L teacher relabelling every augmented minibatch, 3 ConvNets x 300 epochs, DSA.
Run: OMP_NUM_THREADS=1 python real_subsets.py IPC"""
import sys, time, torch, json
import ddfast
from ddfast.data import load_dataset
from ddfast.evaluate import evaluate, random_subset
from ddfast.methods.sre2l import SRe2L, squeeze_for, relabel_outputs
from ddfast.models import embed
torch.set_num_threads(1)
ipc = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ds = load_dataset("digits")
hp = SRe2L.default_hparams(ds, ipc)
teacher = squeeze_for(ds, hp, 0).eval()
fn, _, _ = relabel_outputs(teacher, None, hp, 0)
x, y = ds.x_train, ds.y_train
with torch.no_grad():
    logits = teacher(x)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    feats = embed(teacher, x) if hasattr(teacher, "embed") else None
def pick_conf():
    idx = []
    for c in range(10):
        i = (y == c).nonzero().flatten()
        idx.append(i[ce[i].argsort()[:ipc]])
    idx = torch.cat(idx); return x[idx], y[idx]
def pick_herd():
    f = teacher.features(x).flatten(1) if hasattr(teacher, "features") else None
    idx = []
    for c in range(10):
        i = (y == c).nonzero().flatten(); fc = f[i]; mu = fc.mean(0); chosen = []; s = torch.zeros_like(mu)
        for k in range(ipc):
            d = ((mu - (s + fc) / (k + 1)) ** 2).sum(1)
            if chosen: d[torch.tensor(chosen)] = float("inf")
            j = int(d.argmin()); chosen.append(j); s = s + fc[j]
        idx.append(i[torch.tensor(chosen)])
    idx = torch.cat(idx); return x[idx], y[idx]
res = {}
sets = {"random0": random_subset(x, y, ipc, 0), "random1": random_subset(x, y, ipc, 1), "random2": random_subset(x, y, ipc, 2),
        "confident": pick_conf()}
with torch.no_grad():
    try: sets["herding"] = pick_herd()
    except Exception as e: print("herd failed", e)
for name, (xs, ys) in sets.items():
    t = time.time()
    r = evaluate(xs, ys, ds, num_models=3, epochs=300, dsa=True, soft_label_fn=fn, seed=0)
    res[name] = r.accuracies
    print(name, "%.2f" % r.mean, ["%.1f" % a for a in r.accuracies], "%.0fs" % (time.time() - t), flush=True)
json.dump(res, open(f"select-ipc{ipc}.json", "w"))
