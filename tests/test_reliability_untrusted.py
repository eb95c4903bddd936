"""Checkpoints from elsewhere never run code: every pickle-based file a resume or a conversion
reads is replaced with one whose unpickling would create a marker file, the manifest is
recomputed (anyone who can write the folder can), and the real entry point must refuse it in one
line naming the file, with no marker. Also: what a real checkpoint holds (plain values, CPU
storages only), and the manifest requiring the files every checkpoint has.
"""
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch

from dist_utils import run_ranks
from megatron_fixtures import tiny_hf
from megatron_effllm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# Two steps inside the pruning window (OBS Hessians and saliency in the state), the dynamic
# sampler updating its weights every step, a checkpoint at the end.
SHORT = ["train.steps=2", "train.checkpoint_interval=2", "train.log_interval=1",
         "prune.start_step=0", "prune.end_step=2", "prune.interval=100", "data.dynamic_interval=1",
         "export.hf=false"]
STEP = os.path.join("checkpoints", "step_000002")


class Payload:
    """Unpickling it runs ``touch marker`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poison(path, marker, raw=False):
    """Replace ``path`` with a file whose unpickling creates ``marker``: a torch file shaped like
    the original (a mapping), or a bare pickle (``raw``)."""
    if raw:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)
    else:
        torch.save({"step": 2, "module": Payload(marker)}, path)


def _one_line_naming(message, path):
    return message is not None and "\n" not in message and path in message


# ------------------------------------------------------------------ training checkpoints
def _train(run_dir, extra=()):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    try:
        run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + list(extra)))
        return None
    except Exception as err:  # what the user would see (a traceback fails the checks below)
        return f"{type(err).__name__}: {err}"


TRAINER_CASES = {  # name: (file in the checkpoint, bare pickle?)
    "trainer state": ("trainer_state.pt", False),
    "rank state": ("ranks/rank_00000.pt", False),
    "state shared over data-parallel ranks": ("ranks/shared_rank_00000.pt", False),
    "rng state": ("rng/rank_00000.pt", False),
    "rng state, bare pickle": ("rng/rank_00000.pt", True),
    "deepspeed model file": ("ds/mp_rank_00_model_states.pt", False),
    "deepspeed optimizer file": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
}


def _resume_cases(rank, world_size, base):
    """One process: a short run, a clean resume, then a resume from each poisoned copy."""
    from megatron_effllm.training import checkpoint as ckpt

    run_dir = os.path.join(base, "run")
    out = {"first": _train(run_dir)}
    clean = os.path.join(base, "clean")
    shutil.copytree(run_dir, clean)
    out["clean resume"] = _train(clean, ["train.steps=3", "train.checkpoint_interval=3",
                                         f"resume={os.path.join(clean, STEP)}"])
    for name, (rel, raw) in TRAINER_CASES.items():
        case = os.path.join(base, name.replace(" ", "_").replace(",", ""))
        shutil.copytree(run_dir, case)
        step = os.path.join(case, STEP)
        marker = os.path.join(case, "MARKER")
        os.makedirs(os.path.dirname(os.path.join(step, rel)), exist_ok=True)
        _poison(os.path.join(step, rel), marker, raw)
        ckpt.write_manifest(step)
        error = _train(case, ["train.steps=3", f"resume={step}"])
        out[name] = (error, os.path.join(step, rel), os.path.exists(marker))
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("untrusted"))
    (out,) = run_ranks(_resume_cases, world_size=1, args=(base,), timeout=900)
    return base, out


def test_clean_checkpoint_resumes(resumed):
    base, out = resumed
    assert out["first"] is None and out["clean resume"] is None, out
    assert os.path.isdir(os.path.join(base, "clean", "checkpoints", "step_000003"))


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_resume_refuses_a_file_that_would_run_code(resumed, name):
    error, path, marker_made = resumed[1][name]
    assert not marker_made, f"{name}: unpickling {path} ran code"
    assert _one_line_naming(error, path) and error.startswith("CheckpointError: "), error


def test_deepspeed_checkpoint_engine_refuses_a_file_that_would_run_code(tmp_path):
    """DeepSpeed's own reads (behind the check of every file that ``load`` makes first)."""
    from megatron_effllm.engine._deepspeed_checkpoint import RestrictedCheckpointEngine

    marker, path = str(tmp_path / "MARKER"), str(tmp_path / "mp_rank_00_model_states.pt")
    _poison(path, marker)
    with pytest.raises(UserError) as err:
        RestrictedCheckpointEngine(None).load(path, map_location="cpu")
    assert not os.path.exists(marker)
    assert _one_line_naming(str(err.value), path) and "refers to posix.system" in str(err.value)


