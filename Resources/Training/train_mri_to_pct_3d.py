"""Train a small 3D patch-based U-Net: Dixon MRI (water, fat, in-phase) -> pseudo-CT (HU) on pelvis phantoms.

The model is trained on random 3D crops and deployed with sliding-window (patch) inference, as most 3D MRI->CT
generators are: its card gives ``input.patch`` (window size, overlap, Gaussian blending) and IBIX runs it that way.

Usage:
    python train_mri_to_pct_3d.py [--train-phantoms N] [--max-minutes M] [--seed S] [--from-cache]
Writes Resources/Models/mri_to_pct_unet3d.onnx and .json. ``--from-cache`` skips training and exports the weights
the last run kept in $IBIX_TRAIN_CACHE. The held-out errors are measured with IBIX's own sliding-window
evaluation (IBIXLogic.windows, imported from this repository), i.e. exactly as the model is deployed.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import make_pelvis_phantom as ph
from ibix_train_common import CACHE, MODELS, export_and_verify, seed_everything, write_card
from train_mri_to_pct import CHANNELS, HU_HI, HU_LO, P_HI, P_LO, UNet, model_to_hu, phantom_arrays

PATCH = (16, 64, 64)  # slices, rows, cols: the deployed window
OVERLAP, BLEND, SIGMA_SCALE = 0.25, "gaussian", 0.125
CROP = (16, 48, 48)  # training crops (the model is fully convolutional)
WEIGHTS = os.path.join(CACHE, "mri_to_pct_unet3d.pt")


def UNet3D():
    """The 2D script's U-Net in 3D: 8/16/32 channels, 1x1x1 head (88,945 parameters)."""
    return UNet(cin=3, c=(8, 16, 32), dims=3)


def volume_arrays(seed):
    """(channels, slices, rows, cols) input in model units, (1, slices, rows, cols) target, labels."""
    x, y, labels = phantom_arrays(seed)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)), np.ascontiguousarray(y.transpose(1, 0, 2, 3)), labels


