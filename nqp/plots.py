"""PNG figures (matplotlib, Agg backend) for curves and sweeps."""
from __future__ import annotations

import os

import numpy as np

LABELS = {
    "sgd": "SGD",
    "sgd_batch_K": "SGD, K-times batch (from T0)",
    "ensemble_K": "ensemble of K SGD runs",
    "latephase_mean": "late-phase, mean model",
    "latephase_members": "late-phase, members (avg)",
    "latephase_swa": "late-phase mean, tail-averaged",
    "sgd_swa": "SGD, tail-averaged",
}
COLORS = {
    "sgd": "tab:gray", "sgd_batch_K": "tab:olive", "ensemble_K": "tab:purple",
    "latephase_mean": "tab:blue", "latephase_members": "tab:orange", "latephase_swa": "tab:green",
    "sgd_swa": "tab:brown",
}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str, outputs=None) -> str:
    """Write a figure as PNG and close it: staged in `outputs` (a :class:`nqp.files.Outputs`, renamed into place with
    the rest of its set), or on its own, atomically (a temporary file beside `path`, renamed)."""
    from .files import Outputs

    path = os.fspath(path)
    try:
        if outputs is not None:
            outputs.write_figure(path, fig, dpi=130, bbox_inches="tight", metadata={"Software": None})
        else:
            with Outputs() as out:
                out.write_figure(path, fig, dpi=130, bbox_inches="tight", metadata={"Software": None})
    finally:
        _plt().close(fig)
    return path


def plot_curve(curve, path: str, mc=None, title: str | None = None, logy: bool = True, outputs=None) -> str:
    """Analytic lines for every series of `curve`; Monte Carlo points with 2-sigma bars from `mc`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name, y in curve.series.items():
        ax.plot(curve.t, y, color=COLORS.get(name), label=LABELS.get(name, name), lw=1.6)
        if mc is not None and name in mc.series:
            ok = ~np.isnan(mc.series[name])
            ax.errorbar(mc.t[ok], mc.series[name][ok], yerr=2 * mc.stderr[name][ok], fmt="o", ms=2.5,
                        color=COLORS.get(name), alpha=0.75, elinewidth=0.8, capsize=0)
    ax.axvline(curve.T0, color="k", ls=":", lw=1)
    ax.text(curve.T0, ax.get_ylim()[1], " T0", va="top", fontsize=8)
    if logy and any(np.any(np.asarray(y) > 0) for y in curve.series.values()):  # all zero (no noise): linear axis
        ax.set_yscale("log")
    ax.set_xlabel("t (minibatches)")
    ax.set_ylabel("expected excess loss")
    simulated = [LABELS.get(n, n).split(",")[0] + ("" if "," not in LABELS.get(n, n) else
                                                   "," + LABELS.get(n, n).split(",", 1)[1].split("(")[0].rstrip())
                 for n in curve.series if mc is not None and n in mc.series]
    ax.set_title(title or f"learning curve (K={curve.K})" + (
        f"\npoints (simulation, ±2 s.e.): {'; '.join(simulated)}" if simulated else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path, outputs)


def plot_heatmap(x_name, x_vals, y_name, y_vals, z, path: str, title: str, cbar: str, log: bool = True,
                 center_one: bool = True, outputs=None) -> str:
    """A (y, x) grid of values; NaN cells (unstable) in gray, and with center_one a black contour where the value is 1
    (no gain: white in the diverging colour map)."""
    plt = _plt()
    from matplotlib.colors import LogNorm, TwoSlopeNorm
    from matplotlib.patches import Patch
    fig, ax = plt.subplots(figsize=(7, 4.8))
    zz = np.ma.masked_invalid(z)
    norm = None
    one = None
    if log and np.all(zz.compressed() > 0) and zz.count():
        lo, hi = float(zz.min()), float(zz.max())
        if center_one and lo < hi:
            # 1 (no gain) stays white even when every value lies on one side of it: red below 1, blue above
            llo, lhi = np.log10(lo), np.log10(hi)
            span = max(abs(llo), abs(lhi))
            norm = TwoSlopeNorm(vcenter=0.0, vmin=min(llo, -1e-3 * span), vmax=max(lhi, 1e-3 * span))
            zz = np.ma.log10(zz)
            cbar = f"log10 {cbar}"
            one = 0.0 if lo < 1 < hi else None
        else:
            norm = LogNorm(vmin=lo, vmax=hi)
    cmap = plt.get_cmap("RdBu" if center_one else "viridis").with_extremes(bad="0.55")
    mesh = ax.pcolormesh(_edges(x_vals), _edges(y_vals), zz, cmap=cmap, norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax, label=cbar)
    handles = []
    if one is not None and len(x_vals) > 1 and len(y_vals) > 1:
        ax.contour(x_vals, y_vals, zz.filled(np.nan), levels=[one], colors="k", linewidths=1)
        handles.append(plt.Line2D([], [], color="k", lw=1, label="value 1"))
    if np.ma.count_masked(zz):
        handles.append(Patch(color="0.55", label="unstable"))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    if _is_log(x_vals):
        ax.set_xscale("log")
    if _is_log(y_vals):
        ax.set_yscale("log")
    ax.set_title(title)
    return save(fig, path, outputs)


def plot_lines(x_name, x_vals, y_name, y_vals, series: dict, path: str, title: str, mc: dict | None = None,
               ylabel: str = "expected excess loss", hline: float | None = None, outputs=None) -> str:
    """One line per y value for each named series ({name: (len(y), len(x)) array}); the y value is the line's colour
    (a colorbar), the series its line style (the legend)."""
    plt = _plt()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    y_arr = np.asarray(y_vals, float)
    lo, hi = float(y_arr.min()), float(y_arr.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    norm = LogNorm(lo, hi) if _is_log(y_arr) else Normalize(lo, hi)
    for j, yv in enumerate(y_vals):
        col = cmap(norm(yv))
        for s, (name, arr) in enumerate(series.items()):
            ax.plot(x_vals, arr[j], ls=styles[s % 4], color=col, label=name if j == 0 else None)
            if mc and name in mc:
                m, e = mc[name]
                ax.errorbar(x_vals, m[j], yerr=2 * e[j], fmt="o", ms=3, color=col, elinewidth=0.8)
    if hline is not None:
        ax.axhline(hline, color="k", ls=":", lw=1, label="SGD")
    ax.set_xlabel(x_name)
    ax.set_ylabel(ylabel)
    if _is_log(x_vals):
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=y_name)
    ax.grid(alpha=0.3)
    return save(fig, path, outputs)


def _is_log(v) -> bool:
    v = np.asarray(v, float)
    if len(v) < 3 or np.any(v <= 0):
        return False
    r = v[1:] / v[:-1]
    return bool(np.allclose(r, r[0], rtol=1e-6) and not np.allclose(np.diff(v), np.diff(v)[0], rtol=1e-6))


def _edges(v):
    v = np.asarray(v, float)
    if len(v) == 1:
        return np.array([v[0] * 0.9, v[0] * 1.1]) if v[0] else np.array([-0.5, 0.5])
    if _is_log(v):
        lv = np.log(v)
        mid = (lv[1:] + lv[:-1]) / 2
        return np.exp(np.concatenate([[2 * lv[0] - mid[0]], mid, [2 * lv[-1] - mid[-1]]]))
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])
