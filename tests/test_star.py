"""STAR reading and writing: RELION 3.0 and 3.1+, exact round trip, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import optics_table, random_particles
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.star import read_particles


def write_31(path, particles, optics):
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def test_relion31_two_optics_groups(tmp_path):
    rng = np.random.default_rng(0)
    particles = random_particles(10, rng, 1.0, "stack.mrcs")
    particles["rlnOpticsGroup"] = [1, 2] * 5
    optics = pd.concat([optics_table(64, 1.0, 1, 300.0), optics_table(64, 1.25, 2, 200.0)], ignore_index=True)
    write_31(tmp_path / "in.star", particles, optics)
    table = read_particles(tmp_path / "in.star")
    assert table.source.version == "3.1"
    assert table.pixel_size.tolist() == [1.0, 1.25] * 5
    assert table.voltage.tolist() == [300.0, 200.0] * 5
    assert np.allclose(table.origin_x, particles["rlnOriginXAngst"] / table.pixel_size)
    assert table.image_index.tolist() == list(range(10))
    assert table.random_subset is None


def test_relion30_single_table_needs_angpix(tmp_path):
    rng = np.random.default_rng(1)
    particles = random_particles(5, rng, 1.0, "stack.mrcs").drop(columns=["rlnOriginXAngst", "rlnOriginYAngst",
                                                                          "rlnOpticsGroup"])
    particles["rlnOriginX"] = [1.5, -2.0, 0.0, 3.0, 0.25]
    particles["rlnOriginY"] = 0.5
    particles["rlnVoltage"] = 300.0
    particles["rlnSphericalAberration"] = 2.7
    particles["rlnAmplitudeContrast"] = 0.1
    starfile.write({"images": particles}, tmp_path / "in.star", overwrite=True)
    with pytest.raises(CryoSieveInputError, match="give angpix"):
        read_particles(tmp_path / "in.star")
    table = read_particles(tmp_path / "in.star", angpix=1.7)
    assert table.source.version == "3.0"
    assert table.origin_x.tolist() == [1.5, -2.0, 0.0, 3.0, 0.25]
    assert table.pixel_size.tolist() == [1.7] * 5


def test_subset_write_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    particles = random_particles(20, rng, 1.0, "stack.mrcs")
    particles["rlnRandomSubset"] = [1, 2] * 10
    particles["rlnMicrographName"] = [f"mic{i % 3}.mrc" for i in range(20)]
    write_31(tmp_path / "in.star", particles, optics_table(64, 1.0))
    table = read_particles(tmp_path / "in.star")
    rows = np.array([3, 0, 7, 19])
    table.subset(rows).write(tmp_path / "out.star")
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    original = starfile.read(tmp_path / "in.star", always_dict=True)
    pd.testing.assert_frame_equal(back["particles"], original["particles"].iloc[rows].reset_index(drop=True))
    pd.testing.assert_frame_equal(back["optics"], original["optics"])


@pytest.mark.parametrize("column", ["rlnAngleRot", "rlnDefocusU", "rlnImageName"])
def test_missing_column_is_named(tmp_path, column):
    particles = random_particles(3, np.random.default_rng(3), 1.0, "stack.mrcs").drop(columns=[column])
    write_31(tmp_path / "in.star", particles, optics_table(64, 1.0))
    with pytest.raises(CryoSieveInputError, match=column):
        read_particles(tmp_path / "in.star")


def test_unknown_optics_group_is_named(tmp_path):
    particles = random_particles(3, np.random.default_rng(4), 1.0, "stack.mrcs")
    particles["rlnOpticsGroup"] = [1, 1, 5]
    write_31(tmp_path / "in.star", particles, optics_table(64, 1.0))
    with pytest.raises(CryoSieveInputError, match="rlnOpticsGroup 5"):
        read_particles(tmp_path / "in.star")


@pytest.mark.parametrize(("block", "column", "row", "text"), [
    ("particles", "rlnOriginXAngst", 2, "nan"),
    ("particles", "rlnAngleTilt", 3, "inf"),
    ("particles", "rlnDefocusU", 1, "-inf"),
    ("particles", "rlnCtfBfactor", 2, "nan"),
    ("particles", "rlnDefocusAngle", 3, "abc"),
    ("optics", "rlnVoltage", 1, "nan"),
    ("optics", "rlnImagePixelSize", 1, "inf"),
])
def test_a_value_that_is_not_a_finite_number_is_named(tmp_path, block, column, row, text):
    particles = random_particles(3, np.random.default_rng(5), 1.0, "stack.mrcs")
    particles["rlnCtfBfactor"] = 0.0
    blocks = {"optics": optics_table(64, 1.0), "particles": particles}
    frame = blocks[block]
    frame[column] = frame[column].astype(object)
    frame.loc[row - 1, column] = text
    starfile.write(blocks, tmp_path / "in.star", overwrite=True)
    with pytest.raises(CryoSieveInputError) as caught:
        read_particles(tmp_path / "in.star")
    assert f"column {column} in data_{block} holds {text} at row {row}: not a finite number" in str(caught.value)


@pytest.mark.parametrize("column", ["rlnOriginX", "rlnVoltage"])
def test_relion30_values_that_are_not_finite_are_named(tmp_path, column):
    particles = random_particles(3, np.random.default_rng(6), 1.0, "stack.mrcs").drop(
        columns=["rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup"])
    particles["rlnOriginX"], particles["rlnVoltage"] = 0.5, 300.0
    particles["rlnSphericalAberration"], particles["rlnAmplitudeContrast"] = 2.7, 0.1
    particles[column] = particles[column].astype(object)
    particles.loc[1, column] = "nan"
    starfile.write({"images": particles}, tmp_path / "in.star", overwrite=True)
    with pytest.raises(CryoSieveInputError, match=f"column {column} in data_images holds nan at row 2: not a finite"):
        read_particles(tmp_path / "in.star", angpix=1.0)


def latin1_star(folder, stack_name: bytes = b"stack.mrcs") -> tuple:
    """A RELION 3.1 file with a Latin-1 comment and optics group name (RELION reads such files), its images in
    ``stack_name``; returns its path and the bytes of the optics group's name."""
    particles = random_particles(4, np.random.default_rng(7), 1.0, "STACK")
    optics = optics_table(8, 1.0)
    optics["rlnOpticsGroupName"] = "GROUPNAME"
    write_31(folder / "utf8.star", particles, optics)
    name = b"Gr\xe9goire_\xff"
    data = (folder / "utf8.star").read_bytes().replace(b"GROUPNAME", name).replace(b"STACK", stack_name)
    path = folder / "latin1.star"
    path.write_bytes(b"# Cr\xe9\xe9 par relion_preprocess\n" + data)
    return path, name


