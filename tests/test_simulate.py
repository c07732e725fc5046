"""The known-truth simulator (``cryosieve.simulate``, ``cryosieve-simulate``).

Checked against exact identities (the model's scattering mass, its centre of mass, the
B-factor envelope, the junk count, determinism), against RELION's own
``relion_project --ctf`` (same map, same STAR file), and, for the half maps, against the
ground-truth map.
"""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryosieve.cli.simulate import main as simulate_main
from cryosieve.errors import CryoSieveInputError
from cryosieve.fsc import fourier_shell_correlation
from cryosieve.io.mrc import read_volume
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.projection import FourierSliceProjector
from cryosieve.simulate import (
    ImageFormation,
    ParticleParameters,
    SimulationSettings,
    _read_model,
    atomic_model_map,
    bundled_model,
    simulate_particles,
    soft_mask,
)

BOX, PIXEL = 64, 2.5


def relion_project(folder: Path, volume: str, star: str, output: str, pixel: float) -> np.ndarray:
    program = shutil.which("relion_project")
    assert program, "relion_project not found: install RELION (apt-get install relion)"
    subprocess.run([program, "--i", volume, "--o", output, "--ang", star, "--ctf", "--angpix", str(pixel)],
                   cwd=folder, check=True, capture_output=True)
    return mrcfile.read(folder / f"{output}.mrcs").astype(np.float64)


