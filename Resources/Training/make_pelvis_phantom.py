"""Procedural, seeded pelvis-like phantoms: 3-channel Dixon-style MRI (water, fat, in-phase) + CT in HU.

Every phantom is built voxel-aligned on a 3D grid (slices, rows, cols) = (NZ, 128, 128), 3 mm in-plane and 4 mm
between slices, from implicit 3D shapes whose parameters vary smoothly along z. Identity direction: cols run to
+x (patient left in LPS), rows to +y (posterior), slices to +z (superior).

Tissue classes (label: name, CT HU, water, fat signal fractions before bias/noise):
    0 air (outside)      -1000   0     0
    1 fat                 -100   0.08  0.90
    2 muscle / soft        40    0.60  0.04
    3 fluid (bladder)      10    0.40  0.00
    4 bowel gas          -1000   0     0
    5 bone marrow          300   0.25  0.70
    6 cortical bone       1200   0.02  0.01
Cortical bone and gas are both dark on every channel: the network has to use context (a dark rim around fatty
marrow is bone, a dark blob in soft tissue is gas). CT is clipped to [-1024, 1250].

Usage:
    python make_pelvis_phantom.py            # writes the held-out sample case to Resources/SampleData
"""
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

NY = NX = 128
NZ = 28
SPACING = (3.0, 3.0, 4.0)  # x, y, z mm (SimpleITK order)
ORIGIN = (-190.5, -190.5, -56.0)
CLASSES = ["air", "fat", "muscle", "fluid", "gas", "marrow", "cortical_bone"]
HU = np.array([-1000, -100, 40, 10, -1000, 300, 1200], np.float32)
WATER = np.array([0.0, 0.08, 0.60, 0.40, 0.0, 0.25, 0.02], np.float32)
FAT = np.array([0.0, 0.90, 0.04, 0.0, 0.0, 0.70, 0.01], np.float32)
HU_RANGE = (-1024.0, 1250.0)
SAMPLE_SEED = 90001  # held out: training uses seeds < 10000, evaluation 20000..


def _grid():
    z = (np.arange(NZ) * SPACING[2])[:, None, None]  # mm from the lowest slice, 0..108
    y = ((np.arange(NY) - (NY - 1) / 2) * SPACING[1])[None, :, None]
    x = ((np.arange(NX) - (NX - 1) / 2) * SPACING[0])[None, None, :]
    return z, y, x


def _ellipsoid(z, y, x, c, r, rot=0.0):
    """Inside test of an ellipsoid, in-plane rotation rot (radians). c = (z, y, x), r = (rz, ry, rx)."""
    dz, dy, dx = z - c[0], y - c[1], x - c[2]
    cs, sn = np.cos(rot), np.sin(rot)
    u, v = cs * dx + sn * dy, -sn * dx + cs * dy
    return (dz / r[0]) ** 2 + (v / r[1]) ** 2 + (u / r[2]) ** 2 <= 1.0


