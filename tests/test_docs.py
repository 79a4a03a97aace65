"""The commands the documentation shows must run as printed: every
`stt_jax.main` command in README.md, docs/*.md and the configs' docstrings
names flags that exist, a config file that exists (with its preset), and
overrides that parse and pass `config.validate`; every `--config.key=value`
fragment in the prose names a key that exists. A renamed flag or key then
fails here, not in a user's first run (or a GPU lease's)."""

import glob
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from stt_jax import config as config_lib
from stt_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT)
                             for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
# a value left for the reader to fill in: runs/<name>, ..., <20k + N>
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…")


def _markdown_commands(text: str) -> list[str]:
  """Command lines in fenced blocks (backslash continuations joined) and
  inline code spans (which may wrap across lines) that run stt_jax.main."""
  found = []
  parts = re.split(r"^\s*```.*$", text, flags=re.M)
  for i, part in enumerate(parts):
    if i % 2:
      for line in re.sub(r"\\\n\s*", " ", part).splitlines():
        if "stt_jax.main" in line and not line.lstrip().startswith("#"):
          found.append(line)
    else:
      found += [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", part, flags=re.S)
                if "stt_jax.main" in span]
  return found


def _docstring_commands(source: str) -> list[str]:
  joined = re.sub(r"\\\\\n\s*", " ", source)  # a docstring's "\\" continuation
  return [line for line in joined.splitlines() if "python -m stt_jax.main" in line]


def _documented_commands() -> list[tuple[str, str]]:
  """(file, command) for each stt_jax.main run, `a; b` and `a && b` split."""
  found = []
  for path in DOCS:
    found += [(path, c) for c in _markdown_commands(open(os.path.join(ROOT, path)).read())]
  for path in CONFIGS:
    found += [(path, c) for c in _docstring_commands(open(os.path.join(ROOT, path)).read())]
  return [(path, part.strip()) for path, line in found for part in re.split(r";|&&", line)
          if "stt_jax.main" in part]


def _main_arguments(command: str) -> list[str]:
  """The arguments given to stt_jax.main (up to a pipe or a redirection)."""
  words = shlex.split(command.split(" #")[0], posix=True)
  start = next(i for i, w in enumerate(words) if w.endswith("stt_jax.main")) + 1
  args = []
  for word in words[start:]:
    if word in ("||", "|") or word.startswith((">", "2>")):
      break
    args.append(word)
  return args


def _load_config(config_arg: str, overrides: list[str]):
  """The config as main would build it: config_flags parses the file, its
  preset and the overrides (in a FlagValues of its own)."""
  path, _, preset = config_arg.partition(":")
  argv = ["docs", f"--config={os.path.join(ROOT, path)}{':' + preset if preset else ''}",
          *overrides]
  values = flags.FlagValues()
  # config_flags finds the overrides in the argv it is given, not in the parse call's
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# ml_collections loads config files with importlib's load_module (its warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
MAIN_FLAGS = {f.name for f in flags.FLAGS.get_flags_for_module(main.__name__)}
COMMANDS = _documented_commands()


def test_the_documentation_shows_commands():
  # the extraction itself: the README's and the runbook's commands are found
  sources = {path for path, _ in COMMANDS}
  assert {"README.md", "docs/gpu_runbook.md", "configs/vnc3.py"} <= sources
  assert len(COMMANDS) >= 25


@pytest.mark.parametrize("where,command", COMMANDS,
                         ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, command):
  args = _main_arguments(command)
  config_arg, overrides = None, []
  for arg in args:
    assert arg.startswith("--"), f"{where}: stray argument {arg!r} in: {command}"
    name, _, value = arg[2:].partition("=")
    if name == "config":
      config_arg = value
    elif name.startswith("config."):
      if not PLACEHOLDER.search(value):
        overrides.append(arg)
    else:
      assert name in MAIN_FLAGS or (name.startswith("no") and name[2:] in MAIN_FLAGS), (
          f"{where}: no flag --{name} in stt_jax.main: {command}")
  if not config_arg or PLACEHOLDER.search(config_arg):
    return
  if not os.path.isfile(os.path.join(ROOT, config_arg.partition(":")[0])):
    # a config of the user's own (configs/mine.py): its overrides' keys at least
    cfg = config_lib.default_config()
    for arg in overrides:
      _lookup(cfg, arg[len("--config."):].partition("=")[0], where)
    return
  cfg = _load_config(config_arg, overrides)
  config_lib.validate(cfg)


def _lookup(cfg, key: str, where: str):
  node = cfg
  for part in key.split("."):
    assert part in node, f"{where}: no config key {key!r}"
    node = node[part]


def test_config_fragments_in_the_prose_name_keys_that_exist():
  cfg = config_lib.default_config()
  keys = []
  for path in DOCS:
    text = open(os.path.join(ROOT, path)).read()
    keys += [(path, k) for k in re.findall(r"--config\.([A-Za-z0-9_.]+)=", text)]
  assert len(keys) >= 30
  for path, key in keys:
    _lookup(cfg, key, path)


def test_the_check_catches_a_wrong_flag_or_key():
  with pytest.raises(AssertionError, match="no flag --wrokdir"):
    test_documented_command_parses("x", "python -m stt_jax.main --config=configs/demo.py "
                                        "--wrokdir=runs/x")
  with pytest.raises(Exception, match="stepz"):
    test_documented_command_parses("x", "python -m stt_jax.main --config=configs/demo.py "
                                        "--workdir=runs/x --config.train.stepz=3")
  with pytest.raises(AssertionError, match="no config key 'train.stepz'"):
    _lookup(config_lib.default_config(), "train.stepz", "x")


def test_bench_commands_name_flags_their_script_defines():
  """`bench/<script>.py --flag` in the docs: the script (or the bench module
  it imports) declares --flag to argparse."""
  uses = []
  for path in DOCS:
    text = re.sub(r"\s+", " ", open(os.path.join(ROOT, path)).read())
    for script, args in re.findall(r"bench/(\w+)\.py((?: \[?--[\w-]+(?:=[^ `;|\]]*)?\]?)*)", text):
      uses += [(path, script, name) for name in re.findall(r"--([\w-]+)", args)]
  assert len(uses) >= 20
  for path, script, name in uses:
    source = open(os.path.join(ROOT, "bench", f"{script}.py")).read()
    for imported in re.findall(r"^import (\w+)", source, flags=re.M):
      if os.path.isfile(os.path.join(ROOT, "bench", f"{imported}.py")):
        source += open(os.path.join(ROOT, "bench", f"{imported}.py")).read()
    declared = f'"--{name}"' in source
    assert declared, f"{path}: bench/{script}.py has no --{name}"
