"""The published CryoSieve 1.3.3 scoring (``--projector realspace --reference_weighting none``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_score import make_batch

from cryosieve.published import published_scores


def test_published_scorer_by_hand():
    """One voxel, a 90 degree in-plane turn, unit CTF, an integer origin: derived on paper.

    The published projector rotates voxel (x, y, z) relative to the centre n/2 by the
    pose; rot = 90 degrees maps (1, 0, 0) to (0, -1, 0), i.e. pixel (x, y) = (4, 3) in a
    box of 8. Amplitude contrast 1 with zero defocus and Cs gives CTF = cos(0) = 1; a
    zero cut-off keeps every frequency; T shifts the image by +origin (numpy roll).
    """
    box = 8
    volume = torch.zeros((box, box, box), dtype=torch.float64)
    volume[4, 4, 5] = 2.0  # [z, y, x]: x = +1 from the centre
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, box, box)))
    batch = make_batch(1, np.random.default_rng(2), 1.0, math.inf, rot=np.array([90.0]), tilt=np.array([0.0]),
                       psi=np.array([0.0]), origin_x=np.array([1.0]), origin_y=np.array([-2.0]),
                       defocus_u=np.array([0.0]), defocus_v=np.array([0.0]), defocus_angle=np.array([0.0]),
                       phase_shift=np.array([0.0]), spherical_aberration=np.array([0.0]),
                       amplitude_contrast=np.array([1.0]))
    projection = np.zeros((box, box))
    projection[3, 4] = 2.0  # [y, x]
    shifted = np.roll(image[0].numpy(), shift=(-2, 1), axis=(0, 1))
    expected = ((projection - shifted) ** 2).sum() - (shifted**2).sum()
    assert published_scores(volume, image, batch).item() == pytest.approx(expected, rel=1e-12, abs=1e-10)

    # A fractional turn splats bilinearly: rot = 30 degrees sends (2, 0, 0) to (2 cos 30, -2 sin 30).
    volume = torch.zeros((box, box, box), dtype=torch.float64)
    volume[4, 4, 6] = 1.0
    batch = make_batch(1, np.random.default_rng(2), 1.0, math.inf, rot=np.array([30.0]), tilt=np.array([0.0]),
                       psi=np.array([0.0]), origin_x=np.array([0.0]), origin_y=np.array([0.0]),
                       defocus_u=np.array([0.0]), defocus_v=np.array([0.0]), defocus_angle=np.array([0.0]),
                       phase_shift=np.array([0.0]), spherical_aberration=np.array([0.0]),
                       amplitude_contrast=np.array([1.0]))
    x = 4 + 2 * math.cos(math.radians(30))
    fraction = x - math.floor(x)
    projection = np.zeros((box, box))
    projection[3, math.floor(x)] = 1 - fraction
    projection[3, math.floor(x) + 1] = fraction
    expected = ((projection - image[0].numpy()) ** 2).sum() - (image[0].numpy() ** 2).sum()
    assert published_scores(volume, image, batch).item() == pytest.approx(expected, rel=1e-12, abs=1e-10)


def test_published_scorer_highpass_and_ctf_against_numpy():
    """The published CTF and high-pass kernels, re-derived with numpy full FFTs."""
    rng = np.random.default_rng(8)
    box = 16
    volume = torch.zeros((box, box, box), dtype=torch.float64)
    volume[8, 8, 8] = 1.0  # a centred point projects onto pixel (8, 8) for any pose
    images = torch.from_numpy(rng.normal(size=(3, box, box)))
    batch = make_batch(3, rng, 1.5, 6.0, origin_x=np.zeros(3), origin_y=np.zeros(3))
    scores = published_scores(volume, images, batch).numpy()
    # The published kernels act on the rfft half-plane (x = 0 .. n/2, y wrapped to [-n/2, n/2)).
    fy, fx = np.meshgrid(np.fft.fftfreq(box), np.fft.rfftfreq(box), indexing="ij")
    for i in range(3):
        pixel = batch.pixel_size[i].item()
        frequency = np.hypot(fx, fy) / pixel
        alpha = np.arctan2(fy, fx) - math.radians(batch.defocus_angle[i].item())
        du, dv = batch.defocus_u[i].item(), batch.defocus_v[i].item()
        defocus = -(du + dv + (du - dv) * np.cos(2 * alpha)) / 2
        volts = 300e3
        wavelength = 12.2643247 / math.sqrt(volts * (1 + volts * 0.978466e-6))
        chi = (math.pi * wavelength * defocus * frequency**2 + math.pi / 2 * 2.7e7 * wavelength**3 * frequency**4
               - math.radians(batch.phase_shift[i].item()))
        ctf = -math.sqrt(1 - 0.01) * np.sin(chi) + 0.1 * np.cos(chi)
        point = np.zeros((box, box))
        point[8, 8] = 1.0
        model = np.fft.irfft2(np.fft.rfft2(point) * ctf, s=(box, box))
        keep = np.hypot(fx, fy) >= pixel / 6.0
        difference = np.fft.irfft2(np.fft.rfft2(model - images[i].numpy()) * keep, s=(box, box))
        image = np.fft.irfft2(np.fft.rfft2(images[i].numpy()) * keep, s=(box, box))
        expected = (difference**2).sum() - (image**2).sum()
        assert scores[i] == pytest.approx(expected, rel=1e-9)
