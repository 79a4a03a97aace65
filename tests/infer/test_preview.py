import numpy as np
import pytest
from PIL import Image

from stt_jax.data import sources
from stt_jax.errors import UserError
from stt_jax.infer import preview


def test_overlay_colours_instances_and_draws_contours():
  section = np.full((20, 30), 100, np.uint8)
  labels = np.zeros((20, 30), np.uint32)
  labels[5:15, 5:12] = 1
  labels[5:15, 12:20] = 2
  rgb = preview.overlay(section, labels)
  assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
  assert (rgb[0, 0] == 100).all()                       # background: the EM grey
  assert (rgb[5, 5] == 255).all() and (rgb[10, 11] == 255).all()  # contours, incl. 1|2
  assert not (rgb[10, 8] == rgb[10, 16]).all()          # two ids, two colours
  assert (preview.colours(np.array([7]))[0] == preview.colours(np.array([[7]]))[0, 0]).all()


def test_previews_written_and_bad_sections_refused(tmp_path):
  image = sources.write_array(str(tmp_path / "im.zarr"),
                              np.random.default_rng(0).integers(0, 255, (6, 40, 50), np.uint8))
  labels = sources.write_array(str(tmp_path / "l.zarr"), np.ones((6, 40, 50), np.uint32))
  paths = preview.write_previews(image, labels, str(tmp_path), sections=(0, 5), max_size=25)
  assert [p[-10:] for p in paths] == ["z00000.png", "z00005.png"]
  assert Image.open(paths[0]).size == (25, 20)
  with pytest.raises(UserError, match="outside"):
    preview.write_previews(image, labels, str(tmp_path), sections=(6,))


@pytest.mark.parametrize("depth,expected", [(1, [0]), (2, [0, 1]), (3, [1, 2]), (4, [1, 2, 3]),
                                            (8, [2, 4, 6]), (100, [25, 50, 75])])
def test_default_sections_stay_inside_shallow_volumes(depth, expected):
  # quarters of the depth rounded (half to even), never past the last section
  assert preview.default_sections(depth) == expected
  assert preview.check_sections((), depth) == expected
