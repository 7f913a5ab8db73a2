"""What every benchmark prints above its table: the command, the machine and the date."""

import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

# Issue 13's real-model corpus: timm models (random weights) and smp segmentation nets at 256²
TIMM = tuple(f"timm:{name}" for name in (
    "regnetx_002", "efficientnet_lite0", "mobilenetv3_large_100", "tinynet_a", "ghostnet_100",
    "convnext_atto", "rexnet_100", "dla34", "hrnet_w18_small", "repvgg_a0", "resnet18d",
    "densenet121", "dpn68", "res2net50_14w_8s", "vovnet39a"))
SMP = ("smp:Unet:resnet18", "smp:FPN:resnet34", "smp:Linknet:resnet18")
CORPUS = TIMM + SMP


def header(title: str, threads: Sequence[int] | None = None) -> str:
    """`threads`: the intra-op thread counts the timed runners use, where the script sets them
    per run (default: this process's count when the header is printed)."""
    command = "python " + " ".join(sys.argv)
    counts = (f"{', '.join(map(str, threads))} intra-op thread(s) per runner" if threads
              else f"{torch.get_num_threads()} intra-op threads")
    return (
        f"### {title}\n\n`{command}` — {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{counts}\n"
    )
