"""Run a test function on 2 real gloo ranks (torch.multiprocessing, 127.0.0.1), shared by the test files.

Spawned children unpickle `fn` by module name, so it must be a module-level function of a test module.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(rank: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        fn(rank, *args)
    finally:
        torch_dist.destroy_process_group()


def run_on_two_ranks(fn, *args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_bootstrap, args=(_free_port(), fn, args), nprocs=WORLD_SIZE, join=True)