def ring_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two image sets, pooled over images, shells 1 .. n/2 - 1."""
    box = first.shape[-1]
    a, b = np.fft.rfft2(first), np.fft.rfft2(second)
    ky = np.fft.fftfreq(box, 1 / box)[:, None]
    kx = np.fft.rfftfreq(box, 1 / box)[None, :]
    shell = np.round(np.sqrt(kx**2 + ky**2)).astype(int)
    values = []
    for index in range(1, box // 2):
        ring = shell == index
        cross = (a[:, ring] * b[:, ring].conj()).real.sum()
        values.append(cross / np.sqrt((np.abs(a[:, ring]) ** 2).sum() * (np.abs(b[:, ring]) ** 2).sum()))
    return np.array(values)


def image_correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(first, second, strict=True)])


def noiseless(**changes: object) -> SimulationSettings:
    values: dict[str, object] = {"num_particles": 120, "box": BOX, "pixel_size": PIXEL, "snr": math.inf,
                                 "half_maps": False, "seed": 3}
    values.update(changes)
    return SimulationSettings(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize("model", ["1BD2.pdb.gz", "4E43.pdb.gz"])
def test_map_is_centred_and_holds_the_model_scattering(model: str) -> None:
    box, voxel = 64, 2.0
    volume = atomic_model_map(bundled_model(model), box, voxel)
    assert volume.shape == (box, box, box) and volume.dtype == np.float32
    volume = volume.astype(np.float64)
    total = volume.sum()
    z, y, x = np.indices(volume.shape)
    centroid = [(axis * volume).sum() / total for axis in (x, y, z)]
    # The map's centroid is the model's centre of mass (masses vs. scattering weights
    # differ slightly): within 0.1 voxel of voxel box // 2.
    assert np.allclose(centroid, box // 2, atol=0.1), centroid
    # Integral of the density = sum over atoms of the electron form factor at s = 0
    # (the a-coefficients of the International Tables 4.3.2.2 Gaussians): no atom lost,
    # no density wrapped or aliased away.
    structure = _read_model(bundled_model(model))
    expected = sum(atom.occ * sum(atom.element.c4322.get_coefs()[:5])
                   for chain in structure[0] for residue in chain for atom in residue)
    assert total * voxel**3 == pytest.approx(expected, rel=2e-3)


def test_map_orientation_follows_the_model(tmp_path: Path) -> None:
    """[z, y, x] order: the long axis of an elongated test model lies along x."""
    structure = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for index, x in enumerate(np.arange(-20.0, 20.5, 1.5)):
        residue = gemmi.Residue()
        residue.name, residue.seqid = "ALA", gemmi.SeqId(index + 1, " ")
        residue.entity_type = gemmi.EntityType.Polymer
        atom = gemmi.Atom()
        atom.name, atom.element, atom.pos, atom.occ, atom.b_iso = "CA", gemmi.Element("C"), \
            gemmi.Position(10.0 + x, 5.0, -3.0), 1.0, 20.0
        residue.add_atom(atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    path = tmp_path / "rod.pdb"
    structure.write_pdb(str(path))
    volume = atomic_model_map(str(path), 32, 2.0)
    profile_x = volume.sum(axis=(0, 1))
    profile_z = volume.sum(axis=(1, 2))
    width_x = (profile_x > 0.1 * profile_x.max()).sum()
    width_z = (profile_z > 0.1 * profile_z.max()).sum()
    assert width_x >= 18 and width_z <= 5, (width_x, width_z)


def test_mmcif_gives_the_same_map_and_oversized_models_are_refused(tmp_path: Path) -> None:
    structure = gemmi.read_structure(bundled_model("4E43.pdb.gz"))
    cif = tmp_path / "model.cif"
    structure.make_mmcif_document().write_file(str(cif))
    from_pdb = atomic_model_map(bundled_model("4E43.pdb.gz"), 48, 2.0)
    from_cif = atomic_model_map(str(cif), 48, 2.0)
    assert np.allclose(from_pdb, from_cif, atol=1e-5 * np.abs(from_pdb).max())
    assert atomic_model_map(None, 64, 2.0).shape == (64, 64, 64)  # bundled 1BD2
    with pytest.raises(CryoSieveInputError, match="does not fit"):
        atomic_model_map(None, 48, 2.0)  # 1BD2 reaches 60.6 Å from its centre
    with pytest.raises(CryoSieveInputError, match="not found"):
        atomic_model_map(str(tmp_path / "missing.pdb"), 48, 2.0)
    garbage = tmp_path / "garbage.pdb"
    garbage.write_text("not a model\n")
    with pytest.raises(CryoSieveInputError):
        atomic_model_map(str(garbage), 48, 2.0)


def test_low_pass_resolution_removes_high_frequencies() -> None:
    sharp = atomic_model_map(bundled_model("4E43.pdb.gz"), 48, 2.0)
    soft = atomic_model_map(bundled_model("4E43.pdb.gz"), 48, 2.0, resolution=8.0)
    spectrum_sharp, spectrum_soft = np.fft.rfftn(sharp), np.fft.rfftn(soft)
    k = np.fft.fftfreq(48, 1 / 48)
    kx = np.fft.rfftfreq(48, 1 / 48)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    cutoff = 48 * 2.0 / 8.0  # 12 cycles per box
    assert np.abs(spectrum_soft[radius >= cutoff]).max() < 1e-6 * np.abs(spectrum_sharp).max()
    inner = radius <= cutoff - 1
    assert np.allclose(spectrum_soft[inner], spectrum_sharp[inner], rtol=1e-4, atol=1e-4 * np.abs(spectrum_sharp).max())


# ----------------------------------------------------------------------------- mask


def test_soft_mask_covers_the_map_with_a_raised_cosine_edge() -> None:
    volume = atomic_model_map(None, BOX, PIXEL)
    mask = soft_mask(volume, PIXEL)
    assert mask.dtype == np.float32 and mask.shape == volume.shape
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask[BOX // 2, BOX // 2, BOX // 2] == 1.0 and mask[0, 0, 0] == 0.0
    assert (volume.astype(np.float64) ** 2 * mask).sum() / (volume.astype(np.float64) ** 2).sum() > 0.99

    # A ball of radius 10 voxels: along the x axis the distance to the ball is exact.
    axis = np.arange(48) - 24
    radius = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    ball = (radius <= 10).astype(np.float32)
    voxel, extend, edge = 2.0, 4.0, 8.0  # 2 and 4 voxels
    mask = soft_mask(ball, voxel, threshold=0.5, extend_angstrom=extend, soft_edge_angstrom=edge,
                     lowpass_angstrom=1e-3)
    profile = mask[24, 24, 24:]
    distance = np.clip(np.arange(24) - 10, 0, None).astype(float)  # voxels outside the ball
    ramp = np.clip((distance - extend / voxel) / (edge / voxel), 0, 1)
    assert np.allclose(profile, 0.5 + 0.5 * np.cos(np.pi * ramp), atol=1e-6)


# ----------------------------------------------------------------------------- images


def test_noiseless_images_equal_relion_project(tmp_path: Path) -> None:
    """B = 0, no noise: the stack equals relion_project --ctf of truth.mrc with particles.star."""
    settings = noiseless(junk_fraction=0.0, bfactor_min=0.0, bfactor_max=0.0, defocus_min=5000.0,
                         defocus_max=25000.0, astigmatism=2000.0, max_origin=6.0)
    result = simulate_particles(tmp_path / "sim", settings)
    ours = mrcfile.read(result.stack).astype(np.float64)
    theirs = relion_project(result.folder, "truth.mrc", "particles.star", "relion", PIXEL)
    correlation = ring_correlation(ours, theirs)
    up_to = int(0.8 * BOX / 2)  # 0.8 x Nyquist
    assert correlation[:up_to].min() >= 0.999, correlation
    assert image_correlations(ours, theirs).min() >= 0.99
    scale = (ours * theirs).sum() / (theirs * theirs).sum()
    assert scale == pytest.approx(1.0, abs=0.02)


def test_envelope_and_junk_images_equal_relion_project(tmp_path: Path) -> None:
    """Per-particle B-factors and junk: RELION, given the truth's rlnCtfBfactor, makes the same images."""
    settings = noiseless(junk_fraction=0.25, bfactor_min=0.0, bfactor_max=400.0, phase_shift=20.0)
    result = simulate_particles(tmp_path / "sim", settings)
    folder = result.folder
    ours = mrcfile.read(result.stack).astype(np.float64)
    truth = pd.read_csv(result.truth_csv)
    blocks = starfile.read(result.star, always_dict=True)
    particles = blocks["particles"]
    assert "rlnCtfBfactor" not in particles.columns  # the quality is truth only
    assert (particles["rlnImageName"] == truth["rlnImageName"]).all()
    is_junk = truth["is_junk"].to_numpy(dtype=bool)
    for name, volume, members in (("good", "truth.mrc", ~is_junk), ("junk", "junk.mrc", is_junk)):
        table = particles[members].reset_index(drop=True).assign(rlnCtfBfactor=truth["bfactor"][members].values)
        starfile.write({"optics": blocks["optics"], "particles": table}, folder / f"{name}.star",
                       float_format="%.6f")
        theirs = relion_project(folder, volume, f"{name}.star", f"relion_{name}", PIXEL)
        correlation = ring_correlation(ours[members], theirs)
        assert correlation[: int(0.8 * BOX / 2)].min() >= 0.999, (name, correlation)
        assert image_correlations(ours[members], theirs).min() >= 0.99, name
    # A junk image is not a projection of the main model.
    junk_star = particles[is_junk].reset_index(drop=True)
    starfile.write({"optics": blocks["optics"], "particles": junk_star}, folder / "cross.star", float_format="%.6f")
    crossed = relion_project(folder, "truth.mrc", "cross.star", "relion_cross", PIXEL)
    truth_b0 = ring_correlation(ours[is_junk], crossed)
    assert np.abs(truth_b0[4:]).max() < 0.3


