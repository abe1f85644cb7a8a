"""launch/tpu.py and launch/worker.sh against a fake `gcloud` (and `git`): no network, no cloud.

The fake gcloud appends each call's argv to a log, keeps the VM / queued resource state and a
local "bucket" in files, and plays the workers' part of `generate` as FAKE_GENERATE says:
ok (every worker done, manifest written), fail (worker 0 fails) or preempt (the first start
loses the VM mid-run; later starts finish).
"""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")
WORKER = os.path.join(ROOT, "launch", "worker.sh")
OUT = "gs://bk/datasets/r7"
BASE = ["--name", "dsdm", "--zone", "us-west4-a", "--project", "proj", "--out", OUT]

FAKE_GCLOUD = r'''
import json, os, shlex, shutil, sys
argv = sys.argv[1:]
state = os.environ["FAKE_STATE"]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + argv) + "\n")
if os.path.basename(sys.argv[0]) == "git":
    sys.exit(0)
joined = " ".join(argv)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in joined:
    sys.exit("fake gcloud: failing as asked")

def path(url):
    return os.path.join(state, "bucket", url[len("gs://"):])

def put(url, text=""):
    os.makedirs(os.path.dirname(path(url)), exist_ok=True)
    open(path(url), "w").write(text)

def read(name):
    p = os.path.join(state, name)
    return open(p).read() if os.path.exists(p) else None

def write(name, text):
    p = os.path.join(state, name)
    if text is None:
        os.path.exists(p) and os.remove(p)
    else:
        open(p, "w").write(text)

if argv[:3] == ["compute", "tpus", "tpu-vm"] or argv[:3] == ["compute", "tpus", "queued-resources"]:
    kind, verb = argv[2], argv[3]
    if kind == "queued-resources":
        if verb == "create":
            write("node", "READY"); write("qr", "ACTIVE")
        elif verb == "describe":
            s = read("qr")
            if s is None:
                sys.exit("NOT_FOUND")
            print(s)
        elif verb == "delete":
            write("node", None); write("qr", None)
        sys.exit(0)
    if verb == "create":
        write("node", "READY")
    elif verb == "describe":
        s = read("node")
        if s is None:
            sys.exit("NOT_FOUND")
        print(s)
    elif verb == "delete":
        write("node", None)
    elif verb == "ssh":
        if read("node") != "READY":
            sys.exit("ssh: the VM is not READY")
        script = next(a for a in argv if a.startswith("--command="))[len("--command="):]
        if "launch/worker.sh start" in script:
            words = shlex.split(script.split("&& ", 1)[1])
            logs, out = words[3], words[words.index("--out") + 1]
            hosts = int(os.environ.get("FAKE_HOSTS", "1"))
            mode = os.environ.get("FAKE_GENERATE", "ok")
            for w in range(hosts):  # as worker.sh start: clear the old exit markers
                for m in ("done", "failed"):
                    os.path.exists(path(f"{logs}/worker-{w}.{m}")) and os.remove(path(f"{logs}/worker-{w}.{m}"))
            put(f"{out}/shard-{read('starts') or '0'}")
            write("starts", str(int(read("starts") or 0) + 1))
            if mode == "preempt" and read("preempted") is None:
                write("preempted", "1"); write("node", "PREEMPTED")
                if read("qr") is not None:
                    write("qr", "SUSPENDED")
                sys.exit(0)
            for w in range(hosts):
                put(f"{logs}/worker-{w}.log", f"worker {w} log\n")
                put(f"{logs}/worker-{w}." + ("failed" if mode == "fail" and w == 0 else "done"), "0\n")
            if mode != "fail":
                put(f"{out}/manifest.json", "{}")
    sys.exit(0)
if argv[:2] == ["storage", "ls"]:
    url = argv[2]
    if url.endswith("/"):
        d = path(url)
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        if not names:
            sys.exit("One or more URLs matched no objects.")
        print("\n".join(url + n for n in names))
    elif os.path.exists(path(url)):
        print(url)
    else:
        sys.exit("One or more URLs matched no objects.")
elif argv[:2] == ["storage", "cat"]:
    if not os.path.exists(path(argv[2])):
        sys.exit("One or more URLs matched no objects.")
    print(open(path(argv[2])).read(), end="")
elif argv[:2] == ["storage", "cp"]:
    put(argv[3], open(argv[2]).read())
elif argv[:2] == ["storage", "rm"]:
    if not os.path.exists(path(argv[2])):
        sys.exit("One or more URLs matched no objects.")
    os.remove(path(argv[2]))
'''


