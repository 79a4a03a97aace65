# Shared by the launchers; sourced from the repository root.

# resume_flag WORKDIR [stt_jax.main flags...]: prints --resume when WORKDIR
# already holds a run (the marker of stt_jax/train/checkpoint.py, RUN_MARKER)
# and the flags do not ask for --overwrite, so a rerun or requeue continues.
resume_flag() {
  local workdir=$1
  shift
  if [[ -f $workdir/stt_jax_run.json && " $* " != *" --overwrite "* ]]; then
    echo --resume
  fi
}
