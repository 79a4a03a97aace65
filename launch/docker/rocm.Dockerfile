# stt_jax on AMD GPUs (ROCm; the paper trained on MI250X). JAX's ROCm plugin
# links against the ROCm installed in the image ("-local" wheels), so the base
# is AMD's ROCm 7 development image; the host needs the amdgpu driver and
# /dev/kfd, /dev/dri passed in.
#   docker build -f launch/docker/rocm.Dockerfile -t stt_jax:rocm .
#   docker run --rm --device=/dev/kfd --device=/dev/dri --group-add video \
#       -v $PWD/runs:/stt_jax/runs stt_jax:rocm --config=configs/demo.py --workdir=runs/demo
# (launch/container.sh rocm ... does both.) AMD also publishes ready images
# with jax built in (rocm/jax-community); to use one, set ROCM_IMAGE to it and
# JAX_EXTRA to "" so that its own jaxlib is kept.
ARG ROCM_IMAGE=rocm/dev-ubuntu-24.04:7.0-complete
FROM ${ROCM_IMAGE}
ARG JAX_VERSION=0.10.2
ARG JAX_EXTRA=rocm7-local
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /stt_jax
COPY requirements.txt .
RUN grep -vE '^(jax|jaxlib)==' requirements.txt > /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir -r /tmp/requirements-gpu.txt \
 && if [ -n "${JAX_EXTRA}" ]; then pip install --no-cache-dir "jax[${JAX_EXTRA}]==${JAX_VERSION}"; fi
COPY stt_jax stt_jax
COPY configs configs
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "stt_jax.main"]
CMD ["--config=configs/demo.py", "--workdir=runs/demo"]
