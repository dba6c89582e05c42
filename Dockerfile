# One image for every stage: the repository, installed by scripts/install.sh (the script CI and
# `make` run), on Debian with Python 3.11. Any stage runs as its command:
#
#   docker build -t recsys-examples .                                 # CPU wheels (fbgemm-gpu-cpu, faiss-cpu)
#   docker build --build-arg DEVICE=cuda -t recsys-examples:cuda .    # CUDA wheels (fbgemm-gpu, faiss-gpu)
#   docker run --rm recsys-examples torchrun --standalone --nproc_per_node=2 -m retrieval.two_tower_train
#   docker run --rm -p 8000:8000 -v $PWD/runs:/app/runs recsys-examples python -m integration.service --host 0.0.0.0
#
# The TorchX components (scripts/components.py) name this image; Kubernetes and Slurm jobs run it.
# The CUDA variant takes the NVIDIA driver from the host (docker run --gpus all): the wheels bring
# their own CUDA runtime.
FROM python:3.11-slim-bookworm

ARG DEVICE=cpu
# g++: AOTInductor compiles the served models' C++ kernels (python -m inference_legacy.aot_compile).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The install first, from the requirement files alone, so that a code change keeps this layer.
COPY requirements/ requirements/
COPY scripts/install.sh scripts/install.sh
RUN PYTHON=python3 bash scripts/install.sh "$DEVICE" /opt/venv && touch /opt/venv/.installed-"$DEVICE"
COPY . .
# install.sh wrote /app onto the virtualenv's path: scripts run by file path (torchx's dist.ddp) import it.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    OMP_NUM_THREADS=1 \
    RECSYS_DATA_DIR=/app/data
# Data sets are fetched on first use into RECSYS_DATA_DIR (mount a volume there to keep them).
CMD ["python", "-m", "integration.demo"]
