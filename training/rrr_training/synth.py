"""Synthetic contrasts of one scan (the SynthMorph idea): cross-contrast training pairs whose
alignment is exact, on any single-contrast scan (whole heads included).

Every function takes network-grid slices ``(B, H, W)`` and a ``torch.Generator``; each draws a
fixed number of random values per image whatever the pixels are, so re-seeding a generator and
calling again on a batch of the same size gives the same contrasts (the evaluation re-applies a
pair's contrast to its re-sampled moving slice after every pass). Nothing moves a pixel: the
intensity maps are point-wise, the tissue classes are iso-intensity regions of the input, and
blur, thick-slice averaging and the bias field are centred, so the anatomy (tissue boundaries)
stays where it was.

:func:`synthetic_contrast` chains the pieces: slice normalised to ``[0, 1]`` ->
a random smooth non-monotonic intensity curve (:func:`intensity_curve`, the map ``--remap`` also
uses, there piecewise linear), mixed with random intensities of quantile tissue classes of the
foreground (:func:`quantile_tissue_labels`) -> background dark or random -> blur ->
thick-slice simulation -> multiplicative smooth bias field -> noise -> normalised to ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from RigidResNetRegistrationLib.preprocess import normalise_slices

#: Normalised intensity (``[0, 1]`` from the slice's 1st/99th percentiles) at or below which a
#: pixel is background (air, or the outside of a skull-stripped brain): 10% of the range, as the
#: product's ``preprocess.foreground_threshold``.
BACKGROUND_LEVEL = 0.1

Interpolation = Literal["linear", "smooth"]


def random_curve_values(generator: torch.Generator, n: int, knots: int, low: float = 0.05) -> torch.Tensor:
    """``(n, knots)`` values of random intensity curves at evenly spaced knots, uniform in
    ``[low, 1]``: not monotone (with 6 or more knots almost never)."""
    return low + (1.0 - low) * torch.rand(n, knots, generator=generator)


def intensity_curve(v: torch.Tensor, values: torch.Tensor, interpolation: Interpolation = "linear") -> torch.Tensor:
    """Map ``[0, 1]`` images ``v`` ``(B, H, W)`` through per-image curves given by their values
    at evenly spaced knots ``values`` ``(B, K)``: ``linear`` interpolation (piecewise linear, the
    ``--remap`` map) or ``smooth`` (smoothstep between knots: continuous slope, no kinks)."""
    b, knots = values.shape
    pos = v.clamp(0, 1) * (knots - 1)
    lo = pos.floor().long().clamp(max=knots - 2)
    frac = pos - lo
    if interpolation == "smooth":
        frac = frac * frac * (3.0 - 2.0 * frac)
    a = values.gather(1, lo.reshape(b, -1)).view_as(v)  # the curve's values at the knots around each pixel
    c = values.gather(1, (lo + 1).reshape(b, -1)).view_as(v)
    return a + (c - a) * frac


def quantile_tissue_labels(v: torch.Tensor, classes: torch.Tensor, background: float = BACKGROUND_LEVEL) -> torch.Tensor:
    """A tissue estimate of ``[0, 1]`` images ``(B, H, W)``: label 0 is the background
    (``v <= background``), the foreground is split into ``classes[b]`` classes ``1..K`` of equal
    pixel count at its intensity quantiles (on T1, roughly CSF / grey / white matter / fat...;
    on any contrast, iso-intensity regions whose boundaries are the anatomy's)."""
    labels = torch.zeros(v.shape, dtype=torch.long)
    for i in range(v.shape[0]):
        fg = v[i] > background
        k = int(classes[i])
        if int(fg.sum()) < k:
            continue
        q = torch.linspace(0, 1, k + 1)[1:-1]
        edges = torch.quantile(v[i][fg].float(), q)
        labels[i] = torch.where(fg, 1 + torch.bucketize(v[i], edges), torch.zeros_like(labels[i]))
    return labels


def smooth_bias_field(generator: torch.Generator, n: int, size: tuple[int, int], strength: float, grid: int = 4) -> torch.Tensor:
    """``(n, H, W)`` random smooth multiplicative fields ``exp(s)``: ``s`` uniform in
    ``[-strength, strength]`` on a ``grid x grid`` lattice, interpolated bicubically."""
    coarse = (torch.rand(n, 1, grid, grid, generator=generator) * 2 - 1) * strength
    return torch.exp(F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)[:, 0])


