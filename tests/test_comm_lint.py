"""Every collective and point-to-point call of the package goes through parallel/comm.py, the one
module that places tensors on the backend's device (CUDA for NCCL): a lint over the sources."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_effllm")
ALLOWED = {os.path.join("parallel", "comm.py")}
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "all_gather_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "P2POp", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "send_object_list", "recv_object_list",
}


def _violations(path: str) -> list:
    tree = ast.parse(open(path).read(), path)
    aliases = set()  # names bound to torch.distributed
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            elif node.module == "torch.distributed":
                found += [f"{path}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = node.value
            dotted = ast.unparse(base)
            if (isinstance(base, ast.Name) and base.id in aliases) or dotted == "torch.distributed":
                found.append(f"{path}:{node.lineno} calls {dotted}.{node.attr}")
    return found


def test_collectives_only_in_the_communication_module():
    found = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and os.path.relpath(path, PACKAGE) not in ALLOWED:
                found += _violations(path)
    assert not found, "collectives outside parallel/comm.py (use comm's functions):\n" + "\n".join(found)


def test_the_lint_finds_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "from torch.distributed import barrier\n"
                   "def f(t):\n    dist.all_reduce(t)\n    d2.broadcast(t, 0)\n    torch.distributed.send(t, 1)\n")
    assert len(_violations(str(bad))) == 4
