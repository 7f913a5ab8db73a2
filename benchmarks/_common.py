"""What every benchmark prints above its table: the command, the machine and the date."""

import os
import platform
import sys
import time

import torch


def header(title: str) -> str:
    command = "python " + " ".join(sys.argv)
    return (
        f"### {title}\n\n`{command}` — {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads\n"
    )