def test_a_star_file_with_bytes_that_are_not_utf8_is_read_and_written_back_unchanged(tmp_path):
    """Once read as holding no block ('expected data_optics + data_particles')."""
    path, name = latin1_star(tmp_path)
    table = read_particles(path)
    assert len(table) == 4 and table.source.version == "3.1" and list(table.image_file) == ["stack.mrcs"] * 4
    reference = read_particles(tmp_path / "utf8.star")
    np.testing.assert_array_equal(table.defocus_u, reference.defocus_u)
    table.subset(np.array([2, 0])).write(tmp_path / "out.star")
    written = (tmp_path / "out.star").read_bytes()
    assert name in written  # the optics group's name as read, byte for byte
    again = read_particles(tmp_path / "out.star")
    assert list(again.image_name) == [table.image_name[2], table.image_name[0]]
    assert again.source.blocks["optics"]["rlnOpticsGroupName"][0] == table.source.blocks["optics"][
        "rlnOpticsGroupName"][0]


def test_a_stack_name_with_bytes_that_are_not_utf8_is_found(tmp_path):
    import os

    import mrcfile

    from cryosieve.io.stack import StackReader

    stack = b"st\xe9ck.mrcs"
    images = np.random.default_rng(8).normal(size=(4, 8, 8)).astype(np.float32)
    with mrcfile.new(os.fsdecode(os.path.join(os.fsencode(tmp_path), stack))) as handle:
        handle.set_data(images)
        handle.set_image_stack()
        handle.voxel_size = 1.0
    path, _ = latin1_star(tmp_path, stack)
    table = read_particles(path)
    with StackReader(table, tmp_path) as reader:
        assert reader.validate() == 8
        np.testing.assert_array_equal(reader.read(np.array([3, 1])), images[[3, 1]])


