"""Build the T1 sample volume, a synthetic T2 target and the ventricle masks from the ICBM152 2009 template.

Offline: reads the NIfTI files that nilearn ships inside its wheel (nilearn/datasets/data/), nothing is downloaded.

Writes
  Resources/SampleData/IBIX-T1.nrrd              uint8, the template (real geometry, 1 mm, z-cropped to the head)
  Resources/SampleData/IBIX-T1-input-mask.nrrd   uint8, 1 = left lateral ventricle on 5 axial slices
  Resources/SampleData/IBIX-T1-output-mask.nrrd  uint8, 1 = ~1000 voxels on/around the left lateral ventricle, 1 slice
  $IBIX_TRAIN_CACHE/IBIX-T2-target.nrrd          int16, synthetic T2 in a.u. (0..1000), same geometry (not shipped:
                                                 2.6 MB compressed)
  $IBIX_TRAIN_CACHE/t1_t2.npz                     float arrays for training (not shipped)
"""
import json
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ibix_train_common import CACHE, SAMPLES, write_like

import nilearn

NL_DATA = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")
T1_FILE = os.path.join(NL_DATA, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
GM_FILE = os.path.join(NL_DATA, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
WM_FILE = os.path.join(NL_DATA, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")

# Spin-echo T2-weighted acquisition, 3 T literature values (ms); see README.md for references.
TR, TE = 4000.0, 100.0
TISSUES = {  # name: (PD, T1 ms, T2 ms)
    "WM": (0.70, 830.0, 80.0),
    "GM": (0.80, 1330.0, 110.0),
    "CSF": (1.00, 4000.0, 2000.0),
}


def spin_echo(pd, t1, t2):
    return pd * (1.0 - np.exp(-TR / t1)) * np.exp(-TE / t2)


def main():
    os.makedirs(CACHE, exist_ok=True)
    t1_img = sitk.ReadImage(T1_FILE)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(GM_FILE)).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(WM_FILE)).astype(np.float32) / 255.0
    t1 = sitk.GetArrayFromImage(t1_img)
    assert t1.dtype == np.uint8 and t1.shape == (189, 233, 197), t1.shape

    # Array axis 0 must be S (IBIX's "axial" slice axis for this volume).
    d = np.array(t1_img.GetDirection()).reshape(3, 3)  # columns = physical direction of index axes i, j, k
    assert np.argmax(np.abs(d[2, :])) == 2 and d[2, 2] > 0, d  # index k (array axis 0) runs inferior -> superior
    # Patient left = +x in LPS. Which column (index i, array axis 2) side is left?
    x0 = t1_img.TransformIndexToPhysicalPoint((0, 0, 0))[0]
    x1 = t1_img.TransformIndexToPhysicalPoint((196, 0, 0))[0]
    left_is_low_cols = x0 > x1
    print("LPS x at col 0:", x0, "col 196:", x1, "-> patient left is", "low" if left_is_low_cols else "high", "cols")

    # Crop empty slices above the head (keeps geometry right: the origin moves with the crop; here k starts at 0).
    nz = np.argwhere(t1 > 0)
    k_hi = int(nz[:, 0].max()) + 2
    k_lo = max(0, int(nz[:, 0].min()) - 1)
    crop = t1_img[:, :, k_lo:k_hi]
    t1, gm, wm = t1[k_lo:k_hi], gm[k_lo:k_hi], wm[k_lo:k_hi]
    print("z-crop", k_lo, k_hi, "origin", crop.GetOrigin(), "size", crop.GetSize())

    # CSF estimate: inside the (hole-filled) skull-stripped head, what is neither GM nor WM.
    brain = ndi.binary_fill_holes(t1 > 0)
    s = gm + wm
    scale = np.where(s > 1.0, 1.0 / np.maximum(s, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain

    sig = {k: spin_echo(*v) for k, v in TISSUES.items()}
    print("pure-tissue T2w signal:", {k: round(float(v), 4) for k, v in sig.items()})
    assert sig["CSF"] > sig["GM"] > sig["WM"]
    t2 = wm * sig["WM"] + gm * sig["GM"] + csf * sig["CSF"]
    t2n = (t2 / sig["CSF"]).astype(np.float32)  # CSF -> 1.0 -> 1000 a.u.
    # Check on the volume: CSF brightest, WM darkest.
    m_wm, m_gm, m_csf = (float(t2n[p > 0.9].mean()) for p in (wm, gm, csf))
    print("mean T2 (a.u.) pure WM %.0f GM %.0f CSF %.0f" % (1000 * m_wm, 1000 * m_gm, 1000 * m_csf))
    assert m_csf > m_gm > m_wm

    # Left lateral ventricle: deep CSF, left hemisphere, largest 3D component.
    cols = np.arange(t1.shape[2])
    mid = 98  # col whose LPS x is 0 (x = 98 - i)
    assert abs(crop.TransformIndexToPhysicalPoint((mid, 0, 0))[0]) < 1e-6
    left = (cols < mid - 1) if left_is_low_cols else (cols > mid + 1)
    deep = ndi.binary_erosion(brain, iterations=12)
    cand = (csf > 0.8) & deep & left[None, None, :]
    lab, n = ndi.label(cand)
    sizes = ndi.sum(cand, lab, index=np.arange(1, n + 1))
    vent = lab == (1 + int(np.argmax(sizes)))
    print("left lateral ventricle component: %d voxels (of %d components)" % (vent.sum(), n))
    area = vent.sum(axis=(1, 2))
    k0 = int(np.argmax(area))
    in_mask = np.zeros_like(t1, dtype=np.uint8)
    in_mask[k0 - 2 : k0 + 3][vent[k0 - 2 : k0 + 3]] = 1
    # Output region: the ventricle on slice k0, grown in-plane (inside the left hemisphere) to about 1000 voxels.
    out2d = vent[k0].copy()
    while out2d.sum() < 950:
        out2d = ndi.binary_dilation(out2d) & left[None, :][0]
    out_mask = np.zeros_like(in_mask)
    out_mask[k0][out2d] = 1
    com = ndi.center_of_mass(out_mask)
    phys = crop.TransformContinuousIndexToPhysicalPoint([com[2], com[1], com[0]])
    print("mid-ventricular slice k=%d (z=%.1f mm), input mask %d voxels, output mask %d voxels, centre LPS %s"
          % (k0, phys[2], in_mask.sum(), out_mask.sum(), np.round(phys, 1)))
    assert phys[0] > 0, "output mask must be in patient left (LPS x > 0)"

    sizes_b = {}
    sizes_b["IBIX-T1.nrrd"] = write_like(t1, crop, os.path.join(SAMPLES, "IBIX-T1.nrrd"))
    # The T2 target does not compress under 2 MiB (2.6 MB as int16), so it is not shipped; kept in the cache.
    write_like(np.round(t2n * 1000).astype(np.int16), crop, os.path.join(CACHE, "IBIX-T2-target.nrrd"))
    sizes_b["IBIX-T1-input-mask.nrrd"] = write_like(in_mask, crop, os.path.join(SAMPLES, "IBIX-T1-input-mask.nrrd"))
    sizes_b["IBIX-T1-output-mask.nrrd"] = write_like(out_mask, crop, os.path.join(SAMPLES, "IBIX-T1-output-mask.nrrd"))
    print(json.dumps(sizes_b, indent=1))
    np.savez_compressed(os.path.join(CACHE, "t1_t2.npz"), t1=t1, t2n=t2n, gm=gm, wm=wm, csf=csf, k0=k0,
                        tissue_mean_au=np.array([m_wm, m_gm, m_csf]) * 1000)


if __name__ == "__main__":
    main()