def _storages(path):
    """(storage locations, globals) a torch zip file's data.pkl names, read with an unpickler that
    builds nothing: every global is recorded and replaced by a stand-in."""
    found, names = [], set()

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return Stub()

        def __setstate__(self, state):
            pass

        def __setitem__(self, key, value):
            pass

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return type(name, (Stub,), {})

        def persistent_load(self, pid):
            found.append(pid[3])  # ("storage", storage type, key, location, numel)
            return Stub()

    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        Reader(z.open(pkl)).load()
    return found, names


def test_checkpoint_files_hold_cpu_storages_and_plain_values(resumed):
    """Every file of a real checkpoint (ours and DeepSpeed's) stores its tensors on the CPU;
    ours name nothing but tensors (no numpy, no classes)."""
    from megatron_effllm.manifest import MANIFEST

    folder = os.path.join(resumed[0], "run", STEP)
    with open(os.path.join(folder, MANIFEST)) as f:
        files = [rel for rel in json.load(f)["files"] if rel.endswith(".pt")]
    assert {"trainer_state.pt", "rng/rank_00000.pt", "ds/mp_rank_00_model_states.pt"} <= set(files)
    tensor_globals = {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict"}
    for rel in files:
        locations, names = _storages(os.path.join(folder, rel))
        assert locations and set(locations) == {"cpu"}, (rel, set(locations))
        if not rel.startswith("ds/"):
            assert {n for n in names if not n.endswith("Storage")} <= tensor_globals, (rel, names)
    state = torch.load(os.path.join(folder, "ranks", "rank_00000.pt"), weights_only=True)
    assert any(k.startswith("xtx.") for k in state["hessians"])  # the rank's OBS sums are in it


def test_manifest_must_list_the_files_every_checkpoint_has(resumed, tmp_path):
    from megatron_effllm.training import checkpoint as ckpt

    folder = str(tmp_path / "step_000002")
    shutil.copytree(os.path.join(resumed[0], "run", STEP), folder)
    manifest = os.path.join(folder, ckpt.MANIFEST)
    with open(manifest, "w") as f:
        json.dump({"files": {}}, f)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.verify(folder)
    assert str(err.value) == (f"checkpoint manifest {manifest} does not list architecture.json, which every "
                              "checkpoint has; the manifest is damaged or the checkpoint incomplete")
    shutil.rmtree(os.path.join(folder, "ds"))  # the engine's files gone, manifest recomputed
    ckpt.write_manifest(folder)
    with pytest.raises(ckpt.CheckpointError, match="lists no model or optimizer files"):
        ckpt.verify(folder)


@pytest.mark.parametrize("value, says", [
    ([1, 2, 3], "holds a list, not a trainer state"),
    ({"step": "2", "pruning": {}}, "holds step of type str, not a trainer state"),
    ({"step": 2}, "holds no pruning, not a trainer state"),
])
def test_trainer_state_of_the_wrong_type_is_named(resumed, tmp_path, value, says):
    from megatron_effllm.training import checkpoint as ckpt

    folder = str(tmp_path / "step_000002")
    shutil.copytree(os.path.join(resumed[0], "run", STEP), folder)
    path = os.path.join(folder, "trainer_state.pt")
    torch.save(value, path)
    ckpt.write_manifest(folder)
    ckpt.verify(folder)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_meta(folder)
    assert _one_line_naming(str(err.value), path) and says in str(err.value), str(err.value)


# ------------------------------------------------------------------ two ranks agree on a refusal
def _two_rank_refusals(rank, world_size, root):
    """A rank's own file refused on that rank alone: both ranks raise the same line (none waits in
    a collective of the engine's load). Then intact checkpoints of the other ZeRO stages load."""
    from megatron_effllm.parallel import comm
    from megatron_effllm.training import checkpoint as ckpt
    from test_reliability_checkpoints import _backward, _batches, _engine

    engine = _engine(2)
    _backward(engine, _batches(1, rank), rank)
    engine.step()
    mine = {"hessian": torch.full((3, 3), float(rank))}
    folder = ckpt.save(engine, root, 1, architecture_json="{}", trainer_state={"step": 1, "pruning": {}},
                       rank_state=mine)
    ckpt.load_engine_state(engine, folder)
    out = {"clean": torch.equal(ckpt.read_rank_state(folder)[0]["hessian"], mine["hessian"])}
    for rel, load in (("rng/rank_00001.pt", ckpt.load_engine_state),
                      ("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", ckpt.load_engine_state),
                      ("ranks/rank_00001.pt", lambda e, f: ckpt.read_rank_state(f))):
        path = os.path.join(folder, rel)
        if rank == 0:
            shutil.copyfile(path, path + ".good")
            _poison(path, os.path.join(root, "MARKER"))
            ckpt.write_manifest(folder)
        comm.barrier()
        try:
            load(engine, folder)
            out[rel] = None
        except ckpt.CheckpointError as err:
            out[rel] = str(err)
        comm.barrier()
        if rank == 0:
            os.replace(path + ".good", path)
    engine.destroy()
    # The allowlist covers what every ZeRO stage writes: a save and a load into a new engine.
    for stage, bf16 in ((0, False), (1, False), (3, True)):
        engine = _engine(stage, bf16)
        _backward(engine, _batches(1, rank), rank)
        engine.step()
        before = [engine.full_fp32_param(p).clone() for p in engine.module.parameters()]
        folder = ckpt.save(engine, os.path.join(root, f"zero{stage}"), 1, architecture_json="{}",
                           trainer_state={"step": 1, "pruning": {}})
        engine.destroy()
        engine = _engine(stage, bf16)
        ckpt.load_engine_state(engine, folder)
        after = [engine.full_fp32_param(p) for p in engine.module.parameters()]
        out[f"zero-{stage}"] = all(torch.equal(a, b) for a, b in zip(before, after))
        engine.destroy()
    return out, os.path.exists(os.path.join(root, "MARKER"))


def test_a_refusal_on_one_rank_stops_every_rank_and_every_zero_stage_loads(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_ranks(_two_rank_refusals, world_size=2, args=(root,), timeout=300)
    for rank, (out, marker_made) in enumerate(results):
        assert not marker_made
        assert out["clean"]  # the intact checkpoint loads, each rank its own state
        for rel in ("rng/rank_00001.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ranks/rank_00001.pt"):
            assert _one_line_naming(out[rel], os.path.join(root, "step_000001", rel)), (rank, rel, out[rel])
            assert out[rel] == results[0][0][rel]  # the same line on both ranks
        assert out["zero-0"] and out["zero-1"] and out["zero-3"], out


# ------------------------------------------------------------------ megatron checkpoints
@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory):
    from megatron_effllm.convert.megatron_checkpoint import save_canonical_checkpoint

    _, arch, sd = tiny_hf("llama")
    ck = str(tmp_path_factory.mktemp("megatron") / "ck")
    save_canonical_checkpoint(arch, sd, ck)
    return ck


def _convert_hf(capsys, ck, out):
    """effllm-convert-hf main(argv): (exit code, stderr lines)."""
    from megatron_effllm.cli.convert_hf import main

    capsys.readouterr()
    try:
        main(["--ckpt", ck, "--out", out])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _shard(ck):
    return os.path.join(ck, "model", min(f for f in os.listdir(os.path.join(ck, "model")) if f.endswith(".distcp")))


@pytest.mark.parametrize("case, target, says", [
    ("metadata", lambda ck: os.path.join(ck, "model", ".metadata"), "is refused: it refers to posix.system"),
    ("common.pt", lambda ck: os.path.join(ck, "model", "common.pt"), "is refused: it refers to posix.system"),
    ("flipped byte", _shard, "is corrupted (checksum mismatch)"),
    ("no manifest", lambda ck: os.path.join(ck, "MANIFEST.json"), "has no MANIFEST.json"),
])
def test_megatron_checkpoint_damaged_or_crafted_is_refused(megatron_ckpt, tmp_path, capsys, case, target, says):
    from megatron_effllm.manifest import write_manifest

    ck, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    shutil.copytree(megatron_ckpt, ck)
    path, marker = target(ck), str(tmp_path / "MARKER")
    if case == "metadata":
        _poison(path, marker, raw=True)
    elif case == "common.pt":
        _poison(path, marker)
    elif case == "flipped byte":
        _flip_byte(path)
    else:
        os.remove(path)
    if case in ("metadata", "common.pt"):
        write_manifest(ck)
    code, err = _convert_hf(capsys, ck, out)
    assert not os.path.exists(marker)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], (code, err)
    assert (path if case != "no manifest" else ck) in err[0]
    assert not os.path.exists(out)


def test_megatron_checkpoint_converts_when_intact(megatron_ckpt, tmp_path, capsys):
    code, err = _convert_hf(capsys, megatron_ckpt, str(tmp_path / "hf"))
    assert code == 0, err
