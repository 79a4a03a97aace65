import pytest

from stt_jax.errors import UserError
from stt_jax.paths import clear_for_output


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
  folder = tmp_path / "out"
  folder.mkdir()
  (folder / "result.zarr").write_text("keep me")
  a_file = tmp_path / "result.txt"
  a_file.write_text("keep me too")
  for path in (folder, a_file):
    with pytest.raises(UserError, match="--overwrite"):
      clear_for_output(str(path), overwrite=False)
    assert path.exists()
    assert clear_for_output(str(path), overwrite=True) == str(path)
    assert not path.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  clear_for_output(str(empty), overwrite=False)  # an empty folder holds nothing to lose
  assert clear_for_output(str(tmp_path / "new"), overwrite=False) == str(tmp_path / "new")
