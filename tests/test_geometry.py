"""Geometry core (DESIGN §3): round trips, known motions, resize rule, alignment."""
import numpy as np
import pytest
from PIL import Image

from data import geometry as g


def _K(W=320, H=240, f=260.0):
    return np.array([[f, 0, (W - 1) / 2], [0, f * 1.01, (H - 1) / 2], [0, 0, 1.0]])


def _pose(rvec, t):
    T = np.eye(4)
    T[:3, :3] = g.axis_angle_to_matrix(np.asarray(rvec, float))
    T[:3, 3] = t
    return T


def test_unproject_project_round_trip():
    rng = np.random.default_rng(0)
    K = _K()
    uv = rng.uniform([0, 0], [319, 239], size=(1000, 2))
    z = rng.uniform(0.3, 12.0, size=1000)
    uv2, z2 = g.project(g.unproject(uv, z, K), K)
    assert np.abs(uv2 - uv).max() < 1e-4
    assert np.abs(z2 - z).max() < 1e-9


def test_unproject_depth_matches_pointwise():
    K = _K(8, 6, 5.0)
    depth = np.arange(48, dtype=np.float32).reshape(6, 8) / 10 + 1
    X = g.unproject_depth(depth, K)
    assert X.shape == (6, 8, 3)
    # pixel (u=5, v=2): x = (5 - cx) / fx * z
    z = depth[2, 5]
    assert np.allclose(X[2, 5], [(5 - K[0, 2]) / K[0, 0] * z, (2 - K[1, 2]) / K[1, 1] * z, z])


def test_known_rigid_motion_moves_known_points_to_known_pixels():
    K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
    cam2world_a = np.eye(4)
    # B is A moved 1 m to the right (x), looking the same way
    cam2world_b = _pose([0, 0, 0], [1.0, 0, 0])
    # a point straight ahead of A at 2 m sits at A's principal point ...
    uv_b, z_b = g.reproject(np.array([[50.0, 40.0]]), np.array([2.0]), K, cam2world_a, K, cam2world_b)
    # ... and in B at x = -1 m: u = 50 + 100 * (-1) / 2 = 0
    assert np.allclose(uv_b, [[0.0, 40.0]]) and np.allclose(z_b, [2.0])
    # C rotated +90 degrees about y: its optical axis (R[:, 2]) is world +x, so (1, 0, 0) is straight ahead
    cam2world_c = _pose([0, np.pi / 2, 0], [0, 0, 0])
    assert np.allclose(cam2world_c[:3, 2], [1, 0, 0])
    uv, z = g.project(g.transform(g.invert_pose(cam2world_c), np.array([[1.0, 0, 0]])), K)
    assert np.allclose(uv, [[50.0, 40.0]], atol=1e-9) and np.allclose(z, [1.0])


def test_points_behind_camera_are_not_projected():
    uv, z = g.project(np.array([[0.0, 0, -1.0]]), _K())
    assert np.isnan(uv).all() and z[0] < 0


def test_resize_rule_keeps_the_same_surface_point():
    """A point projected with K and mapped by the resize rule equals projecting with the resized K."""
    rng = np.random.default_rng(1)
    K = _K(640, 480, 500.0)
    X = np.c_[rng.uniform(-1, 1, (200, 2)), rng.uniform(1, 5, 200)]
    uv, _ = g.project(X, K)
    for new in [(320, 240), (224, 168), (448, 336), (300, 200)]:
        K2 = g.resize_intrinsics(K, (640, 480), new)
        uv2, _ = g.project(X, K2)
        assert np.abs(g.resize_points(uv, (640, 480), new) - uv2).max() < 1e-9
    # pixel-centre convention: the centre of the first pixel of a 2x-downsampled image
    # lies between the first two source pixels
    assert np.allclose(g.resize_points(np.array([[0.5, 0.5]]), (4, 4), (2, 2)), [[0.0, 0.0]])


def test_crop_intrinsics():
    K = _K()
    K2 = g.crop_intrinsics(K, 10, 20)
    X = np.array([[0.2, -0.1, 2.0]])
    assert np.allclose(g.project(X, K2)[0], g.project(X, K)[0] - [10, 20])


