"""User-facing errors: one line that says what to fix, never a traceback."""


class UserError(Exception):
  """A problem with the user's input (config, paths, data) that they can fix.

  `stt_jax.main` prints `error: <message>` and exits with status 2.
  """


# what to lower when a device runs out of memory: one wording for main's and
# the training loop's one-line errors
LOWER_TRAINING_MEMORY = ("lower train.batch_size or data.patch_shape "
                         "(STT-UNET: raise model.attention.chunks)")
LOWER_INFERENCE_MEMORY = "lower infer.batch_size or infer.block_shape"


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA running out of device memory (a runtime error
  of JAX whose status is RESOURCE_EXHAUSTED), as opposed to a bug."""
  names = {cls.__name__ for cls in type(error).__mro__}
  return (bool(names & {"JaxRuntimeError", "XlaRuntimeError"})
          and "RESOURCE_EXHAUSTED" in str(error))


def first_line(error: BaseException, limit: int = 160) -> str:
  text = (str(error).strip().splitlines() or [""])[0]
  return text if len(text) <= limit else text[:limit - 3] + "..."
