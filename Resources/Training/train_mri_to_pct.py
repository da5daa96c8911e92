"""Train a small 2D U-Net: Dixon MRI (water, fat, in-phase) -> pseudo-CT (HU) on procedural pelvis phantoms.

Usage:
    python train_mri_to_pct.py [--train-phantoms N] [--max-minutes M] [--seed S]
Writes Resources/Models/mri_to_pct_unet.onnx and .json, and the held-out sample case in Resources/SampleData.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import make_pelvis_phantom as ph
from ibix_train_common import (MODELS, SAMPLES, export_and_verify, percentile_normalise, seed_everything, time_ort,
                               write_card)

P_LO, P_HI = 0.0, 95.0
CHANNELS = ["water", "fat", "in_phase"]
HU_LO, HU_HI = ph.HU_RANGE


def block(i, o, dims=2):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(i, o, 3, padding=1), nn.ReLU(), conv(o, o, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    """3-level U-Net (2D, or 3D with ``dims=3``), max-pool down, nearest upsample + concatenation skips, 1x1 linear
    head; 16/32/64 channels by default."""

    def __init__(self, cin=3, c=(16, 32, 64), dims=2):
        super().__init__()
        self.e1, self.e2, self.b = block(cin, c[0], dims), block(c[0], c[1], dims), block(c[1], c[2], dims)
        self.d2, self.d1 = block(c[2] + c[1], c[1], dims), block(c[1] + c[0], c[0], dims)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(c[0], 1, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(self.pool(e1))
        b = self.b(self.pool(e2))
        d2 = self.d2(torch.cat([self.up(b), e2], 1))
        d1 = self.d1(torch.cat([self.up(d2), e1], 1))
        return self.head(d1)


def hu_to_model(hu):
    return ((hu - HU_LO) / (HU_HI - HU_LO) * 2 - 1).astype(np.float32)


def model_to_hu(y):
    return (y + 1) / 2 * (HU_HI - HU_LO) + HU_LO


def phantom_arrays(seed):
    d = ph.make_phantom(seed)
    # exactly the card's input normalisation: per channel, per volume, percentiles 0/95 -> -1/1, clipped.
    # The shipped sample case stores the channels rounded to int16, so round here too.
    x = np.stack([percentile_normalise(np.round(d[c]), P_LO, P_HI, -1.0, 1.0, clip=True)[0] for c in CHANNELS], 1)
    y = hu_to_model(d["ct"].astype(np.float32))[:, None]
    return x, y, d["labels"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-phantoms", type=int, default=60)
    ap.add_argument("--eval-phantoms", type=int, default=6)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.time()
    tr = [phantom_arrays(1000 + i) for i in range(args.train_phantoms)]  # training seeds 1000..
    ev = [phantom_arrays(20000 + i) for i in range(args.eval_phantoms)]  # held-out seeds 20000..
    xt = torch.from_numpy(np.concatenate([a[0] for a in tr]))
    yt = torch.from_numpy(np.concatenate([a[1] for a in tr]))
    keep = (np.concatenate([a[2] for a in tr]) > 0).reshape(len(xt), -1).sum(1) > 200  # slices with body
    xt, yt = xt[torch.from_numpy(keep)], yt[torch.from_numpy(keep)]
    xe = torch.from_numpy(np.concatenate([a[0] for a in ev]))
    ye = np.concatenate([a[1] for a in ev])[:, 0]
    le = np.concatenate([a[2] for a in ev])
    print("data: %d training slices (%d phantoms), %d held-out slices (%d phantoms), %.0fs"
          % (len(xt), args.train_phantoms, len(xe), args.eval_phantoms, time.time() - t0), flush=True)

    model = UNet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = len(xt) // args.batch

    def evaluate():
        model.eval()
        with torch.no_grad():
            p = torch.cat([model(xe[i : i + 32]) for i in range(0, len(xe), 32)]).numpy()[:, 0]
        err = np.abs(model_to_hu(p) - model_to_hu(ye))
        per = {c: round(float(err[le == k].mean()), 1) for k, c in enumerate(ph.CLASSES) if (le == k).any()}
        return float(err[le > 0].mean()), float(err.mean()), per

    t0 = time.time()
    ep, last = 0, 0.0
    best = (1e9, None, 0)
    limit = args.max_minutes * 60
    while ep < args.epochs:
        ep += 1
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xt)))
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            c = args.crop
            r0, c0 = rng.integers(0, ph.NY - c + 1), rng.integers(0, ph.NX - c + 1)
            xb, yb = xt[idx, :, r0 : r0 + c, c0 : c0 + c], yt[idx, :, r0 : r0 + c, c0 : c0 + c]
            if rng.random() < 0.5:  # left-right flip
                xb, yb = xb.flip(-1), yb.flip(-1)
            loss = F.l1_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        last = tot / steps_per_epoch
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
    train_s = time.time() - t0
    model.load_state_dict(best[1])
    mae_body, mae_all, per = evaluate()
    print("best epoch %d: held-out MAE body %.1f HU, all voxels %.1f HU, per class %s" % (best[2], mae_body, mae_all, per))

    os.makedirs(MODELS, exist_ok=True)
    onnx_path = os.path.join(MODELS, "mri_to_pct_unet.onnx")
    x1 = xe[len(xe) // 2 : len(xe) // 2 + 1].numpy().copy()
    x4 = xe[10:14].numpy().copy()
    res, sess = export_and_verify(model, x1, onnx_path, "mri", "pct", [("batch1_held_out", x1), ("batch4_held_out", x4)])
    t_fwd = time_ort(sess, "mri", x1)
    print("export:", res, "ORT 1x3x128x128 forward %.1f ms" % (t_fwd * 1000))

    # Sample case (held-out seed) + its error
    sizes = ph.write_sample_case(SAMPLES)
    xs, ys, ls = phantom_arrays(ph.SAMPLE_SEED)
    p = sess.run(["pct"], {"mri": xs})[0][:, 0]
    es = np.abs(model_to_hu(p) - model_to_hu(ys[:, 0]))
    sample_mae = round(float(es[ls > 0].mean()), 1)
    print("sample case MAE (body) %.1f HU" % sample_mae, sizes)

    card = {
        "ibix_card": 1,
        "name": "Dixon MRI to pseudo-CT U-Net (demo)",
        "description": ("Demo model trained on synthetic procedural pelvis phantoms (Dixon-style water/fat/in-phase "
                        "MRI to CT in HU); not for clinical use. Small 2D U-Net (16/32/64 channels), fully "
                        "convolutional, no normalisation layers."),
        "spatial_dims": 2,
        "slice_axis": "axial",
        "in_plane": {"transpose": False, "flip_rows": False, "flip_cols": False},
        "input": {
            "name": "mri", "layout": "NCHW", "channels": CHANNELS, "multiple_of": 8,
            "intensity": {"percentiles": [P_LO, P_HI], "to": [-1.0, 1.0], "clip": True},
        },
        "output": {
            "name": "pct", "layout": "NCHW", "channels": ["CT"],
            "intensity": {"from": [-1.0, 1.0], "to": [HU_LO, HU_HI]}, "units": "HU",
        },
        "training": {
            "data": ("procedural pelvis phantoms (Resources/Training/make_pelvis_phantom.py), %d training phantoms "
                     "(seeds 1000..%d), %d slices of 128x128 at 3 mm, slice spacing 4 mm; Rician noise, smooth "
                     "bias field; target CT in HU per tissue clipped to [-1024, 1250]"
                     % (args.train_phantoms, 999 + args.train_phantoms, len(xt))),
            "tissue_hu": dict(zip(ph.CLASSES, [int(v) for v in ph.HU])),
            "recipe": ("Adam lr %g (lr/5 for the last quarter), batch %d random %dx%d crops, left-right flips, L1 loss "
                       "on [-1,1]-scaled HU; seed %d; torch %s, 1 CPU thread"
                       % (args.lr, args.batch, args.crop, args.crop, args.seed, torch.__version__)),
            "epochs": ep, "best_epoch": best[2],
            "final_train_l1_hu": round(last * (HU_HI - HU_LO) / 2, 1),
            "train_time_s": round(train_s, 1),
            "script": "Resources/Training/train_mri_to_pct.py",
        },
        "metrics": {
            "held_out_mae": round(mae_body, 1),
            "held_out_mae_units": "HU, inside the body, %d held-out phantoms (seeds 20000..)" % args.eval_phantoms,
            "held_out_mae_all_voxels": round(mae_all, 1),
            "held_out_mae_per_tissue": per,
            "sample_case_mae": sample_mae,
            "onnx_max_abs_diff_vs_torch": max(c["max_abs_diff"] for c in res["checks"].values()),
        },
    }
    write_card(os.path.join(MODELS, "mri_to_pct_unet.json"), card)
    print("wrote", onnx_path, os.path.getsize(onnx_path), "bytes")


if __name__ == "__main__":
    main()