def gaussian_blur(images: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Blur each image ``(B, H, W)`` with its own isotropic Gaussian of ``sigma_px[b]`` pixels
    (separable, reflected edges; sigma 0 leaves the image as it is)."""
    radius = max(1, int(torch.ceil(3 * sigma_px.max()).item()) if len(sigma_px) else 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma_px.float().clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (x[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 2r+1); sigma ~0: a delta
    b = images.shape[0]
    out = images[None].float()  # (1, B, H, W): one group per image
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(b, 1, 1, -1), groups=b)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(b, 1, -1, 1), groups=b)
    return out[0]


def thick_slice(images: torch.Tensor, factor: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Simulate a thick-slice acquisition seen in-plane: each image ``(B, H, W)`` averaged over
    blocks of ``factor[b]`` pixels along image ``axis[b]`` (0: rows, 1: columns) and interpolated
    back to its grid (a factor of 1 leaves it as it is).

    Geometry (pixel indices along the axis): block ``m`` covers pixels ``m k .. m k + k - 1`` (the
    last block padded by repeating the edge pixel) and its mean sits at its centre ``m k + (k - 1) / 2``;
    pixel ``i`` is read linearly between the block centres at ``(i - (k - 1) / 2) / k`` blocks
    (``F.interpolate``'s ``align_corners=False`` map for an output ``k`` times the block count), clamped
    at the first and last centre. A linear ramp therefore comes back unchanged between the first and the
    last block centre: nothing moves (a resampling with ``align_corners=True`` from the block starts
    shifted the anatomy by up to 3 pixels and scaled it by up to 2.4%, so the "exact" truth of a
    synthetic pair was off by up to 4 mm until 2026-12-03)."""
    out = images.clone()
    for i in range(images.shape[0]):
        k = int(factor[i])
        if k <= 1:
            continue
        img = images[i] if int(axis[i]) == 1 else images[i].T
        length = img.shape[-1]
        blocks = -(-length // k)
        line = F.pad(img[None], (0, blocks * k - length), mode="replicate")  # (1, rows, blocks * k)
        means = F.avg_pool1d(line, k, stride=k)  # (1, rows, blocks): block m's mean at pixel m k + (k - 1) / 2
        back = F.interpolate(means, size=blocks * k, mode="linear", align_corners=False)[..., :length]
        out[i] = back[0] if int(axis[i]) == 1 else back[0].T
    return out


@dataclass(frozen=True)
class SynthOptions:
    """Ranges of the synthetic contrasts (each image draws its own values in them)."""

    knots: int = 8  #: knots of the smooth intensity curve
    min_classes: int = 3  #: tissue classes of the foreground, from
    max_classes: int = 6  #: ... to
    tissue_share: float = 0.7  #: probability that an image mixes in random tissue-class intensities
    random_background: float = 0.25  #: probability that the background gets a random intensity (else dark, <= 0.1)
    max_blur_px: float = 1.0  #: Gaussian blur sigma, uniform in [0, this] pixels
    thick_slice: float = 0.3  #: probability of a thick-slice simulation
    max_thickness: int = 5  #: its block size, 2 .. this pixels, along a random image axis
    bias: float = 0.4  #: log-amplitude of the smooth bias field, uniform in [0, this]
    max_noise: float = 0.04  #: Gaussian noise sd, uniform in [0, this] (of the [0, 1] range)

    def validate(self) -> None:
        if not (isinstance(self.knots, int) and self.knots >= 3):
            raise ValueError(f"knots must be an integer of at least 3, not {self.knots!r}")
        if not (isinstance(self.min_classes, int) and 2 <= self.min_classes <= self.max_classes <= 16):
            raise ValueError(f"tissue classes must satisfy 2 <= min <= max <= 16, not {self.min_classes}..{self.max_classes}")
        if not (isinstance(self.max_thickness, int) and self.max_thickness >= 2):
            raise ValueError(f"max_thickness must be an integer of at least 2, not {self.max_thickness!r}")
        for name in ("tissue_share", "random_background", "thick_slice"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)!r}")
        for name in ("max_blur_px", "bias", "max_noise"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise ValueError(f"{name} must be in [0, 10], not {getattr(self, name)!r}")


#: The default ranges (what ``--synth`` uses).
DEFAULT_SYNTH = SynthOptions()


def synthetic_contrast(images: torch.Tensor, generator: torch.Generator, options: SynthOptions = DEFAULT_SYNTH) -> torch.Tensor:
    """A new random contrast of each image ``(B, H, W)`` (any intensity units), in ``[0, 1]``:
    the geometry is kept, the intensities are not (see the module docstring). The input is not
    modified; the random values drawn do not depend on the pixels."""
    b, h, w = images.shape
    o = options
    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    # every random value of the batch, drawn up front (a count fixed by b, h, w and the options)
    curve = random_curve_values(generator, b, o.knots, low=0.0)
    classes = torch.randint(o.min_classes, o.max_classes + 1, (b,), generator=generator)
    class_values = u(b, o.max_classes + 1)
    tissue_weight = torch.where(u(b) < o.tissue_share, u(b), torch.zeros(b))  # share of the class image
    random_bg = u(b) < o.random_background
    bg_value = torch.where(random_bg, u(b), BACKGROUND_LEVEL * u(b))
    blur = u(b) * o.max_blur_px
    thick = torch.where(u(b) < o.thick_slice, torch.randint(2, o.max_thickness + 1, (b,), generator=generator), torch.ones(b, dtype=torch.long))
    thick_axis = torch.randint(0, 2, (b,), generator=generator)
    bias = smooth_bias_field(generator, b, (h, w), 1.0) ** (u(b, 1, 1) * o.bias)  # exp(s * amplitude)
    noise_sd = u(b, 1, 1) * o.max_noise
    noise = torch.randn(b, h, w, generator=generator)

    v = normalise_slices(images)
    labels = quantile_tissue_labels(v, classes)
    fg = labels > 0
    mapped = intensity_curve(v, curve, "smooth")
    tissue = class_values.gather(1, labels.reshape(b, -1)).view_as(v)
    mix = tissue_weight[:, None, None]
    out = torch.where(fg, (1 - mix) * mapped + mix * tissue, bg_value[:, None, None].expand_as(v))
    out = gaussian_blur(out, blur)
    out = thick_slice(out, thick, thick_axis)
    out = out * bias + noise * noise_sd
    return normalise_slices(out)


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``(B, H-2, W-2)`` central-difference gradient magnitude of images ``(B, H, W)``: where the
    tissue boundaries are, whatever the contrast (used to check that geometry is kept)."""
    gx = images[:, 1:-1, 2:] - images[:, 1:-1, :-2]
    gy = images[:, 2:, 1:-1] - images[:, :-2, 1:-1]
    return torch.sqrt(gx * gx + gy * gy)