def windowed_predict(sess, x):
    """The model on one volume (channels, *shape) as the card deploys it: IBIX's sliding-window evaluation."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from IBIXLogic import windows

    plan = windows.plan_windows(x.shape[1:], PATCH, OVERLAP)
    patches = np.stack([x[(slice(None),) + w] for w in plan])
    out = np.concatenate([sess.run(["pct"], {"mri": patches[i:i + 4]})[0] for i in range(0, len(patches), 4)])
    return windows.blend(out[:, 0], plan, x.shape[1:], windows.importance_map(PATCH, BLEND, SIGMA_SCALE))


def errors(pred, target, labels):
    err = np.abs(model_to_hu(pred) - model_to_hu(target))
    per = {c: round(float(err[labels == k].mean()), 1) for k, c in enumerate(ph.CLASSES) if (labels == k).any()}
    return float(err[labels > 0].mean()), float(err.mean()), per


def train(args):
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    tr = [volume_arrays(1000 + i) for i in range(args.train_phantoms)]
    ev = [volume_arrays(20000 + i) for i in range(args.eval_phantoms)]
    print("data: %d training phantoms, %d held-out, %.0fs" % (len(tr), len(ev), time.time() - t0), flush=True)
    model = UNet3D()
    print("parameters:", sum(p.numel() for p in model.parameters()), flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def evaluate():  # whole volumes (a fully convolutional model; the windowed errors are measured at the end)
        model.eval()
        with torch.no_grad():
            preds = [model(torch.from_numpy(x[None]))[0, 0].numpy() for x, _, _ in ev]
        return errors(np.stack(preds), np.stack([y[0] for _, y, _ in ev]), np.stack([lab for _, _, lab in ev]))

    t0 = time.time()
    ep, last, best = 0, 0.0, (1e9, None, 0)
    limit = args.max_minutes * 60
    while True:
        ep += 1
        model.train()
        tot = 0.0
        for _ in range(args.steps):
            xb, yb = [], []
            for _ in range(args.batch):
                x, y, _ = tr[rng.integers(len(tr))]
                o = [rng.integers(0, n - c + 1) for n, c in zip(x.shape[1:], CROP)]
                window = tuple(slice(a, a + c) for a, c in zip(o, CROP))
                xc, yc = x[(slice(None),) + window], y[(slice(None),) + window]
                if rng.random() < 0.5:  # left-right flip
                    xc, yc = xc[..., ::-1], yc[..., ::-1]
                xb.append(np.ascontiguousarray(xc))
                yb.append(np.ascontiguousarray(yc))
            loss = F.l1_loss(model(torch.from_numpy(np.stack(xb))), torch.from_numpy(np.stack(yb)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        last = tot / args.steps
        mae_body, mae_all, per = evaluate()
        if mae_body < best[0]:
            best = (mae_body, {k: v.clone() for k, v in model.state_dict().items()}, ep)
        el = time.time() - t0
        print("epoch %3d  train L1 %.4f (%.0f HU)  held-out MAE body %.1f HU, all %.1f HU  %s  %.0fs"
              % (ep, last, last * (HU_HI - HU_LO) / 2, mae_body, mae_all, per, el), flush=True)
        if el > 0.75 * limit and opt.param_groups[0]["lr"] == args.lr:
            for g in opt.param_groups:  # final quarter of the time budget at a lower learning rate
                g["lr"] = args.lr / 5
        if el > limit:
            break
    os.makedirs(CACHE, exist_ok=True)
    info = {"epochs": ep, "best_epoch": best[2], "final_train_l1_hu": round(last * (HU_HI - HU_LO) / 2, 1),
            "train_time_s": round(time.time() - t0, 1), "steps": ep * args.steps}
    torch.save({"state": best[1], "info": info}, WEIGHTS)
    return best[1], info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-phantoms", type=int, default=40)
    ap.add_argument("--eval-phantoms", type=int, default=3)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=100, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--from-cache", action="store_true")
    args = ap.parse_args()
    seed_everything(args.seed)
    if args.from_cache:
        saved = torch.load(WEIGHTS)
        state, info = saved["state"], saved["info"]
    else:
        state, info = train(args)
    model = UNet3D()
    model.load_state_dict(state)
    model.eval()

    os.makedirs(MODELS, exist_ok=True)
    onnx_path = os.path.join(MODELS, "mri_to_pct_unet3d.onnx")
    xe = [volume_arrays(20000 + i) for i in range(args.eval_phantoms)]
    x1 = np.ascontiguousarray(xe[0][0][None, :, :PATCH[0], :PATCH[1], :PATCH[2]])
    x4 = np.ascontiguousarray(np.stack([xe[0][0][:, :PATCH[0], r:r + PATCH[1], 32:32 + PATCH[2]]
                                        for r in (0, 16, 32, 64)]))
    res, sess = export_and_verify(model, x1, onnx_path, "mri", "pct", [("batch1_held_out", x1),
                                                                        ("batch4_held_out", x4)])
    preds = [windowed_predict(sess, x) for x, _, _ in xe]
    mae_body, mae_all, per = errors(np.stack(preds), np.stack([y[0] for _, y, _ in xe]),
                                    np.stack([lab for _, _, lab in xe]))
    xs, ys, ls = volume_arrays(ph.SAMPLE_SEED)  # the shipped sample case (held-out seed)
    sample_mae = errors(windowed_predict(sess, xs)[None], ys, ls[None])[0]
    print("held-out MAE (windowed) body %.1f HU, all %.1f HU, %s; sample case %.1f HU" % (mae_body, mae_all, per,
                                                                                         sample_mae))
    card = {
        "ibix_card": 1,
        "name": "Dixon MRI to pseudo-CT 3D patch U-Net (demo)",
        "description": ("Demo model trained on synthetic procedural pelvis phantoms (Dixon-style water/fat/in-phase "
                        "MRI to CT in HU); not for clinical use. Small 3D U-Net (8/16/32 channels) trained on "
                        "random crops and applied with sliding-window inference (16x64x64 windows, 25 % overlap, "
                        "Gaussian blending), as MONAI's sliding_window_inference does."),
        "spatial_dims": 3,
        "input": {
            "name": "mri", "layout": "NCDHW", "channels": CHANNELS, "multiple_of": 4,
            "intensity": {"percentiles": [P_LO, P_HI], "to": [-1.0, 1.0], "clip": True},
            "patch": {"size": list(PATCH), "overlap": OVERLAP, "blend": BLEND, "sigma_scale": SIGMA_SCALE},
        },
        "output": {
            "name": "pct", "layout": "NCDHW", "channels": ["CT"],
            "intensity": {"from": [-1.0, 1.0], "to": [HU_LO, HU_HI]}, "units": "HU",
        },
        "training": {
            "data": ("procedural pelvis phantoms (Resources/Training/make_pelvis_phantom.py), %d training phantoms "
                     "(seeds 1000..%d) of 28x128x128 voxels (4 mm slices, 3 mm in-plane); target CT in HU per "
                     "tissue clipped to [-1024, 1250]" % (args.train_phantoms, 999 + args.train_phantoms)),
            "recipe": ("Adam lr %g (lr/5 for the last quarter), batch %d random %dx%dx%d crops, left-right flips, "
                       "L1 loss on [-1,1]-scaled HU; seed %d; torch %s, 1 CPU thread"
                       % ((args.lr, args.batch) + CROP + (args.seed, torch.__version__))),
            **info,
            "script": "Resources/Training/train_mri_to_pct_3d.py",
        },
        "metrics": {
            "held_out_mae": round(mae_body, 1),
            "held_out_mae_units": ("HU, inside the body, %d held-out phantoms (seeds 20000..), sliding-window "
                                   "inference as in the card" % args.eval_phantoms),
            "held_out_mae_all_voxels": round(mae_all, 1),
            "held_out_mae_per_tissue": per,
            "sample_case_mae": round(sample_mae, 1),
            "onnx_max_abs_diff_vs_torch": max(c["max_abs_diff"] for c in res["checks"].values()),
        },
    }
    write_card(os.path.join(MODELS, "mri_to_pct_unet3d.json"), card)
    print("wrote", onnx_path, os.path.getsize(onnx_path), "bytes")


if __name__ == "__main__":
    main()
