"""What every benchmark writes: its JSON result and a section appended to BENCHMARKS.md that
names the exact command, the machine and the date, so a number is never quoted without them."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def machine() -> str:
    """The CPU model, core count and OS (what a reader needs to compare timings)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()}, torch {torch.__version__}"


def command_line() -> str:
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    return " ".join(["python", script, *sys.argv[1:]])


def write_result(out_dir: str, name: str, result: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path


def append_section(md_path: str, title: str, command: str, body: str, notes: str = "") -> str:
    """Append '### title (date, machine)', the command, optional notes and the body (tables)."""
    section = (f"\n### {title} ({datetime.date.today().isoformat()}, {machine()})\n\n"
               f"Command: `{command}`\n\n" + (notes.strip() + "\n\n" if notes.strip() else "") + body.strip() + "\n")
    if not os.path.exists(md_path):
        with open(md_path, "w") as f:
            f.write("# Benchmarks\n\nEvery section was appended by the script named in its command, on the "
                    "machine it names; nothing here is edited by hand.\n")
    with open(md_path, "a") as f:
        f.write(section)
    return section