def _capsule(z, y, x, p0, p1, rad):
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    t = ((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / (d @ d)
    t = np.clip(t, 0, 1)
    return (z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2 <= rad ** 2


def make_labels(rng):
    z, y, x = _grid()
    zt = z / (NZ * SPACING[2])  # 0..1 inferior -> superior
    shape = (NZ, NY, NX)
    lab = np.zeros(shape, np.uint8)

    # Body outline: ellipse with smooth low-order shape wobble, semi-axes varying smoothly along z.
    a = rng.uniform(150, 178) * (1 + rng.uniform(-0.06, 0.10) * (zt - 0.5))
    b = rng.uniform(100, 128) * (1 + rng.uniform(-0.06, 0.08) * (zt - 0.5))
    cy0 = rng.uniform(-8, 8)  # scalar centre, used to place organs
    cyz = cy0 + rng.uniform(-4, 4) * zt  # outline centre drifts slowly along z
    cx0 = rng.uniform(-6, 6)
    th = np.arctan2((y - cyz) / b, (x - cx0) / a)
    wob = 1.0
    for k in (2, 3, 4):
        wob = wob + rng.uniform(-0.035, 0.035) * np.cos(k * th + rng.uniform(0, 2 * np.pi) + rng.uniform(-0.5, 0.5) * zt)
    rho = np.sqrt(((x - cx0) / a) ** 2 + ((y - cyz) / b) ** 2) / wob
    body = rho <= 1.0
    fat_t = rng.uniform(10, 30) * (1 + 0.3 * np.cos(th - rng.uniform(0, 2 * np.pi)))  # subcutaneous fat (mm)
    inner = rho <= 1.0 - fat_t / np.sqrt(a * b)
    lab[body] = 1
    lab[inner] = 2

    def inside(m):
        return m & inner

    # Visceral fat blobs
    for _ in range(rng.integers(3, 8)):
        c = (rng.uniform(0, 110), cy0 + rng.uniform(-50, 60), cx0 + rng.uniform(-70, 70))
        r = (rng.uniform(15, 40), rng.uniform(8, 25), rng.uniform(8, 25))
        lab[inside(_ellipsoid(z, y, x, c, r, rng.uniform(0, np.pi)))] = 1

    # Bowel: gas pockets with a soft-tissue wall (rectum / sigmoid / small bowel region, posterior-central)
    gas = np.zeros(shape, bool)
    for _ in range(rng.integers(3, 9)):
        c = (rng.uniform(0, 110), cy0 + rng.uniform(-20, 75), cx0 + rng.uniform(-65, 65))
        r = (rng.uniform(5, 22), rng.uniform(5, 16), rng.uniform(5, 18))
        g = _ellipsoid(z, y, x, c, r, rng.uniform(0, np.pi))
        wall = _ellipsoid(z, y, x, c, (r[0] + 3, r[1] + 4, r[2] + 4), 0.0) & ~g
        lab[inside(wall)] = 2
        gas |= inside(g)
    lab[gas] = 4

    # Bladder (fluid), anterior midline, lower pelvis
    c = (rng.uniform(25, 60), cy0 - rng.uniform(25, 50), cx0 + rng.uniform(-10, 10))
    r = (rng.uniform(20, 40), rng.uniform(20, 38), rng.uniform(28, 50))
    bladder = inside(_ellipsoid(z, y, x, c, r))
    lab[bladder] = 3

    # Bones (union), then cortical shell = bone minus its in-plane erosion, marrow = the rest.
    bone = np.zeros(shape, bool)
    heads = []
    zh = rng.uniform(18, 40)  # femoral head centre height (mm above the lowest slice)
    rh = rng.uniform(21, 26)
    for s in (-1, 1):
        hx = cx0 + s * rng.uniform(82, 100)
        hy = cy0 + rng.uniform(-12, 8)
        head = _ellipsoid(z, y, x, (zh, hy, hx), (rh, rh, rh))
        heads.append(head & inner)
        bone |= head
        # femoral neck/shaft going laterally and down
        bone |= _capsule(z, y, x, (zh, hy, hx), (zh - rng.uniform(30, 50), hy + rng.uniform(-5, 10),
                                                 hx + s * rng.uniform(35, 55)), rng.uniform(11, 15))
        # acetabulum: cup over the upper half of the head, separated by a thin joint space
        rr = np.sqrt((z - zh) ** 2 + (y - hy) ** 2 + (x - hx) ** 2)
        bone |= (rr >= rh + 3) & (rr <= rh + rng.uniform(10, 14)) & (z > zh - 5) & (s * (x - hx) < rh * 0.6)
        # ilium: flattened, rotated ellipsoid above and behind the acetabulum, rising superiorly
        bone |= _ellipsoid(z, y, x, (zh + rng.uniform(55, 70), hy + rng.uniform(25, 45), hx - s * rng.uniform(0, 15)),
                           (rng.uniform(40, 55), rng.uniform(45, 60), rng.uniform(9, 13)), s * rng.uniform(0.3, 0.6))
        # ischium: down and back from the head
        bone |= _capsule(z, y, x, (zh - 5, hy + 10, hx - s * 10),
                         (zh - rng.uniform(25, 40), hy + rng.uniform(30, 45), hx - s * rng.uniform(20, 35)),
                         rng.uniform(9, 13))
        # superior pubic ramus towards the symphysis
        bone |= _capsule(z, y, x, (zh, hy - 10, hx - s * 15), (zh - rng.uniform(0, 10), cy0 - rng.uniform(60, 75),
                                                                cx0 + s * 10), rng.uniform(8, 11))
    # sacrum (posterior midline, upper slices)
    bone |= _ellipsoid(z, y, x, (rng.uniform(85, 105), cy0 + rng.uniform(70, 85), cx0),
                       (rng.uniform(35, 50), rng.uniform(14, 20), rng.uniform(35, 48)), 0.0)
    bone &= inner
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    marrow = ndi.binary_erosion(bone, st, iterations=1)
    lab[bone] = 6
    lab[marrow] = 5
    return lab, heads


def synthesise(lab, rng, noise=None):
    """Dixon-style channels and CT from a label volume. Returns dict of float32 arrays + int16 CT."""
    w_frac = WATER.copy()
    f_frac = FAT.copy()
    w_frac[[1, 2, 3, 5]] *= rng.uniform(0.85, 1.15, 4)  # per-phantom tissue signal variation
    f_frac[[1, 2, 5]] *= rng.uniform(0.85, 1.15, 3)
    onehot = np.stack([(lab == k).astype(np.float32) for k in range(len(CLASSES))])
    # mild partial volume (sigma 0.5 voxel in-plane)
    onehot = ndi.gaussian_filter(onehot, (0, 0, 0.5, 0.5))
    w = np.tensordot(w_frac, onehot, 1)
    f = np.tensordot(f_frac, onehot, 1)
    ct = np.tensordot(HU, onehot, 1)
    # smooth multiplicative bias field (receive-coil like), shared by the channels
    bias = ndi.gaussian_filter(rng.normal(0, 1, (4, 6, 6)), 1.0)
    bias = ndi.zoom(bias, (NZ / 4, NY / 6, NX / 6), order=3)[:NZ, :NY, :NX]
    bias = np.exp(0.25 * bias / (bias.std() + 1e-6))
    scale = 1000.0 * rng.uniform(0.7, 1.4)
    sigma = (rng.uniform(0.01, 0.04) if noise is None else noise) * scale

    def rician(s):
        return np.sqrt((s + rng.normal(0, sigma, s.shape)) ** 2 + rng.normal(0, sigma, s.shape) ** 2)

    water = rician(w * bias * scale).astype(np.float32)
    fat = rician(f * bias * scale).astype(np.float32)
    inphase = rician((w + f) * bias * scale).astype(np.float32)
    ct = np.clip(np.round(ct), *HU_RANGE).astype(np.int16)
    return {"water": water, "fat": fat, "in_phase": inphase, "ct": ct}


def make_phantom(seed):
    rng = np.random.default_rng(seed)
    lab, heads = make_labels(rng)
    d = synthesise(lab, rng)
    d["labels"] = lab
    d["heads"] = heads
    return d


def _img(arr):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(SPACING)
    im.SetOrigin(ORIGIN)
    return im


def write_sample_case(out_dir, seed=SAMPLE_SEED):
    d = make_phantom(seed)
    lab = d["labels"]
    # input mask: one femoral head (the one with most voxels in the volume)
    head = max(d["heads"], key=lambda h: h.sum())
    in_mask = head.astype(np.uint8)
    # output mask: the largest gas pocket (2D connected component) on the slice with the largest such pocket
    best = (0, None, None)
    for k in range(NZ):
        cc, n = ndi.label(lab[k] == 4)
        if n:
            sizes = ndi.sum(np.ones_like(cc), cc, np.arange(1, n + 1))
            i = int(np.argmax(sizes))
            if sizes[i] > best[0]:
                best = (sizes[i], k, cc == i + 1)
    out_mask = np.zeros_like(in_mask)
    out_mask[best[1]][best[2]] = 1
    files = {
        "IBIX-Pelvis-water.nrrd": np.round(d["water"]).astype(np.int16),
        "IBIX-Pelvis-fat.nrrd": np.round(d["fat"]).astype(np.int16),
        "IBIX-Pelvis-inphase.nrrd": np.round(d["in_phase"]).astype(np.int16),
        "IBIX-Pelvis-ct.nrrd": d["ct"],
        "IBIX-Pelvis-input-mask.nrrd": in_mask,
        "IBIX-Pelvis-output-mask.nrrd": out_mask,
    }
    sizes = {}
    for name, arr in files.items():
        p = os.path.join(out_dir, name)
        sitk.WriteImage(_img(arr), p, True, 9)
        sizes[name] = os.path.getsize(p)
    print("sample case seed %d: femoral head %d voxels, gas pocket %d voxels on slice %d" %
          (seed, in_mask.sum(), out_mask.sum(), best[1]))
    return sizes


if __name__ == "__main__":
    from ibix_train_common import SAMPLES

    print(write_sample_case(SAMPLES))
