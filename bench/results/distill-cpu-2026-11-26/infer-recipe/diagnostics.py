import sys, json, time, torch
from ddfast.data import load_dataset
from ddfast.methods import infer, sre2l
from ddfast.evaluate import evaluate, random_subset
kv = dict(a.split("=") for a in sys.argv[1:])
seed = int(kv.get("seed", 0)); T = kv.get("T"); T = None if T in (None, "none") else float(T)
nets = int(kv.get("nets", 3)); which = kv.get("which", "infer,random").split(",")
opt = kv.get("opt", "sgd"); lr = float(kv.get("lr", 0.01)); wd = float(kv.get("wd", 5e-4)); mix = float(kv.get("mixup", 0.8))
epochs = int(kv.get("epochs", 300)); dsa = kv.get("dsa", "1") == "1"
torch.set_num_threads(1)
ds = load_dataset("digits")
hp = infer.INFER.default_hparams(ds, 10)
if "num_archs" in kv: hp["num_archs"] = int(kv["num_archs"])
if "ufc_lr" in kv: hp["lr"] = float(kv["ufc_lr"])
if "init" in kv: hp["init"] = kv["init"]
if "iters" in kv: hp["iterations"] = int(kv["iters"])
teachers = [sre2l.squeeze_for(ds, hp, seed, arch=a, width=w, depth=d) for a, w, d in infer.teacher_specs(ds, hp["num_archs"])]
out = {}
for w in which:
    if w in ("infer", "bases"):
        budget = infer.infer_budget(10, ds.num_classes, hp["num_archs"], hp["base"])
        base = sre2l.initial_images(hp["init"], teachers[0], ds.x_train, ds.y_train, range(ds.num_classes), budget["base_per_class"], seed)
        if w == "bases":
            x = base.transpose(0, 1).reshape(-1, *base.shape[2:]); y = torch.arange(10).repeat_interleave(base.shape[0])
        else:
            cset, _ = infer.build_compensated_set(teachers, base, seed=seed, iterations=hp["iterations"], lr=hp["lr"], r_bn=hp["r_bn"],
                                                  first_bn_multiplier=hp["first_bn_multiplier"], jitter=hp["jitter"])
            x, y = cset.instances()
    else:
        x, y = random_subset(ds.x_train, ds.y_train, 10, seed)
    with torch.no_grad():
        logits = infer.static_soft_labels(teachers, x)
    labels = logits if T is not None else torch.softmax(logits / 4, 1)
    t0 = time.time()
    r = evaluate(x, labels, ds, num_models=nets, epochs=epochs, seed=seed, dsa=dsa, mixup=mix, label_temperature=T,
                 optimizer=opt, lr=lr, weight_decay=wd)
    out[w] = [r.mean, r.std, r.accuracies, time.time() - t0]
    print(kv, w, r, flush=True)
tag = "_".join(f"{k}{v}" for k, v in sorted(kv.items()))
print(json.dumps(out))
