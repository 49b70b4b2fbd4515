"""The helical Joseph forward projector of :mod:`dosebench.simulator.projector`, vectorised over rays with
torch: the same conventions and the same arithmetic (dominant-axis plane stepping, bilinear samples in
the other two axes, zero outside the grid in x and y, the edge slices continued in z), on CUDA when
available and on the CPU for parity checks.

Rays are grouped by their dominant in-plane axis and processed in chunks of ``rays x planes`` samples
at a time (``max_samples``), so memory stays bounded whatever the scan size. Rays run from the actual
source (flying focal spot included) to the nominal detector element, as in the numba projector.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.geometry import HelicalGeometry


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bilinear(flat: torch.Tensor, fixed: torch.Tensor, stride_fixed: int, stride_a: int,
              fa: torch.Tensor, fb: torch.Tensor, na: int, nb: int) -> torch.Tensor:
    """Bilinear samples in planes ``fixed`` at fractional (a, b) indices, zero outside in a, z clamped."""
    fb = fb.clamp(0.0, nb - 1.0)
    a0f = torch.floor(fa)
    b0f = torch.clamp(torch.floor(fb), max=nb - 2.0)
    wa = fa - a0f
    wb = fb - b0f
    a0 = a0f.to(torch.int64)
    b0 = b0f.to(torch.int64)
    base = fixed * stride_fixed
    total = torch.zeros_like(fa)
    for da in (0, 1):
        a = a0 + da
        valid_a = (a >= 0) & (a < na)
        w_a = wa if da else 1.0 - wa
        a_index = base + a.clamp(0, na - 1) * stride_a
        for db in (0, 1):
            b = b0 + db
            valid = valid_a & (b >= 0) & (b < nb)
            weight = w_a * (wb if db else 1.0 - wb)
            values = flat[a_index + b.clamp(0, nb - 1)].to(fa.dtype)
            total += torch.where(valid, weight * values, torch.zeros((), dtype=fa.dtype, device=fa.device))
    return total


def forward_project_torch(mu_per_mm: np.ndarray | torch.Tensor, spacing_mm: tuple[float, float, float],
                          geometry: HelicalGeometry, views: range | None = None, *,
                          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                          max_samples: int | None = None) -> torch.Tensor:
    """Line integrals (``dtype``, on ``device``) of shape (len(views), rows, columns); see
    :func:`dosebench.simulator.projector.forward_project` for the conventions.

    ``dtype`` is the arithmetic precision of the ray geometry and the sums (the volume is float32);
    ``max_samples`` bounds the ray x plane samples computed at once (default 2^24 on CUDA, 2^21 on CPU).
    """
    device = torch.device(device) if device is not None else default_device()
    views = range(geometry.number_of_views) if views is None else views
    if views.step != 1 or views.start < 0 or views.stop > geometry.number_of_views:
        raise ValueError("views must be a contiguous range within the scan")
    volume = torch.as_tensor(mu_per_mm, dtype=torch.float32).to(device)
    if volume.ndim != 3:
        raise ValueError("mu_per_mm must be a 3D array")
    volume = volume.contiguous()
    nx, ny, nz = volume.shape
    flat = volume.reshape(-1)
    dx, dy, dz = (float(s) for s in spacing_mm)
    cx, cy, cz = (nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0
    if max_samples is None:
        max_samples = 1 << (24 if device.type == "cuda" else 21)

    def tensor(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype, device=device)

    betas = tensor(geometry.view_angles_rad()[views.start:views.stop])
    # actual source (flying focal spot included) and nominal focal centre, which carries the detector
    source = tensor(geometry.source_positions_mm(views))
    centre = tensor(geometry.focal_centre_positions_mm(views))
    gammas_np = geometry.fan_angles_rad()
    gammas = tensor(gammas_np)
    d_gamma = tensor(np.full_like(gammas_np, geometry.source_to_detector_mm) if geometry.detector_shape == "curved"
                     else geometry.source_to_detector_mm / np.cos(gammas_np))
    row_v = tensor(geometry.row_offsets_mm())
    n_views, n_rows, n_cols = len(views), geometry.detector_rows, geometry.detector_columns

    cb, sb = torch.cos(betas)[:, None], torch.sin(betas)[:, None]
    cg, sg = (d_gamma * torch.cos(gammas))[None, :], (d_gamma * torch.sin(gammas))[None, :]
    # element minus actual source, in plane (views, columns): D_gamma (cos g e_c + sin g e_l) + centre - source;
    # in z (views, rows): v + centre_z - source_z
    ux_vc = -cg * cb - sg * sb + (centre[:, 0] - source[:, 0])[:, None]
    uy_vc = -cg * sb + sg * cb + (centre[:, 1] - source[:, 1])[:, None]
    uz_vr = row_v[None, :] + (centre[:, 2] - source[:, 2])[:, None]
    x_dominant = (ux_vc.abs() >= uy_vc.abs())[:, None, :].expand(n_views, n_rows, n_cols).reshape(-1)
    out = torch.empty(n_views * n_rows * n_cols, dtype=dtype, device=device)

    for use_x in (True, False):
        rays = torch.nonzero(x_dominant if use_x else ~x_dominant).squeeze(1)
        if rays.numel() == 0:
            continue
        n_planes = nx if use_x else ny
        planes = torch.arange(n_planes, device=device)
        plane_coords = (planes.to(dtype) - (cx if use_x else cy)) * (dx if use_x else dy)
        chunk = max(1, max_samples // n_planes)
        for start in range(0, rays.numel(), chunk):
            r = rays[start:start + chunk]
            v = r // (n_rows * n_cols)
            row = (r // n_cols) % n_rows
            col = r % n_cols
            ux, uy = ux_vc[v, col][:, None], uy_vc[v, col][:, None]
            uz = uz_vr[v, row][:, None]
            sx, sy, sz = source[v, 0][:, None], source[v, 1][:, None], source[v, 2][:, None]
            length = torch.sqrt(ux[:, 0] ** 2 + uy[:, 0] ** 2 + uz[:, 0] ** 2)
            if use_x:
                s = (plane_coords[None, :] - sx) / ux
                fa = (sy + s * uy) / dy + cy
                fb = (sz + s * uz) / dz + cz
                samples = _bilinear(flat, planes[None, :], ny * nz, nz, fa, fb, ny, nz)
                step = dx * length / ux[:, 0].abs()
            else:
                s = (plane_coords[None, :] - sy) / uy
                fa = (sx + s * ux) / dx + cx
                fb = (sz + s * uz) / dz + cz
                samples = _bilinear(flat, planes[None, :], nz, ny * nz, fa, fb, nx, nz)
                step = dy * length / uy[:, 0].abs()
            out[r] = samples.sum(dim=1) * step
    return out.reshape(n_views, n_rows, n_cols)
