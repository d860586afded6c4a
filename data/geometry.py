"""Geometry core: every convention of DESIGN §3 lives here, once.

Conventions (tested in tests/test_geometry.py):
- metres; OpenCV camera axes (x right, y down, z forward);
- poses are camera-to-world 4x4 matrices (`cam2world`, `T_wc`);
- depth is z-depth along the optical axis, 0 = invalid;
- the centre of pixel column u, row v is the point (u, v). Rounding a
  continuous coordinate to its pixel is `floor(x + 0.5)` (`pixel_index`).

All functions are pure and take/return numpy arrays (float64 unless stated).
"""
from __future__ import annotations

import numpy as np

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])

DEFAULT_ABS_TOL = 0.05  # metres (metric scenes)
DEFAULT_REL_TOL = 0.03  # fraction of z in B
NONMETRIC_ABS_FRACTION = 0.01  # of the scene's median depth


# --------------------------------------------------------------------------- points

def pixel_index(x: np.ndarray) -> np.ndarray:
    """Integer pixel containing the continuous coordinate x (centre convention).

    `floor(x + 0.5)`: pixel u covers [u - 0.5, u + 0.5). Shape preserved, int64.
    """
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def unproject(uv: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels with z-depth to camera points.

    uv (N, 2), z (N,), K (3, 3) -> X_cam (N, 3).
    """
    uv = np.asarray(uv, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    s = K[0, 1]
    y = (uv[:, 1] - cy) / fy
    x = (uv[:, 0] - cx - s * y) / fx
    return np.stack([x * z, y * z, z], axis=-1)


def unproject_depth(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Depth map (H, W) to camera points (H, W, 3); invalid pixels keep z = 0."""
    H, W = depth.shape
    v, u = np.mgrid[0:H, 0:W]
    uv = np.stack([u.ravel(), v.ravel()], axis=-1)
    return unproject(uv, depth.ravel(), K).reshape(H, W, 3)


def transform(T: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform: T (4, 4), X (N, 3) -> (N, 3)."""
    X = np.asarray(X, dtype=np.float64)
    return X @ T[:3, :3].T + T[:3, 3]


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (cam2world <-> world2cam)."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def project(X_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera points to pixels.

    X_cam (N, 3), K (3, 3) -> uv (N, 2), z (N,). Points with z <= 0 get uv = nan.
    """
    X_cam = np.asarray(X_cam, dtype=np.float64)
    z = X_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = X_cam @ K.T
        uv = p[:, :2] / p[:, 2:3]
    uv[z <= 0] = np.nan
    return uv, z


def reproject(uv_a: np.ndarray, z_a: np.ndarray, K_a: np.ndarray, cam2world_a: np.ndarray,
              K_b: np.ndarray, cam2world_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move pixels of view A with their depth into view B.

    uv_a (N, 2), z_a (N,) -> uv_b (N, 2), z_b (N,) (z_b is z-depth in B's camera).
    """
    X_w = transform(cam2world_a, unproject(uv_a, z_a, K_a))
    X_b = transform(invert_pose(cam2world_b), X_w)
    return project(X_b, K_b)


def sample_nearest(img: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of the pixel containing each point.

    img (H, W) or (H, W, C), uv (N, 2) -> values (N,) or (N, C), inside (N,) bool.
    Points outside the image (or not finite) get 0.
    """
    H, W = img.shape[:2]
    uv = np.asarray(uv, dtype=np.float64)
    fu = np.floor(uv[:, 0] + 0.5)  # pixel_index, kept in float: nan and +-inf fail every comparison below
    fv = np.floor(uv[:, 1] + 0.5)
    with np.errstate(invalid="ignore"):
        inside = (fu >= 0) & (fu < W) & (fv >= 0) & (fv < H)
        flat = np.where(inside, fv * W + fu, 0.0).astype(np.intp)
    return _gather(img, flat, inside), inside


def _gather(img: np.ndarray, flat: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """img's pixels at flat indices v * W + u: (N,) or (N, C); rows not `inside` set to 0."""
    H, W = img.shape[:2]
    if img.flags.c_contiguous:  # one take from the flat view, not a 2-D fancy index
        out = img.reshape((H * W,) + img.shape[2:]).take(flat, axis=0)
    else:
        out = img[flat // W, flat % W]
    if inside is not None and not inside.all():
        out[~inside] = 0
    return out


def sample_bilinear(img: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sample at continuous pixel coordinates (centre convention).

    img (H, W) or (H, W, C), uv (N, 2) -> values float64 (N,) or (N, C), inside (N,) bool
    (inside: the point lies within [-0.5, W-0.5) x [-0.5, H-0.5); edges clamp).
    """
    H, W = img.shape[:2]
    uv = np.asarray(uv, dtype=np.float64)
    finite = np.isfinite(uv).all(axis=1)
    u = np.where(finite, uv[:, 0], -10.0)
    v = np.where(finite, uv[:, 1], -10.0)
    inside = finite & (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    uc = np.minimum(np.maximum(u, 0), W - 1)
    vc = np.minimum(np.maximum(v, 0), H - 1)
    u0 = np.minimum(np.floor(uc).astype(np.intp), max(W - 2, 0))  # uc >= 0: floor >= 0
    v0 = np.minimum(np.floor(vc).astype(np.intp), max(H - 2, 0))
    u1 = np.minimum(u0 + 1, W - 1)
    v1 = np.minimum(v0 + 1, H - 1)
    du, dv = uc - u0, vc - v0
    if img.ndim == 3:
        du, dv = du[:, None], dv[:, None]
    r0, r1 = v0 * W, v1 * W

    def at(flat: np.ndarray) -> np.ndarray:  # the 4 neighbours only, not the image, to float64
        return _gather(img, flat).astype(np.float64)

    wu = 1 - du
    top = at(r0 + u0) * wu + at(r0 + u1) * du
    bot = at(r1 + u0) * wu + at(r1 + u1) * du
    out = top * (1 - dv) + bot * dv
    out[~inside] = 0
    return out, inside


# ---------------------------------------------------------------------- visibility

def visibility_tolerance(metric_depth: bool, median_depth: float | None = None,
                         abs_tol: float = DEFAULT_ABS_TOL) -> float:
    """Absolute depth tolerance of the visibility test (DESIGN §4, §3).

    Metric scenes: `abs_tol` metres. Non-metric (COLMAP-scaled) scenes: 1% of the
    scene's median depth, which must then be given.
    """
    if metric_depth:
        return float(abs_tol)
    if median_depth is None or not np.isfinite(median_depth) or median_depth <= 0:
        raise ValueError("a non-metric scene needs its median depth for the visibility tolerance")
    return NONMETRIC_ABS_FRACTION * float(median_depth)


def visible_in(uv_b: np.ndarray, z_b: np.ndarray, depth_b: np.ndarray,
               abs_tol: float = DEFAULT_ABS_TOL, rel_tol: float = DEFAULT_REL_TOL) -> np.ndarray:
    """Visibility test of DESIGN §4 for points already moved into view B.

    The point projects inside B (its rounded pixel is in the image), lies in front of B
    (z_b > 0), B has depth there, and |D_B(round(uv_b)) - z_b| <= max(abs_tol, rel_tol * z_b).
    uv_b (N, 2), z_b (N,), depth_b (H, W) -> (N,) bool.
    """
    d, inside = sample_nearest(depth_b, uv_b)
    d = d.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = inside & (z_b > 0) & (d > 0)
        tol = np.maximum(abs_tol, rel_tol * np.where(np.isfinite(z_b), z_b, 0.0))
        ok &= np.abs(d - z_b) <= tol
    return ok


def overlap(depth_a: np.ndarray, K_a: np.ndarray, cam2world_a: np.ndarray,
            depth_b: np.ndarray, K_b: np.ndarray, cam2world_b: np.ndarray,
            uv_a: np.ndarray | None = None, abs_tol: float = DEFAULT_ABS_TOL,
            rel_tol: float = DEFAULT_REL_TOL) -> float:
    """Fraction of A's valid pixels (or of the given grid uv_a (N, 2)) visible in B."""
    if uv_a is None:
        v, u = np.nonzero(depth_a > 0)
        uv_a = np.stack([u, v], axis=-1).astype(np.float64)
        z_a = depth_a[v, u]
    else:
        z_a, _ = sample_nearest(depth_a, uv_a)
        keep = z_a > 0
        uv_a, z_a = uv_a[keep], z_a[keep]
    if len(uv_a) == 0:
        return 0.0
    uv_b, z_b = reproject(uv_a, z_a, K_a, cam2world_a, K_b, cam2world_b)
    return float(visible_in(uv_b, z_b, depth_b, abs_tol, rel_tol).mean())


# ------------------------------------------------------------------ resize and crop

def resize_points(uv: np.ndarray, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates from an image of size (W, H) to (W', H').

    `u' = (u + 0.5) * sx - 0.5` with sx = W'/W (same for v). uv (N, 2) -> (N, 2).
    """
    sx = new_size[0] / size[0]
    sy = new_size[1] / size[1]
    uv = np.asarray(uv, dtype=np.float64)
    return np.stack([(uv[:, 0] + 0.5) * sx - 0.5, (uv[:, 1] + 0.5) * sy - 0.5], axis=-1)


def resize_intrinsics(K: np.ndarray, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """K of an image resized from (W, H) to (W', H'): fx' = fx sx, cx' = (cx + 0.5) sx - 0.5."""
    sx = new_size[0] / size[0]
    sy = new_size[1] / size[1]
    K2 = np.array(K, dtype=np.float64)
    K2[0, 0] *= sx
    K2[0, 1] *= sx
    K2[1, 1] *= sy
    K2[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K2[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K2


def crop_intrinsics(K: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """K of the crop whose top-left pixel is (x0, y0) of the original image."""
    K2 = np.array(K, dtype=np.float64)
    K2[0, 2] -= x0
    K2[1, 2] -= y0
    return K2


def half_pixel_to_centre(K: np.ndarray) -> np.ndarray:
    """Convert K of a corpus with pixel centres at (u + 0.5, v + 0.5) to our convention."""
    K2 = np.array(K, dtype=np.float64)
    K2[0, 2] -= 0.5
    K2[1, 2] -= 0.5
    return K2


def nearest_indices(n_src: int, n_dst: int) -> np.ndarray:
    """Source index of each destination index under nearest-exact resampling.

    Destination centre i maps to source coordinate (i + 0.5) * n_src / n_dst - 0.5,
    whose containing pixel is floor((i + 0.5) * n_src / n_dst). (n_dst,) int64.
    """
    i = np.arange(n_dst, dtype=np.float64)
    return np.minimum(np.floor((i + 0.5) * n_src / n_dst).astype(np.int64), n_src - 1)


def resize_depth_nearest(depth: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
    """Nearest-exact depth resize (never interpolated). depth (H, W) -> (H', W')."""
    H, W = depth.shape[:2]
    W2, H2 = new_size
    return depth[nearest_indices(H, H2)[:, None], nearest_indices(W, W2)[None, :]]


def fit_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(W, H) scaled so that the longer side is at most max_side (never upscales)."""
    W, H = size
    s = min(1.0, max_side / max(W, H))
    return max(1, int(round(W * s))), max(1, int(round(H * s)))


# ---------------------------------------------------------------- lens distortion

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
"""Radial-tangential (OpenCV / COLMAP OPENCV / nerfstudio perspective) parameters, in this order."""


def distort_normalized(xy: np.ndarray, dist) -> np.ndarray:
    """Distort normalized image points (x, y) = ((u - cx) / fx, (v - cy) / fy).

    dist = (k1, k2, k3, k4, p1, p2); with r = x^2 + y^2 and d = 1 + k1 r + k2 r^2 + k3 r^3 + k4 r^4:
    x_d = x d + 2 p1 x y + p2 (r + 2 x^2), y_d = y d + 2 p2 x y + p1 (r + 2 y^2)
    (OpenCV's model; nerfstudio's `radial_and_tangential_distort` with its k1..k4, p1, p2).
    xy (N, 2) -> (N, 2).
    """
    k1, k2, k3, k4, p1, p2 = (float(v) for v in dist)
    xy = np.asarray(xy, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    r = x * x + y * y
    d = 1.0 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
    return np.stack([x * d + 2 * p1 * x * y + p2 * (r + 2 * x * x),
                     y * d + 2 * p2 * x * y + p1 * (r + 2 * y * y)], axis=1)


def monotonic_radius(dist, rho_max: float, n: int = 4096) -> float:
    """Largest normalized radius up to which the radial map rho -> rho * d(rho^2) keeps increasing
    (beyond it the model folds back and a distorted pixel has two sources); inf if it does up to rho_max."""
    k1, k2, k3, k4 = (float(v) for v in dist[:4])
    rho = np.linspace(0.0, float(rho_max), n)
    r = rho * rho
    slope = 1.0 + r * (3 * k1 + r * (5 * k2 + r * (7 * k3 + r * 9 * k4)))  # d(rho * d(rho^2)) / d rho
    bad = np.nonzero(slope <= 0)[0]
    return float(rho[bad[0]]) if len(bad) else float("inf")


def folded_fraction(K: np.ndarray, dist, size: tuple[int, int], step: int = 8) -> float:
    """Share of the undistorted image beyond `monotonic_radius` (no unambiguous source), on a
    grid of every `step`-th pixel: cheap enough to check every camera of a scene up front."""
    xy = _normalized_grid(K, size, step)
    rho = np.hypot(xy[:, 0], xy[:, 1])
    return float((rho >= monotonic_radius(dist, float(rho.max()) + 1e-9)).mean())


def _normalized_grid(K: np.ndarray, size: tuple[int, int], step: int = 1) -> np.ndarray:
    """Normalized coordinates ((u - cx) / fx, (v - cy) / fy) of every `step`-th pixel, row-major: (N, 2)."""
    W, H = size
    v, u = np.mgrid[0:H:step, 0:W:step]
    return np.stack([(u.ravel() - K[0, 2]) / K[0, 0], (v.ravel() - K[1, 2]) / K[1, 1]], axis=1)


def undistortion_map(K: np.ndarray, dist, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of the undistorted (pinhole, same K, same size) image lies in the distorted one.

    Returns uv_src (H*W, 2) continuous pixel coordinates (centre convention) and valid (H*W,)
    bool: False where the lens model folds back (beyond `monotonic_radius`). Row-major order.
    """
    xy = _normalized_grid(K, size)
    rho = np.hypot(xy[:, 0], xy[:, 1])
    valid = rho < monotonic_radius(dist, float(rho.max()) + 1e-9)
    xyd = distort_normalized(xy, dist)
    uv = np.stack([K[0, 0] * xyd[:, 0] + K[0, 2], K[1, 1] * xyd[:, 1] + K[1, 2]], axis=1)
    return uv, valid


def undistort_rgb(rgb: np.ndarray, uv_src: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Resample an image onto the undistorted grid (bilinear; 0 outside the source or where invalid)."""
    H, W = rgb.shape[:2]
    vals, inside = sample_bilinear(rgb, uv_src)
    vals[~(inside & valid)] = 0
    return np.clip(np.round(vals), 0, 255).astype(np.uint8).reshape(rgb.shape)


def undistort_depth(depth: np.ndarray, uv_src: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Resample z-depth onto the undistorted grid: nearest (never mixed across an edge); the z of a
    point does not depend on the lens, so values are kept. 0 outside the source or where invalid."""
    vals, inside = sample_nearest(depth, uv_src)
    vals[~(inside & valid)] = 0
    return vals.reshape(depth.shape).astype(np.float32)


# --------------------------------------------------------------- colour alignment

def color_to_depth_homography(K_color: np.ndarray, K_depth: np.ndarray) -> np.ndarray:
    """H = K_d @ inv(K_c): maps a colour pixel to the depth image (shared camera centre)."""
    return K_depth @ np.linalg.inv(K_color)


def align_color_to_depth(rgb, K_color: np.ndarray, K_depth: np.ndarray,
                         depth_size: tuple[int, int], depth: np.ndarray | None = None,
                         depth_to_color: np.ndarray | None = None) -> np.ndarray:
    """Resample a colour image onto the depth camera's pixel grid.

    rgb (Hc, Wc, 3) uint8, or an RGB PIL image -> (Hd, Wd, 3) uint8, sharing K_depth with the depth map.
    With no `depth_to_color` (4x4, depth-camera points to colour-camera points), the
    cameras share a centre and the homography inv(H) = K_c inv(K_d) gives the colour
    pixel of each depth pixel. With differing extrinsics, pixels that have depth go
    through 3D (unproject with depth, move, project into colour); pixels without depth
    fall back to the rotation-only homography (the plane at infinity).
    """
    if depth_to_color is None:
        return _align_homography_pil(rgb, K_color, K_depth, depth_size)
    return align_color_to_depth_reference(np.asarray(rgb), K_color, K_depth, depth_size, depth, depth_to_color)


def _align_homography_pil(rgb, K_color: np.ndarray, K_depth: np.ndarray,
                          depth_size: tuple[int, int]) -> np.ndarray:
    """Shared-centre alignment as one PIL perspective warp (bilinear, in C; ~6x the numpy path).

    PIL puts pixel i on [i, i + 1), our convention on [i - 0.5, i + 0.5): the homography is
    conjugated by that half-pixel shift. Agrees with `align_color_to_depth_reference` within
    one grey level (rounding).
    """
    from PIL import Image

    Hinv = K_color @ np.linalg.inv(K_depth)  # depth pixel -> colour pixel (our pixel centres)
    S = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])  # ours -> PIL's coordinates
    M = S @ Hinv @ np.linalg.inv(S)
    M = M / M[2, 2]
    if isinstance(rgb, Image.Image):  # already decoded by PIL (the ScanNet reader): warped as it is, no copies
        img = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    else:
        img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    # Two pinhole K's give an affine map (last row [0, 0, 1]): PIL's affine warp samples the same points
    # as its perspective one (which divides by 1 there), the same bytes, ~20% faster.
    affine = M[2, 0] == 0.0 and M[2, 1] == 0.0
    out = img.transform(tuple(int(x) for x in depth_size),
                        Image.Transform.AFFINE if affine else Image.Transform.PERSPECTIVE,
                        tuple(M.ravel()[:6 if affine else 8]), Image.Resampling.BILINEAR)
    return np.asarray(out)


def align_color_to_depth_reference(rgb: np.ndarray, K_color: np.ndarray, K_depth: np.ndarray,
                                   depth_size: tuple[int, int], depth: np.ndarray | None = None,
                                   depth_to_color: np.ndarray | None = None) -> np.ndarray:
    """numpy implementation of `align_color_to_depth` (both paths; the reference in tests)."""
    Wd, Hd = depth_size
    v, u = np.mgrid[0:Hd, 0:Wd]
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=0).astype(np.float64)  # (3, N)
    R = np.eye(3) if depth_to_color is None else depth_to_color[:3, :3]
    Hinv = K_color @ R @ np.linalg.inv(K_depth)  # depth pixel -> colour pixel (at infinity)
    p = Hinv @ pix
    uv_c = (p[:2] / p[2:3]).T  # (N, 2)
    if depth_to_color is not None:
        if depth is None:
            raise ValueError("differing colour/depth extrinsics need the depth map for alignment")
        z = depth.ravel().astype(np.float64)
        has = z > 0
        X_d = unproject(pix[:2].T[has], z[has], K_depth)
        uv_h, _ = project(transform(depth_to_color, X_d), K_color)
        uv_c[has] = uv_h
    out, _ = sample_bilinear(rgb, uv_c)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(Hd, Wd, 3)


# ------------------------------------------------------------------------- poses

def gl_to_cv(cam2world_gl: np.ndarray) -> np.ndarray:
    """OpenGL-axes camera-to-world (x right, y up, z back) to OpenCV axes.

    `T_cv = T_gl @ diag(1, -1, -1, 1)`; the same call converts back (an involution).
    """
    return np.asarray(cam2world_gl, dtype=np.float64) @ GL_TO_CV


def pose_problem(T: np.ndarray, tol: float = 1e-3) -> str | None:
    """Why a 4x4 pose cannot be used, or None if it is a finite rigid transform."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        return f"pose has shape {T.shape}, expected (4, 4)"
    if not np.isfinite(T).all():
        return "pose is not finite"
    if np.abs(T[3] - [0, 0, 0, 1]).max() > tol:
        return "pose last row is not [0 0 0 1]"
    R = T[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > tol or abs(np.linalg.det(R) - 1.0) > tol:
        return "pose rotation is not rigid"
    return None


def axis_angle_to_matrix(rvec: np.ndarray) -> np.ndarray:
    """Rodrigues: axis-angle (3,) (angle = norm, radians) -> rotation (3, 3)."""
    rvec = np.asarray(rvec, dtype=np.float64)
    theta = np.linalg.norm(rvec)
    if theta < 1e-12:
        return np.eye(3)
    k = rvec / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * Kx + (1 - np.cos(theta)) * (Kx @ Kx)