def test_nearest_exact_depth_resize_agrees_with_rule_and_pil():
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 5, size=(48, 64)).astype(np.float32)
    for new in [(32, 24), (100, 75), (64, 48), (17, 13)]:
        out = g.resize_depth_nearest(depth, new)
        assert out.shape == (new[1], new[0])
        # every output value is an input value (never interpolated)
        assert np.isin(out, depth).all()
        # the rule: output pixel centre u' maps to source (u'+0.5)/sx - 0.5, inside source pixel floor(...+0.5)
        sx, sy = new[0] / 64, new[1] / 48
        for v2, u2 in [(0, 0), (new[1] - 1, new[0] - 1), (new[1] // 2, new[0] // 3)]:
            us = g.pixel_index((u2 + 0.5) / sx - 0.5)
            vs = g.pixel_index((v2 + 0.5) / sy - 0.5)
            assert out[v2, u2] == depth[vs, us]
        # PIL NEAREST agrees except where a destination centre falls exactly on a source
        # pixel boundary (a tie PIL breaks by accumulated float error)
        pil = np.asarray(Image.fromarray(depth, mode="F").resize(new, Image.NEAREST))
        tie_u = np.isclose(((np.arange(new[0]) + 0.5) * 64 / new[0]) % 1, 0)
        tie_v = np.isclose(((np.arange(new[1]) + 0.5) * 48 / new[1]) % 1, 0)
        same = out == pil
        assert same[~tie_v][:, ~tie_u].all()


def test_visibility_and_tolerances():
    K = _K(40, 30, 30.0)
    depth_b = np.full((30, 40), 2.0, np.float32)
    uv = np.array([[10.0, 10.0], [10.0, 10.0], [10.0, 10.0], [-3.0, 5.0], [10.0, 10.0]])
    z = np.array([2.04, 2.2, 1.0, 2.0, -2.0])
    vis = g.visible_in(uv, z, depth_b, abs_tol=0.05, rel_tol=0.03)
    assert vis.tolist() == [True, False, False, False, False]
    # relative tolerance wins at large depth: 3% of 10 m = 0.3 m
    depth_far = np.full((30, 40), 10.0, np.float32)
    assert g.visible_in(uv[:1], np.array([10.25]), depth_far).all()
    # invalid depth (0) in B is never visible
    assert not g.visible_in(uv[:1], np.array([0.0001]), np.zeros((30, 40), np.float32)).any()
    # non-metric scenes: 1% of the scene's median depth
    assert g.visibility_tolerance(False, 7.0) == pytest.approx(0.07)
    assert g.visibility_tolerance(True) == 0.05
    with pytest.raises(ValueError):
        g.visibility_tolerance(False, None)


def test_overlap_of_identical_and_disjoint_views():
    K = _K(40, 30, 30.0)
    depth = np.full((30, 40), 3.0, np.float32)
    assert g.overlap(depth, K, np.eye(4), depth, K, np.eye(4)) == 1.0
    away = _pose([0, np.pi, 0], [0, 0, 0])  # looking backwards
    assert g.overlap(depth, K, np.eye(4), depth, K, away) == 0.0


def test_gl_cv_conversion_is_an_involution_and_flips_y_z():
    T = _pose([0.1, -0.2, 0.3], [1, 2, 3])
    assert np.allclose(g.gl_to_cv(g.gl_to_cv(T)), T)
    T_cv = g.gl_to_cv(T)
    assert np.allclose(T_cv[:3, 0], T[:3, 0])
    assert np.allclose(T_cv[:3, 1], -T[:3, 1]) and np.allclose(T_cv[:3, 2], -T[:3, 2])
    assert np.allclose(T_cv[:3, 3], T[:3, 3])


def test_pose_validation():
    assert g.pose_problem(_pose([0.3, 0.1, 0], [1, 2, 3])) is None
    bad = np.full((4, 4), -np.inf)
    assert "finite" in g.pose_problem(bad)
    shear = np.eye(4)
    shear[0, 1] = 0.5
    assert "rigid" in g.pose_problem(shear)
    mirror = np.diag([1.0, 1, -1, 1])
    assert "rigid" in g.pose_problem(mirror)
    assert "shape" in g.pose_problem(np.eye(3))


def test_bilinear_sampling_centre_convention():
    img = np.array([[0.0, 10.0], [20.0, 30.0]])
    vals, inside = g.sample_bilinear(img, np.array([[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [1.0, 1.0], [2.0, 0.0]]))
    assert vals[:4].tolist() == [0.0, 5.0, 15.0, 30.0]
    assert inside.tolist() == [True, True, True, True, False]


def _nearest_by_hand(img, uv):
    """sample_nearest's definition, one point at a time: the pixel floor(x + 0.5) if inside, else 0."""
    H, W = img.shape[:2]
    out, inside = np.zeros((len(uv),) + img.shape[2:], img.dtype), np.zeros(len(uv), bool)
    for n, (u, v) in enumerate(uv):
        if np.isfinite(u) and np.isfinite(v):
            ui, vi = int(np.floor(u + 0.5)), int(np.floor(v + 0.5))
            if 0 <= ui < W and 0 <= vi < H:
                out[n], inside[n] = img[vi, ui], True
    return out, inside


def _bilinear_by_hand(img, uv):
    """sample_bilinear's definition, one point at a time (edges clamp; 0 outside [-0.5, W - 0.5))."""
    H, W = img.shape[:2]
    out, inside = np.zeros((len(uv),) + img.shape[2:]), np.zeros(len(uv), bool)
    for n, (u, v) in enumerate(uv):
        if not (np.isfinite(u) and np.isfinite(v) and -0.5 <= u < W - 0.5 and -0.5 <= v < H - 0.5):
            continue
        uc, vc = min(max(u, 0.0), W - 1.0), min(max(v, 0.0), H - 1.0)
        u0, v0 = min(int(np.floor(uc)), max(W - 2, 0)), min(int(np.floor(vc)), max(H - 2, 0))
        u1, v1 = min(u0 + 1, W - 1), min(v0 + 1, H - 1)
        du, dv = uc - u0, vc - v0
        px = [img[a, b].astype(np.float64) for a, b in ((v0, u0), (v0, u1), (v1, u0), (v1, u1))]
        top = px[0] * (1 - du) + px[1] * du
        bot = px[2] * (1 - du) + px[3] * du
        out[n], inside[n] = top * (1 - dv) + bot * dv, True
    return out, inside


def test_samplers_equal_their_definition_point_by_point():
    """The vectorised samplers (flat gathers) give, bit for bit, what their definition gives point by point:
    grey, RGB and depth dtypes, non-contiguous images, pixel edges, nan / +-inf / huge coordinates."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        H, W = (int(x) for x in rng.integers(1, 30, 2))
        shape = (H, W) + ((3,), (1,), ())[trial % 3]
        img = (rng.random(shape) * 60000).astype((np.uint8, np.uint16, np.float32, np.int64)[trial % 4])
        if trial % 5 == 0:
            img = img[:, ::-1]  # a view: not C-contiguous
        uv = rng.uniform(-3, max(H, W) + 3, (150, 2))
        half = rng.random(150) < 0.25
        uv[half] = np.round(uv[half] * 2) / 2  # on the x.5 boundaries
        for bad in (np.nan, np.inf, -np.inf, 1e300, -1e300):
            uv[rng.random((150, 2)) < 0.02] = bad
        with np.errstate(invalid="ignore", over="ignore"):
            for fast, slow in ((g.sample_nearest, _nearest_by_hand), (g.sample_bilinear, _bilinear_by_hand)):
                got, got_in = fast(img, uv)
                want, want_in = slow(img, uv)
                assert got.dtype == want.dtype and got.shape == want.shape, (fast.__name__, trial)
                assert np.array_equal(got_in, want_in) and got.tobytes() == want.tobytes(), (fast.__name__, trial)


def test_homography_alignment_matches_direct_colour_mapping():
    """Shared centre: colour pixel p_c maps to the depth image by H = K_d inv(K_c)."""
    K_c = np.array([[1170.0, 0, 647.8], [0, 1170.0, 483.8], [0, 0, 1]])
    K_d = np.array([[577.6, 0, 318.9], [0, 577.6, 238.7], [0, 0, 1]])
    Hm = g.color_to_depth_homography(K_c, K_d)
    X = np.array([[0.3, -0.2, 2.0], [-0.5, 0.4, 3.0]])
    p_c, _ = g.project(X, K_c)
    p_d, _ = g.project(X, K_d)
    ph = (Hm @ np.c_[p_c, np.ones(2)].T).T
    assert np.allclose(ph[:, :2] / ph[:, 2:], p_d, atol=1e-9)


def test_fast_homography_alignment_agrees_with_the_numpy_reference():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (97, 131, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(rgb).resize((262, 194), Image.BICUBIC))  # smooth enough to compare
    K_c = np.array([[230.0, 0, 130.2], [0, 231.0, 96.7], [0, 0, 1]])
    K_d = np.array([[118.0, 0, 63.9], [0, 118.5, 47.1], [0, 0, 1]])
    fast = g.align_color_to_depth(rgb, K_c, K_d, (128, 96)).astype(int)
    ref = g.align_color_to_depth_reference(rgb, K_c, K_d, (128, 96)).astype(int)
    assert fast.shape == ref.shape == (96, 128, 3)
    inner = np.abs(fast - ref)[2:-2, 2:-2]
    assert inner.max() <= 1, inner.max()


def test_affine_alignment_is_byte_identical_to_the_perspective_warp():
    """Two pinhole K's make the colour -> depth map affine, so the alignment uses PIL's affine warp: the
    same bytes as the perspective warp it replaces (ScanNet's 1296x968 colour onto 640x480 depth), also
    with a skewed K."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 255, (968, 1296, 3), dtype=np.uint8)
    K_d = np.array([[577.6, 0, 318.9], [0, 577.6, 238.5], [0, 0, 1]])
    for skew in (0.0, 1.7):
        K_c = np.array([[1170.2, skew, 647.8], [0, 1170.2, 483.8], [0, 0, 1]])
        got = g.align_color_to_depth(rgb, K_c, K_d, (640, 480))
        S = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
        M = S @ K_c @ np.linalg.inv(K_d) @ np.linalg.inv(S)
        M = M / M[2, 2]
        assert M[2, 0] == 0.0 and M[2, 1] == 0.0
        want = np.asarray(PILImage.fromarray(rgb).transform((640, 480), PILImage.Transform.PERSPECTIVE,
                                                            tuple(M.ravel()[:8]), PILImage.Resampling.BILINEAR))
        assert got.shape == (480, 640, 3) and np.array_equal(got, want), skew
        # the ScanNet reader hands over the decoder's PIL image, not an array: the same bytes
        assert np.array_equal(g.align_color_to_depth(PILImage.fromarray(rgb), K_c, K_d, (640, 480)), want), skew


def test_distortion_model_and_fold_back_radius():
    # OpenCV's radial-tangential model written out term by term
    k1, k2, k3, k4, p1, p2 = -0.12, 0.02, 0.003, -0.001, 0.001, -0.0015
    pts = np.array([[0.0, 0.0], [0.3, -0.2], [-0.6, 0.45]])
    got = g.distort_normalized(pts, (k1, k2, k3, k4, p1, p2))
    for (x, y), (xd, yd) in zip(pts, got):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3 + k4 * r2 ** 4
        assert xd == pytest.approx(x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), abs=1e-12)
        assert yd == pytest.approx(y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y, abs=1e-12)
    # rho * (1 + k1 rho^2) stops increasing at rho = 1 / sqrt(-3 k1)
    assert g.monotonic_radius((-0.1, 0, 0, 0, 0, 0), 3.0) == pytest.approx(1 / np.sqrt(0.3), abs=1e-3)
    assert g.monotonic_radius((-0.1, 0, 0, 0, 0, 0), 1.0) == float("inf")
    # the map of a zero lens is the identity
    K = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    uv, valid = g.undistortion_map(K, (0.0,) * 6, (64, 48))
    v, u = np.mgrid[0:48, 0:64]
    assert valid.all() and np.abs(uv - np.stack([u.ravel(), v.ravel()], 1)).max() < 1e-9
