"""TorchX components for the training stages: one job definition each, which any TorchX scheduler runs.

    torchx run -s local_cwd scripts/components.py:two_tower -- --epochs 1              # this host
    torchx run -s slurm scripts/components.py:ranker --j 2x1 -- --epochs 1             # a Slurm cluster
    torchx run -s kubernetes --dryrun scripts/components.py:two_tower --j 2x8 --gpu 8  # the Kubernetes job

Each is TorchX's ``dist.ddp`` (``torchrun`` on every node, c10d rendezvous at the first node) over one
training script, with the project's image (the Dockerfile at the repository root; schedulers that run
on hosts, as Slurm and ``local_cwd`` do, ignore it and run in the submitting directory's environment)
and one thread per process. ``--j NODESxPROCS``: nodes and processes per node. Arguments after ``--``
go to the script (``python -m retrieval.two_tower_train --help``). README.md, "Scale up", has the
commands and what was run where. Each component is written out, signature and docstring: TorchX
reads them from this file's source (its linter parses it), so they cannot be generated.
"""

# TorchX reads the signatures, and its file linter knows typing.Optional / Dict only (not "X | None",
# not postponed annotations)
# ruff: noqa: UP006, UP035, UP045
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

IMAGE = "recsys-examples:latest"  # docker build -t recsys-examples . (the CUDA variant: --build-arg DEVICE=cuda)


def _stage(
    module: str,
    script_args: tuple[str, ...],
    j: str,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    rdzv_port: int,
    env: Optional[Dict[str, str]],
) -> specs.AppDef:
    return ddp(
        *script_args,
        m=module,
        image=image,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        rdzv_port=rdzv_port,
        # one intra-op thread per process unless told otherwise: torchrun's processes share the host's cores
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )


def two_tower(
    *script_args: str,
    j: str = "1x2",
    image: str = IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """The two-tower retrieval model and its FAISS export (retrieval.two_tower_train).

    Args:
        script_args: the script's arguments
        j: NODESxPROCS, nodes and processes per node
        image: the container image (the repository's Dockerfile)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        rdzv_port: the rendezvous port on the first node (several nodes)
        env: extra environment variables
    """
    return _stage("retrieval.two_tower_train", script_args, j, image, cpu, gpu, memMB, rdzv_port, env)


def ranker(
    *script_args: str,
    j: str = "1x2",
    image: str = IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """The DLRM ranker (golden_training.train_dlrm).

    Args:
        script_args: the script's arguments
        j: NODESxPROCS, nodes and processes per node
        image: the container image (the repository's Dockerfile)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        rdzv_port: the rendezvous port on the first node (several nodes)
        env: extra environment variables
    """
    return _stage("golden_training.train_dlrm", script_args, j, image, cpu, gpu, memMB, rdzv_port, env)


def sasrec(
    *script_args: str,
    j: str = "1x2",
    image: str = IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """SASRec, the sequential source (sasrec.sasrec_main).

    Args:
        script_args: the script's arguments
        j: NODESxPROCS, nodes and processes per node
        image: the container image (the repository's Dockerfile)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        rdzv_port: the rendezvous port on the first node (several nodes)
        env: extra environment variables
    """
    return _stage("sasrec.sasrec_main", script_args, j, image, cpu, gpu, memMB, rdzv_port, env)


def bert4rec(
    *script_args: str,
    j: str = "1x2",
    image: str = IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """BERT4Rec (bert4rec.bert4rec_main).

    Args:
        script_args: the script's arguments
        j: NODESxPROCS, nodes and processes per node
        image: the container image (the repository's Dockerfile)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        rdzv_port: the rendezvous port on the first node (several nodes)
        env: extra environment variables
    """
    return _stage("bert4rec.bert4rec_main", script_args, j, image, cpu, gpu, memMB, rdzv_port, env)