def test_bfactor_envelope_per_shell() -> None:
    """Same particle, B and B + 200 Å^2: the power ratio per shell is exp(-200 s^2 / 2)."""
    settings = noiseless()
    volume = atomic_model_map(None, BOX, PIXEL)
    projector = FourierSliceProjector(torch.as_tensor(volume, dtype=torch.float32))
    formation = ImageFormation(BOX, PIXEL)
    count = 6
    rng = np.random.default_rng(1)
    one = np.ones(count)
    parameters = ParticleParameters(
        rot=rng.uniform(-180, 180, count).repeat(2), tilt=rng.uniform(0, 180, count).repeat(2),
        psi=rng.uniform(-180, 180, count).repeat(2), origin_x=np.repeat(rng.uniform(-3, 3, count), 2),
        origin_y=np.repeat(rng.uniform(-3, 3, count), 2), defocus_u=(12000 * one).repeat(2),
        defocus_v=(11500 * one).repeat(2), defocus_angle=(30 * one).repeat(2),
        bfactor=np.tile([50.0, 250.0], count), is_junk=np.zeros(2 * count, dtype=bool),
        random_subset=np.ones(2 * count, dtype=np.int64),
    )
    images = formation.render(projector, parameters, np.arange(2 * count), settings).numpy().astype(np.float64)
    sharp, blurred = np.fft.rfft2(images[0::2]), np.fft.rfft2(images[1::2])
    ky = np.fft.fftfreq(BOX, 1 / BOX)[:, None]
    kx = np.fft.rfftfreq(BOX, 1 / BOX)[None, :]
    shell = np.round(np.sqrt(kx**2 + ky**2)).astype(int)
    for index in range(1, BOX // 2 - 1):
        ring = (shell == index) & (np.sqrt(kx**2 + ky**2) < BOX / 2)
        measured = (np.abs(blurred[:, ring]) ** 2).sum() / (np.abs(sharp[:, ring]) ** 2).sum()
        s2 = (np.sqrt(kx**2 + ky**2)[np.broadcast_to(ring, sharp.shape[1:])] / (BOX * PIXEL)) ** 2
        weights = (np.abs(sharp[:, ring]) ** 2).sum(axis=0)
        expected = (weights * np.exp(-200.0 * s2 / 2)).sum() / weights.sum()
        assert measured == pytest.approx(expected, rel=1e-3), index


def test_snr_is_as_requested_and_noise_is_white(tmp_path: Path) -> None:
    snr = 0.05
    noisy = simulate_particles(tmp_path / "noisy", noiseless(snr=snr, num_particles=300, junk_fraction=0.2))
    clean = simulate_particles(tmp_path / "clean", noiseless(num_particles=300, junk_fraction=0.2))
    assert noisy.star.read_text().split("\n")[2:] == clean.star.read_text().split("\n")[2:]
    signal = mrcfile.read(clean.stack).astype(np.float64)
    noise = mrcfile.read(noisy.stack).astype(np.float64) - signal
    is_junk = pd.read_csv(noisy.truth_csv)["is_junk"].to_numpy(dtype=bool)
    measured = signal[~is_junk].var() / noise.var()
    assert measured == pytest.approx(snr, rel=0.1)
    assert abs(noise.mean()) < 0.01 * noise.std()
    power = np.abs(np.fft.rfft2(noise)) ** 2
    ky = np.fft.fftfreq(BOX, 1 / BOX)[:, None]
    kx = np.fft.rfftfreq(BOX, 1 / BOX)[None, :]
    shell = np.round(np.sqrt(kx**2 + ky**2)).astype(int)
    profile = np.array([power[:, shell == index].mean() for index in range(1, BOX // 2)])
    assert np.allclose(profile / profile.mean(), 1.0, atol=0.1)
    with mrcfile.open(noisy.stack, permissive=True) as handle:  # header statistics of the whole stack
        data = handle.data.astype(np.float64)
        assert handle.header.rms == pytest.approx(data.std(), rel=1e-4)
        assert handle.header.dmean == pytest.approx(data.mean(), abs=1e-4 * data.std())
        assert handle.is_image_stack() and handle.voxel_size.x == pytest.approx(PIXEL)


def test_junk_fraction_and_half_sets_are_exact(tmp_path: Path) -> None:
    result = simulate_particles(tmp_path / "sim", noiseless(num_particles=301, junk_fraction=0.13, snr=0.1))
    truth = pd.read_csv(result.truth_csv)
    assert truth["is_junk"].dtype == bool
    assert int(truth["is_junk"].sum()) == round(0.13 * 301) == result.junk_count
    table = read_particles(result.star)
    assert table.source.version == "3.1" and len(table) == 301
    assert sorted(np.bincount(table.random_subset)[1:].tolist()) == [150, 151]
    assert StackReader(table, result.folder).validate() == BOX
    assert np.allclose(table.pixel_size, PIXEL) and np.all(table.image_size == BOX)
    assert np.allclose(table.origin_x * PIXEL, truth["origin_x_angst"])
    assert np.allclose(table.rot, truth["rot"]) and np.allclose(table.defocus_u, truth["defocus_u"])
    assert (truth["bfactor"].between(0.0, 300.0)).all()
    assert (table.defocus_v <= table.defocus_u).all()


def test_same_seed_same_files_any_batch_size(tmp_path: Path) -> None:
    settings = noiseless(num_particles=150, snr=0.05, half_maps=True)
    first = simulate_particles(tmp_path / "a", settings)
    second = simulate_particles(tmp_path / "b", SimulationSettings(**{**settings.__dict__, "batch_size": 37}))
    names = ["particles.star", "particles.mrcs", "truth.csv", "truth.mrc", "junk.mrc", "mask.mrc",
             "half1.mrc", "half2.mrc"]
    for name in names:
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name
    other = simulate_particles(tmp_path / "c", SimulationSettings(**{**settings.__dict__, "seed": 4,
                                                                      "half_maps": False}))
    assert (first.folder / "particles.mrcs").read_bytes() != (other.folder / "particles.mrcs").read_bytes()
    for name in ("particles.mrcs", "truth.mrc", "mask.mrc", "half1.mrc"):  # a fixed label, no time stamp
        with mrcfile.open(first.folder / name, permissive=True, header_only=True) as handle:
            assert int(handle.header.nlabl) == 1 and handle.header.label[0] == b"cryosieve-simulate", name


def test_the_simulator_writes_only_through_cryosieve_io() -> None:
    """No module of ``cryosieve.simulate`` opens a file for writing itself."""
    package = Path(simulate_particles.__code__.co_filename).parent
    modules = sorted(package.glob("*.py"))
    assert {path.name for path in modules} >= {"__init__.py", "dataset.py", "images.py", "models.py"}
    forbidden = ("open(", ".write_text(", ".write_bytes(", ".to_csv(", "mrcfile.", "starfile.", ".tofile(",
                 "np.save")
    for path in modules:
        text = path.read_text()
        assert not [word for word in forbidden if word in text], path.name


# ----------------------------------------------------------------------------- command line


def test_cli_writes_a_data_set_whose_half_maps_match_the_truth(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert simulate_main(["--o", str(out), "--num_particles", "1000", "--seed", "5", "--quiet"]) == 0
    names = {path.name for path in out.iterdir()}
    assert names == {"particles.star", "particles.mrcs", "truth.csv", "truth.mrc", "junk.mrc", "mask.mrc",
                     "half1.mrc", "half2.mrc"}
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporaries left
    truth = read_volume(out / "truth.mrc")
    assert truth.voxel_size == pytest.approx(PIXEL)
    shell = round(BOX * PIXEL / 20.0)  # 20 Å
    for half in ("half1.mrc", "half2.mrc"):
        volume = read_volume(out / half)
        fsc = fourier_shell_correlation(torch.as_tensor(volume.data), torch.as_tensor(truth.data)).numpy()
        assert fsc[1: shell + 1].min() > 0.8, (half, fsc[: shell + 1])
    # --force replaces the folder; without it the folder is kept as it was.
    before = (out / "particles.mrcs").read_bytes()
    assert simulate_main(["--o", str(out), "--num_particles", "20", "--quiet", "--no_half_maps"]) == 2
    assert (out / "particles.mrcs").read_bytes() == before
    assert simulate_main(["--o", str(out), "--num_particles", "20", "--quiet", "--no_half_maps",
                          "--force"]) == 0
    assert {path.name for path in out.iterdir()} == names - {"half1.mrc", "half2.mrc"}
    assert len(read_particles(out / "particles.star")) == 20


@pytest.mark.parametrize("arguments, message", [
    (["--junk_fraction", "1"], "--junk_fraction"),
    (["--junk_fraction", "-0.1"], "--junk_fraction"),
    (["--box", "63"], "--box"),
    (["--box", "14"], "--box"),
    (["--snr", "0"], "--snr"),
    (["--bfactor_min", "100", "--bfactor_max", "50"], "--bfactor_min"),
    (["--num_particles", "0"], "--num_particles"),
    (["--num_particles", "1"], "--num_particles"),
    (["--model", "missing.pdb"], "missing.pdb"),
    (["--junk_model", "missing.cif"], "missing.cif"),
    (["--box", "32", "--angpix", "2"], "does not fit"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            arguments: list[str], message: str) -> None:
    out = tmp_path / "nested" / "out"
    code = simulate_main(["--o", str(out), "--num_particles", "50", "--quiet", *arguments])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and message in error, error
    assert not (tmp_path / "nested").exists()


def test_cli_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert simulate_main(["--o", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_gzip_and_plain_models_agree(tmp_path: Path) -> None:
    plain = tmp_path / "4E43.pdb"
    with gzip.open(bundled_model("4E43.pdb.gz"), "rb") as source:
        plain.write_bytes(source.read())
    assert np.array_equal(atomic_model_map(str(plain), 48, 2.0),
                          atomic_model_map(bundled_model("4E43.pdb.gz"), 48, 2.0))


# ----------------------------------------------------------------------------- realistic defects


def relative_angles(first: pd.DataFrame | dict[str, np.ndarray], second: dict[str, np.ndarray]) -> np.ndarray:
    """Angle (degrees) between the rotations of two sets of ZYZ Euler angles, by scipy (any consistent ZYZ
    convention gives the same angle)."""
    from scipy.spatial.transform import Rotation

    def rotations(angles: pd.DataFrame | dict[str, np.ndarray]) -> Rotation:
        return Rotation.from_euler("ZYZ", np.stack([np.asarray(angles[name], dtype=np.float64)
                                                    for name in ("rot", "tilt", "psi")], axis=1), degrees=True)

    return np.degrees((rotations(first).inv() * rotations(second)).magnitude())


def test_defects_off_draw_the_particles_of_earlier_versions(tmp_path: Path) -> None:
    """The realistic defects are drawn after everything else: with them off nothing changes, and a data set with
    only pose, origin or contrast defects has the same images (but scaled by the contrast)."""
    plain = simulate_particles(tmp_path / "plain", noiseless(num_particles=200, junk_fraction=0.1))
    images = mrcfile.read(plain.stack).astype(np.float64)
    defects = simulate_particles(tmp_path / "defects", noiseless(
        num_particles=200, junk_fraction=0.1, misaligned_fraction=0.3, misalignment_min=10.0, misalignment_max=20.0,
        wrong_origin_fraction=0.2, origin_error=6.0, contrast_spread=0.3))
    truth = pd.read_csv(defects.truth_csv)
    stars = starfile.read(defects.star)["particles"]
    contrast = truth["contrast"].to_numpy()
    assert np.allclose(mrcfile.read(defects.stack), images * contrast[:, None, None], atol=1e-5 * images.std())
    assert contrast.std() == pytest.approx(0.3, rel=0.25) and truth["noise_scale"].eq(1.0).all()
    plain_truth = pd.read_csv(plain.truth_csv)
    for name in ("rot", "tilt", "psi", "origin_x_angst", "origin_y_angst", "defocus_u", "is_junk", "bfactor"):
        assert np.array_equal(truth[name], plain_truth[name]), name  # the truth is the same particles
    good = ~truth["is_junk"]
    counts = truth["kind"].value_counts()
    assert counts["misaligned"] == round(0.3 * good.sum()) and counts["wrong_origin"] == round(0.2 * good.sum())
    stated = {"rot": stars["rlnAngleRot"], "tilt": stars["rlnAngleTilt"], "psi": stars["rlnAnglePsi"]}
    angle = relative_angles(truth, stated)
    misaligned = (truth["kind"] == "misaligned").to_numpy()
    assert np.allclose(angle, truth["pose_error"], atol=1e-3)
    assert (angle[misaligned] >= 10.0 - 1e-3).all() and (angle[misaligned] <= 20.0 + 1e-3).all()
    assert (angle[~misaligned] < 1e-3).all()
    distance = np.hypot(stars["rlnOriginXAngst"] - truth["origin_x_angst"],
                        stars["rlnOriginYAngst"] - truth["origin_y_angst"]).to_numpy()
    shifted = (truth["kind"] == "wrong_origin").to_numpy()
    assert np.allclose(distance, truth["origin_error"], atol=1e-5)
    assert (distance[shifted] >= 3.0 - 1e-5).all() and (distance[shifted] <= 6.0 + 1e-5).all()
    assert (distance[~shifted] < 1e-5).all()
    assert truth["is_bad"].sum() == counts.drop("good").sum()


def test_empty_images_are_ctf_modulated_at_the_signal_variance(tmp_path: Path) -> None:
    result = simulate_particles(tmp_path / "sim", noiseless(num_particles=200, junk_fraction=0.1,
                                                            empty_fraction=0.15, bfactor_max=0.0))
    truth = pd.read_csv(result.truth_csv)
    images = mrcfile.read(result.stack).astype(np.float64)
    empty = (truth["kind"] == "empty").to_numpy()
    assert empty.sum() == round(0.15 * 200) and not (empty & truth["is_junk"].to_numpy()).any()
    assert np.allclose(images[empty].var(axis=(1, 2)), result.signal_variance, rtol=1e-3)
    # the CTF's zeros are in their spectra: power at the first zero of each image's CTF is far below its neighbours
    table = read_particles(result.star)
    ky = np.fft.fftfreq(BOX)[:, None] / PIXEL
    kx = np.fft.rfftfreq(BOX)[None, :] / PIXEL
    s2 = kx**2 + ky**2
    for row in np.flatnonzero(empty)[:5]:
        power = np.abs(np.fft.rfft2(images[row])) ** 2
        defocus = (table.defocus_u[row] + table.defocus_v[row]) / 2
        wavelength = 12.2643247 / math.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
        chi = math.pi * wavelength * defocus * s2 - math.pi / 2 * 2.7e7 * wavelength**3 * s2**2
        near_zero = np.abs(np.sin(chi + math.asin(0.1))) < 0.05
        inside = (s2 > 0) & (np.sqrt(s2) < 0.4 / PIXEL)
        assert power[near_zero & inside].mean() < 0.2 * power[inside].mean()


def test_coloured_noise_follows_its_spectrum_and_micrograph_levels(tmp_path: Path) -> None:
    bfactor, floor = 200.0, 0.25
    changes = {"num_particles": 400, "junk_fraction": 0.0, "micrographs": 8, "noise_spread": 0.3}
    clean = simulate_particles(tmp_path / "clean", noiseless(**changes))
    noisy = simulate_particles(tmp_path / "noisy", noiseless(snr=0.05, noise_bfactor=bfactor, noise_floor=floor,
                                                             **changes))
    noise = mrcfile.read(noisy.stack).astype(np.float64) - mrcfile.read(clean.stack).astype(np.float64)
    truth = pd.read_csv(noisy.truth_csv)
    scale = truth["noise_scale"].to_numpy()
    stars = starfile.read(noisy.star)["particles"]
    assert stars["rlnMicrographName"].nunique() == truth["micrograph"].nunique() == 8
    for micrograph in np.unique(truth["micrograph"]):  # one level per micrograph, as stated
        members = (truth["micrograph"] == micrograph).to_numpy()
        assert np.unique(scale[members]).size == 1
        assert noise[members].std() == pytest.approx(math.sqrt(noisy.noise_variance) * scale[members][0], rel=0.05)
    whitened = noise / scale[:, None, None]
    power = np.abs(np.fft.rfft2(whitened)) ** 2
    ky = np.fft.fftfreq(BOX, 1 / BOX)[:, None]
    kx = np.fft.rfftfreq(BOX, 1 / BOX)[None, :]
    shell = np.round(np.sqrt(kx**2 + ky**2)).astype(int)
    profile = np.array([power[:, shell == index].mean() for index in range(1, BOX // 2)])
    s = np.arange(1, BOX // 2) / (BOX * PIXEL)
    expected = floor + (1 - floor) * np.exp(-bfactor * s**2 / 4)
    assert np.allclose(profile / profile[0], expected / expected[0], rtol=0.1)


def test_realistic_preset_and_its_flags(tmp_path: Path) -> None:
    settings = SimulationSettings().realistic()
    assert (settings.empty_fraction, settings.misaligned_fraction, settings.wrong_origin_fraction) == (0.05, 0.1, 0.05)
    folder = tmp_path / "sim"
    assert simulate_main(["--o", str(folder), "--num_particles", "300", "--box", "64", "--realistic",
                          "--misaligned_fraction", "0.2", "--no_half_maps", "--quiet"]) == 0
    truth = pd.read_csv(folder / "truth.csv")
    kinds = truth["kind"].value_counts()
    assert kinds["junk"] == 30 and kinds["empty"] == 15
    assert kinds["misaligned"] == round(0.2 * (300 - 30 - 15))
    assert truth["micrograph"].nunique() == 40
    with pytest.raises(CryoSieveInputError, match="empty_fraction"):
        SimulationSettings(junk_fraction=0.6, empty_fraction=0.5).check()
    with pytest.raises(CryoSieveInputError, match="misalignment_min"):
        SimulationSettings(misalignment_min=40.0, misalignment_max=30.0).check()
