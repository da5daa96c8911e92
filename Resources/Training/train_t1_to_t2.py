"""Train the T1 -> T2 convolutional autoencoder on axial slices of the ICBM152 2009 template, export to ONNX.

Run make_t1_t2_data.py first. Usage:
    python train_t1_to_t2.py [--epochs N] [--max-minutes M] [--seed S]
Writes Resources/Models/t1_to_t2_cae.onnx and .json.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibix_train_common import (CACHE, MODELS, SAMPLES, export_and_verify, pad_to_multiple, percentile_normalise,
                               seed_everything, time_ort, write_card)

P_LO, P_HI = 0.5, 99.5
OUT_SCALE = 1000.0  # model output [0, 1] -> [0, 1000] a.u.


class CAE(nn.Module):
    """Conv autoencoder: 3x (Conv3x3+ReLU+MaxPool2) encoder, 3x (Upsample2+Conv3x3+ReLU) decoder, Conv3x3 linear."""

    def __init__(self):
        super().__init__()
        c = lambda i, o: nn.Conv2d(i, o, 3, padding=1)
        self.enc = nn.Sequential(
            c(1, 16), nn.ReLU(), nn.MaxPool2d(2),
            c(16, 8), nn.ReLU(), nn.MaxPool2d(2),
            c(8, 8), nn.ReLU(), nn.MaxPool2d(2),
        )
        up = lambda: nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(
            up(), c(8, 8), nn.ReLU(),
            up(), c(8, 8), nn.ReLU(),
            up(), c(8, 16), nn.ReLU(),
            c(16, 1),
        )

    def forward(self, x):
        return self.dec(self.enc(x))


def augment(x, y, rng):
    """Random rotation (+-10 deg), left-right flip (p=.5), anterior-posterior flip (p=.25), input scaling x0.8-1.2."""
    n = x.shape[0]
    th = torch.from_numpy(rng.uniform(-10, 10, n) * math.pi / 180).float()
    sx = torch.from_numpy(np.where(rng.random(n) < 0.5, -1.0, 1.0)).float()
    sy = torch.from_numpy(np.where(rng.random(n) < 0.25, -1.0, 1.0)).float()
    a = torch.zeros(n, 2, 3)
    a[:, 0, 0], a[:, 0, 1] = torch.cos(th) * sx, -torch.sin(th) * sy
    a[:, 1, 0], a[:, 1, 1] = torch.sin(th) * sx, torch.cos(th) * sy
    g = F.affine_grid(a, list(x.shape), align_corners=False)
    xy = F.grid_sample(torch.cat([x, y], 1), g, mode="bilinear", padding_mode="zeros", align_corners=False)
    scale = torch.from_numpy(rng.uniform(0.8, 1.2, (n, 1, 1, 1))).float()
    return (xy[:, :1] * scale).clamp(0, 1), xy[:, 1:]


def response_radius(model, shape=(240, 200), positions=((120, 100), (97, 61), (150, 133)), base=None):
    """Perturb one input pixel; return the L-inf radius (pixels) beyond which the output difference is exactly 0."""
    model.eval()
    radii = []
    x0 = torch.zeros(1, 1, *shape) if base is None else base.clone()
    with torch.no_grad():
        y0 = model(x0)
        for r, c in positions:
            for delta in (1.0, -1.0, 0.37):
                x1 = x0.clone()
                x1[0, 0, r, c] += delta
                d = (model(x1) - y0).abs()[0, 0]
                nz = torch.nonzero(d > 0)
                if len(nz):
                    radii.append(int(torch.max(torch.abs(nz - torch.tensor([r, c]))).item()))
    return max(radii) if radii else 0


def structural_radius(shape=(96, 96)):
    """Upper bound of the support: same architecture, all weights positive, avg-pool instead of max-pool."""
    m = CAE()
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.constant_(mod.weight, 0.1)
            nn.init.constant_(mod.bias, 0.0)
    m.enc[2] = nn.AvgPool2d(2)
    m.enc[5] = nn.AvgPool2d(2)
    m.enc[8] = nn.AvgPool2d(2)
    rad = 0
    with torch.no_grad():
        for r in range(40, 48):
            for c in range(40, 48):
                x = torch.zeros(1, 1, *shape)
                x[0, 0, r, c] = 1.0
                nz = torch.nonzero(m(x)[0, 0] > 0)
                rad = max(rad, int(torch.max(torch.abs(nz - torch.tensor([r, c]))).item()))
    return rad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)

    img = sitk.ReadImage(os.path.join(SAMPLES, "IBIX-T1.nrrd"))
    t1 = sitk.GetArrayFromImage(img)
    z = np.load(os.path.join(CACHE, "t1_t2.npz"))
    t2n = z["t2n"]
    assert t1.shape == t2n.shape
    x_all, (v_lo, v_hi) = percentile_normalise(t1, P_LO, P_HI, 0.0, 1.0, clip=True)
    print("input percentiles %.1f/%.1f -> 0/1" % (v_lo, v_hi))
    H, W = t1.shape[1:]
    xs = pad_to_multiple(x_all, 8)[:, None]  # (K, 1, 240, 200), edge padding as IBIX does
    ys = pad_to_multiple(t2n, 8)[:, None]
    brain_slices = [k for k in range(t1.shape[0]) if (t1[k] > 0).sum() > 500]
    held = [k for k in brain_slices if k % 10 == 5]
    train = [k for k in brain_slices if k % 10 != 5]
    print("slices: %d train, %d held-out (k %% 10 == 5)" % (len(train), len(held)))
    xt, yt = torch.from_numpy(xs[train]), torch.from_numpy(ys[train])
    xh, yh = torch.from_numpy(xs[held]), torch.from_numpy(ys[held])
    head_h = torch.from_numpy(pad_to_multiple((t1[held] > 0) | (t2n[held] > 0), 8)[:, None])

    model = CAE()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=8, min_lr=1e-5)

    def held_out():
        model.eval()
        with torch.no_grad():
            p = model(xh)
        err = (p - yh).abs() * OUT_SCALE
        return float(err[head_h].mean()), float(err[..., :H, :W].mean())

    t0 = time.time()
    log = []
    best = (1e9, None, -1)
    for ep in range(args.epochs):
        model.train()
        perm = rng.permutation(len(train))
        tot = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            xb, yb = augment(xt[idx], yt[idx], rng)
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        tot /= len(train)
        mae_head, mae_all = held_out()
        sched.step(tot)
        log.append((ep + 1, tot, mae_head))
        if mae_head < best[0]:
            best = (mae_head, {k: v.clone() for k, v in model.state_dict().items()}, ep + 1)
        el = time.time() - t0
        print("epoch %3d  train MSE %.5f  held-out MAE %.1f a.u. (head) %.1f (all)  lr %.1e  %.0fs"
              % (ep + 1, tot, mae_head, mae_all, opt.param_groups[0]["lr"], el), flush=True)
        if el > 0.8 * args.max_minutes * 60 and opt.param_groups[0]["lr"] > args.lr / 5:
            for g in opt.param_groups:  # last fifth of the time budget at (at most) lr/5
                g["lr"] = args.lr / 5
        if el > args.max_minutes * 60 or opt.param_groups[0]["lr"] <= 1.01e-5:
            break
    train_s = time.time() - t0
    epochs_run = log[-1][0]
    model.load_state_dict(best[1])
    mae_head, mae_all = held_out()
    # Per-tissue held-out MAE (pure tissue voxels, a.u.)
    with torch.no_grad():
        p = model(xh).numpy()[:, 0, :H, :W] * OUT_SCALE
    err = np.abs(p - t2n[held] * OUT_SCALE)
    per_tissue = {name: round(float(err[z[key][held] > 0.9].mean()), 1) for name, key in
                  (("WM", "wm"), ("GM", "gm"), ("CSF", "csf"))}
    print("best epoch %d: held-out MAE %.1f a.u. (head) %.1f (all pixels), per tissue %s"
          % (best[2], mae_head, mae_all, per_tissue))

    # Export + checks
    os.makedirs(MODELS, exist_ok=True)
    onnx_path = os.path.join(MODELS, "t1_to_t2_cae.onnx")
    k_mid = held[len(held) // 2]
    x1 = xs[k_mid : k_mid + 1].copy()
    x4 = xs[held[:4]].copy()
    model.eval()
    res, sess = export_and_verify(model, x1, onnx_path, "t1", "t2", [("batch1_held_out", x1), ("batch4_held_out", x4)])
    t_fwd = time_ort(sess, "t1", x1)
    r_emp = response_radius(model, base=torch.from_numpy(x1))
    r_emp0 = response_radius(model)
    r_struct = structural_radius()
    # Same check on the ONNX model
    xp = x1.copy()
    xp[0, 0, 120, 100] += 1.0
    d = np.abs(sess.run(["t2"], {"t1": xp})[0] - sess.run(["t2"], {"t1": x1})[0])[0, 0]
    nzp = np.argwhere(d > 0)
    r_onnx = int(np.abs(nzp - [120, 100]).max()) if len(nzp) else 0
    print("export:", json.dumps(res))
    print("ORT 1x1x240x200 forward %.1f ms (1 thread); response radius: empirical %d / %d (torch, slice / zeros), "
          "%d (onnx), structural bound %d px" % (t_fwd * 1000, r_emp, r_emp0, r_onnx, r_struct))

    card = {
        "ibix_card": 1,
        "name": "T1 to T2 autoencoder (demo)",
        "description": ("Demo model trained on the ICBM152 2009 template and a synthetic T2 derived from it; "
                        "not for clinical use. 2D convolutional autoencoder (16-8-8 encoder, mirrored decoder), "
                        "fully convolutional with a finite receptive field."),
        "spatial_dims": 2,
        "slice_axis": "axial",
        "in_plane": {"transpose": False, "flip_rows": False, "flip_cols": False},
        "input": {
            "name": "t1", "layout": "NCHW", "channels": ["T1"], "multiple_of": 8,
            "intensity": {"percentiles": [P_LO, P_HI], "to": [0.0, 1.0], "clip": True},
        },
        "output": {
            "name": "t2", "layout": "NCHW", "channels": ["T2"],
            "intensity": {"from": [0.0, 1.0], "to": [0.0, OUT_SCALE]}, "units": "a.u.",
        },
        "training": {
            "data": ("ICBM152 2009a symmetric T1 template (nilearn copy, 1 mm, 197x233x189 z-cropped to 156 slices as "
                     "Resources/SampleData/IBIX-T1.nrrd); target: synthetic spin-echo T2w (TR 4000 ms, TE 100 ms) from "
                     "the GM/WM probability maps and CSF = head - GM - WM, scaled so pure CSF = 1000 a.u."),
            "slices": "axial array slices k (every slice with > 500 head voxels); held out: k % 10 == 5",
            "train_slices": len(train), "held_out_slices": len(held),
            "recipe": ("Adam lr %g, batch %d, MSE on [0,1] targets, ReduceLROnPlateau(0.5, patience 8), lr/5 for the last fifth of %.0f min; augmentation: "
                       "rotation +-10 deg, left-right flip p=.5, anterior-posterior flip p=.25, input x0.8-1.2; "
                       "seed %d; torch %s, 1 CPU thread" % (args.lr, args.batch, args.max_minutes, args.seed, torch.__version__)),
            "epochs": epochs_run, "best_epoch": best[2],
            "final_train_mse": round(log[-1][1], 6),
            "train_time_s": round(train_s, 1),
            "script": "Resources/Training/train_t1_to_t2.py",
        },
        "metrics": {
            "held_out_mae": round(mae_head, 1),
            "held_out_mae_units": "a.u., over head voxels of the held-out slices",
            "held_out_mae_all_pixels": round(mae_all, 1),
            "held_out_mae_per_tissue": per_tissue,
            "response_radius_px": r_emp,
            "receptive_field_bound_px": r_struct,
            "onnx_max_abs_diff_vs_torch": max(c["max_abs_diff"] for c in res["checks"].values()),
        },
    }
    write_card(os.path.join(MODELS, "t1_to_t2_cae.json"), card)
    print("wrote", onnx_path, os.path.getsize(onnx_path), "bytes")


if __name__ == "__main__":
    main()
