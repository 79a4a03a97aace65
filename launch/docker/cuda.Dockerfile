# stt_jax on NVIDIA GPUs. JAX's CUDA wheels carry CUDA, cuDNN and NCCL
# themselves, so a plain Python image is enough; the host needs only the
# NVIDIA driver (>= 580 for CUDA 13) and the NVIDIA container toolkit.
#   docker build -f launch/docker/cuda.Dockerfile -t stt_jax:cuda .
#   docker run --rm --gpus all -v $PWD/runs:/stt_jax/runs stt_jax:cuda \
#       --config=configs/demo.py --workdir=runs/demo
# (launch/container.sh cuda ... does both.) JAX_VERSION must equal the jax pin
# of requirements.txt; tests/test_launch.py checks that it does.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG JAX_VERSION=0.10.2
WORKDIR /stt_jax
COPY requirements.txt .
# the pinned CPU jax/jaxlib are replaced by the CUDA build of the same version
RUN grep -vE '^(jax|jaxlib)==' requirements.txt > /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir -r /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir "jax[cuda13]==${JAX_VERSION}"
COPY stt_jax stt_jax
COPY configs configs
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "stt_jax.main"]
CMD ["--config=configs/demo.py", "--workdir=runs/demo"]