@pytest.fixture
def fake(tmp_path):
    """(env with the fake gcloud/git first on PATH, a reader of the recorded calls, the state dir)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name in ("gcloud", "git"):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD)
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_STATE": str(state)}

    def calls():
        p = state / "calls.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
    return env, calls, state


def _launch(*args, env=None, path=None):
    if path is not None:
        env = {**os.environ, "PATH": path}
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)
    return r.returncode, r.stdout, r.stderr


def _dry(*args):
    # An empty PATH: were anything executed (gcloud, git), the run would fail.
    rc, out, err = _launch(*args, "--dry-run", path="")
    return rc, [shlex.split(line) for line in out.splitlines()], err


def _script(cmd):
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def _starts(calls):
    return [c for c in calls if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
            and "launch/worker.sh start" in _script(c)]


def _pin(name):
    for line in open(os.path.join(ROOT, "requirements-ci.txt")):
        if line.split("[")[0].split("==")[0].strip() == name:
            return line.split("==")[1].strip()
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# --dry-run: the command sequence
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accel, runtime, hosts", [
    ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 2),
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
])
@pytest.mark.parametrize("spot", [False, True])
def test_all_dry_run_per_family(tmp_path, accel, runtime, hosts, spot):
    rc, cmds, err = _dry("all", *BASE, "--accelerator-type", accel, "--model-src", "gs://bk/models/shapes_sd",
                         "--decoder-src", str(tmp_path), "--num_images", "5000", "generate.steps=50",
                         *(["--spot"] if spot else []))
    assert rc == 0, err
    creates = [c for c in cmds if c[:3] == ["gcloud", "compute", "tpus"] and c[4] == "create"]
    assert len(creates) == 1
    create = creates[0]
    assert {"dsdm", "--zone=us-west4-a", "--project=proj", f"--accelerator-type={accel}"} <= set(create)
    if spot:  # Spot through a queued resource, which names its node
        assert create[3] == "queued-resources"
        assert {f"--runtime-version={runtime}", "--spot", "--node-id=dsdm"} <= set(create)
        assert cmds[-1][3:5] == ["queued-resources", "delete"] and "--force" in cmds[-1]
    else:
        assert create[3] == "tpu-vm" and f"--version={runtime}" in create and "--spot" not in create
        assert cmds[-1][3:5] == ["tpu-vm", "delete"]
    order = [c[4] if c[0] == "gcloud" and c[1] == "compute" else " ".join(c[:3]) for c in cmds]
    first = {k: order.index(k) for k in ("create", "scp", "ssh", "gcloud storage rsync", "delete")}
    assert first["create"] < first["scp"] < first["ssh"] < first["delete"]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in c and "--zone=us-west4-a" in c for c in ssh)
    setup, pull_model, pull_decoder, start = (_script(c) for c in ssh)
    # Python 3.11 from uv, the pinned set with jax[tpu] at the pinned version
    assert "curl -LsSf https://astral.sh/uv/install.sh | sh" in setup
    assert "uv venv --python 3.11 .venv" in setup
    jax = _pin("jax")
    assert f"'jax[tpu]=={jax}'" in setup and f"jaxlib=={jax}" in setup
    assert "-e '.[tpu]' " in setup  # the package's tpu extra, the other pins at their tested versions
    assert f"flax=={_pin('flax')}" in setup and "torch" not in setup and "jax[cpu]" not in setup
    # weights: a gs:// model is pulled directly; a local decoder folder is uploaded once, then pulled
    assert "gs://bk/models/shapes_sd datasetdm-jax/models/shapes_sd" in pull_model
    upload = [c for c in cmds if c[:3] == ["gcloud", "storage", "rsync"]]
    assert upload == [["gcloud", "storage", "rsync", "--recursive", str(tmp_path),
                       "gs://bk/datasetdm-weights/runs_shapes_semantic"]]
    assert "gs://bk/datasetdm-weights/runs_shapes_semantic datasetdm-jax/runs/shapes_semantic" in pull_decoder
    # generate: detached through worker.sh, straight into the bucket, logs next to it
    words = shlex.split(start.split("&& ", 1)[1])
    assert words == ["bash", "launch/worker.sh", "start", OUT + "-logs", ".venv/bin/datasetdm", "generate",
                     "--distributed", "--config", "configs/shapes_semantic.py", "--num_images", "5000",
                     "--out", OUT, "generate.steps=50"]
    # then: poll the markers and the VM, check the manifest, and only then delete
    assert ["gcloud", "storage", "ls", OUT + "-logs/"] in cmds
    assert cmds[-2] == ["gcloud", "storage", "ls", OUT + "/manifest.json"]


@pytest.mark.parametrize("step, first", [("delete", "delete"), ("generate", "ssh"), ("setup", "archive")])
def test_single_steps(step, first):
    rc, cmds, err = _dry(step, *BASE)
    assert rc == 0, err
    assert first in cmds[0]


def test_status_and_logs_read_the_bucket():
    rc, cmds, err = _dry("status", *BASE, "--accelerator-type", "v4-16")
    assert rc == 0, err
    assert [c[:3] for c in cmds] == [["gcloud", "compute", "tpus"], ["gcloud", "storage", "ls"],
                                     ["gcloud", "storage", "ls"]]
    rc, cmds, err = _dry("logs", *BASE, "--accelerator-type", "v4-16")
    assert rc == 0, err
    assert cmds == [["gcloud", "storage", "cat", f"{OUT}-logs/worker-{w}.log"] for w in (0, 1)]


def test_clone_instead_of_shipping_the_checkout():
    rc, cmds, _ = _dry("setup", *BASE, "--repo", "https://example.com/x.git", "--revision", "v1")
    assert rc == 0 and len(cmds) == 1
    assert "git clone -q https://example.com/x.git datasetdm-jax" in cmds[0][-1]
    assert "git checkout -q v1" in cmds[0][-1]


def test_bad_arguments_are_one_line_errors():
    rc, cmds, err = _dry("create", *[a if a != OUT else "bk/datasets/r7" for a in BASE])
    assert rc != 0 and cmds == [] and "--out must be a gs:// path" in err
    rc, cmds, err = _dry("create", *BASE, "--accelerator-type", "v9z-8")
    assert rc != 0 and cmds == [] and "pass --version" in err
    rc, cmds, err = _dry("create", *BASE, "--accelerator-type", "v9z-8", "--version", "my-image")
    assert rc == 0 and "--version=my-image" in cmds[-1]


# ---------------------------------------------------------------------------------------------
# Running against the fake gcloud
# ---------------------------------------------------------------------------------------------

def test_all_completes_then_deletes(fake):
    env, calls, state = fake
    env["FAKE_HOSTS"] = "2"
    rc, out, err = _launch("all", *BASE, "--accelerator-type", "v5litepod-16", "--poll", "0", env=env)
    assert rc == 0, err
    assert "the dataset is in gs://bk/datasets/r7" in err
    log = calls()
    assert len(_starts(log)) == 1
    assert log[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dsdm"]
    assert not (state / "node").exists()
    rc, out, err = _launch("logs", *BASE, "--accelerator-type", "v5litepod-16", env=env)
    assert rc == 0 and out.count("worker 0 log") == 1 and out.count("worker 1 log") == 1


def test_failed_generate_keeps_the_vm_and_says_how_to_resume(fake):
    env, calls, state = fake
    env["FAKE_GENERATE"] = "fail"
    rc, out, err = _launch("all", *BASE, "--poll", "0", env=env)
    assert rc == 1
    assert not any(c[4:5] == ["delete"] for c in calls())
    assert (state / "node").read_text() == "READY"
    assert "generate failed on worker(s) 0" in err and "is kept" in err
    resume = next(line for line in err.splitlines() if "resume:" in line)
    cmd = shlex.split(resume.split("resume:", 1)[1].split("(")[0])
    assert cmd[:3] == ["python", "launch/tpu.py", "generate"] and cmd[cmd.index("--out") + 1] == OUT
    rc, out, _ = _launch("status", *BASE, env=env)
    assert "VM dsdm: READY" in out and "1 failed (0)" in out and "not complete" in out

    # the resume command, as printed, starts generation again into the same prefix
    env["FAKE_GENERATE"] = "ok"
    rc, out, err = _launch(*cmd[2:], env=env)
    assert rc == 0, err
    starts = _starts(calls())
    assert len(starts) == 2 and _script(starts[0]) == _script(starts[1])
    rc, out, _ = _launch("status", *BASE, env=env)
    assert "1 done, 0 failed" in out and "complete (manifest.json written)" in out


def test_failed_step_keeps_the_vm(fake):
    env, calls, state = fake
    env["FAKE_FAIL"] = "launch/worker.sh start"
    rc, out, err = _launch("all", *BASE, "--poll", "0", env=env)
    assert rc == 1 and "step failed" in err and "is kept" in err
    assert "python launch/tpu.py generate" in err
    assert not any(c[4:5] == ["delete"] for c in calls())


def test_preemption_recreates_and_resumes_into_the_same_prefix(fake):
    env, calls, state = fake
    env["FAKE_GENERATE"] = "preempt"
    rc, out, err = _launch("all", *BASE, "--spot", "--accelerator-type", "v6e-8", "--poll", "0", env=env)
    assert rc == 0, err
    assert "PREEMPTED" in err and "recreating dsdm" in err
    log = calls()
    verbs = [c[4] if c[:3] == ["gcloud", "compute", "tpus"] and c[3] in ("tpu-vm", "queued-resources")
             and c[4] in ("create", "delete", "scp") else None for c in log]
    verbs = [v for v in verbs if v]
    # create, ship, (preempted) delete, create, ship again, final delete
    assert verbs == ["create", "scp", "delete", "create", "scp", "delete"]
    assert all(c[3] == "queued-resources" for c in log if c[:3] == ["gcloud", "compute", "tpus"]
               and c[4] in ("create", "delete"))
    starts = _starts(log)
    assert len(starts) == 2 and _script(starts[0]) == _script(starts[1])  # same --out, same log prefix
    assert f"--out {OUT}" in _script(starts[1])
    assert sorted(os.listdir(state / "bucket" / "bk" / "datasets" / "r7")) == ["manifest.json", "shard-0", "shard-1"]


def test_all_on_a_live_vm_does_not_create_another(fake):
    env, calls, state = fake
    (state / "node").write_text("READY")
    rc, out, err = _launch("all", *BASE, "--poll", "0", env=env)
    assert rc == 0, err
    assert "not creating it" in err
    assert not any(c[4:5] == ["create"] for c in calls())


# ---------------------------------------------------------------------------------------------
# launch/worker.sh
# ---------------------------------------------------------------------------------------------

def test_worker_script_mirrors_log_and_status(fake, tmp_path):
    env, calls, state = fake
    env.update(HOME=str(tmp_path / "home"), DATASETDM_WORKER="3", DATASETDM_LOG_EVERY="1")
    logs = "gs://bk/logs"
    bucket = state / "bucket" / "bk" / "logs"
    r = subprocess.run(["bash", WORKER, "run", logs, "sh", "-c", "echo making images; exit 3"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3
    assert "making images" in (bucket / "worker-3.log").read_text()
    assert (bucket / "worker-3.failed").read_text().strip() == "3"

    # start: clears the old marker, returns at once, the detached run writes .done when finished
    r = subprocess.run(["bash", WORKER, "start", logs, "sh", "-c", "sleep 1; echo second"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "worker 3: started" in r.stdout
    assert not (bucket / "worker-3.failed").exists()
    deadline = time.time() + 20
    while not (bucket / "worker-3.done").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (bucket / "worker-3.done").exists()
    text = (bucket / "worker-3.log").read_text()
    assert "making images" in text and "second" in text  # appended across runs
