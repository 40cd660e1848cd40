"""Which process this is when torchrun or accelerate launch started several: read from the launcher's environment."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

# Where accelerate reads a process's rank and the number of processes (accelerate.utils.environment,
# get_cpu_distributed_information): torchrun's names first, then MPI's (accelerate's multi-CPU launcher is mpirun).
# Listed here rather than imported: importing accelerate.utils costs every loralab command about 1.5 s.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(env: Mapping[str, str], names: Iterable[str], default: int) -> int:
    return next((int(env[name]) for name in names if int(env.get(name, -1)) >= 0), default)


def launched_processes(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun and accelerate launch set them; (0, 1) alone."""
    return _first_int(env, RANK_VARIABLES, 0), _first_int(env, SIZE_VARIABLES, 1)


def accelerate_cpu_started_one(env: Mapping[str, str] = os.environ) -> bool:
    """True in the one process `accelerate launch --cpu --num_processes N` (N > 1, no mpirun) starts: accelerate sets
    MASTER_ADDR for the N processes but starts only this one (its --multi_gpu launcher starts N, on CPUs too)."""
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(name in env for name in RANK_VARIABLES))