def test_a_stack_name_that_is_not_utf8_cannot_go_to_a_cs_file(tmp_path):
    from cryosieve.io.particle_files import in_format_of

    path, _ = latin1_star(tmp_path, b"st\xe9ck.mrcs")
    with pytest.raises(CryoSieveInputError) as caught:
        in_format_of(read_particles(path), tmp_path / "out.cs")
    assert "row 1, 'st\\udce9ck.mrcs', holds bytes that are not UTF-8" in str(caught.value)


def test_new_poses_are_written_back_with_every_other_column(tmp_path):
    rng = np.random.default_rng(3)
    particles = random_particles(12, rng, 1.0, "stack.mrcs")
    particles["rlnRandomSubset"] = [1, 2] * 6
    particles["rlnMicrographName"] = [f"mic{i % 3}.mrc" for i in range(12)]
    write_31(tmp_path / "in.star", particles, optics_table(64, 1.25))
    table = read_particles(tmp_path / "in.star")
    rot, tilt, psi = rng.uniform(-180, 180, 12), rng.uniform(0, 180, 12), rng.uniform(-180, 180, 12)
    origin_x, origin_y = rng.uniform(-5, 5, 12), rng.uniform(-5, 5, 12)
    table.with_poses(rot, tilt, psi, origin_x, origin_y).write(tmp_path / "out.star")
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    original = starfile.read(tmp_path / "in.star", always_dict=True)
    np.testing.assert_array_equal(back["particles"]["rlnAngleRot"], rot)
    np.testing.assert_array_equal(back["particles"]["rlnAngleTilt"], tilt)
    np.testing.assert_array_equal(back["particles"]["rlnAnglePsi"], psi)
    np.testing.assert_array_equal(back["particles"]["rlnOriginXAngst"], origin_x * 1.25)
    np.testing.assert_array_equal(back["particles"]["rlnOriginYAngst"], origin_y * 1.25)
    kept = [name for name in original["particles"].columns if "Angle" not in name and "Origin" not in name]
    assert list(back["particles"].columns) == list(original["particles"].columns)
    pd.testing.assert_frame_equal(back["particles"][kept], original["particles"][kept])
    pd.testing.assert_frame_equal(back["optics"], original["optics"])
    again = read_particles(tmp_path / "out.star")
    np.testing.assert_allclose(again.origin_x, origin_x, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(again.rot, rot)


def test_new_poses_of_a_relion30_file_are_origins_in_pixels(tmp_path):
    rng = np.random.default_rng(4)
    particles = random_particles(4, rng, 1.0, "stack.mrcs").drop(columns=["rlnOriginXAngst", "rlnOriginYAngst",
                                                                          "rlnOpticsGroup"])
    particles["rlnVoltage"], particles["rlnSphericalAberration"], particles["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    starfile.write({"images": particles}, tmp_path / "in.star", overwrite=True)
    table = read_particles(tmp_path / "in.star", angpix=1.7)
    shifted = table.with_poses(table.rot, table.tilt, table.psi, np.array([1.0, -2.5, 0.0, 3.25]), np.zeros(4))
    shifted.write(tmp_path / "out.star")
    again = read_particles(tmp_path / "out.star", angpix=1.7)
    assert again.origin_x.tolist() == [1.0, -2.5, 0.0, 3.25]
    assert "rlnOriginXAngst" not in starfile.read(tmp_path / "out.star", always_dict=True)["images"].columns
