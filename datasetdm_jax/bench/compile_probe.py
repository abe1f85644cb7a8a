"""Compile time in a fresh process: `python -m datasetdm_jax.bench.compile_probe CACHE_DIR FOLDER ...`.

The bench runs this twice with one empty cache folder: the first run compiles cold and fills
the persistent compilation cache, the second shows what every later process pays. Prints one
JSON line: trace (lowering) seconds, compile seconds, and total seconds from process start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_T0 = time.perf_counter()


def probe(cache_dir: str, folder: str, batch: int, size: int, steps: int, scheduler: str, capture: str | None,
          dtype: str) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from datasetdm_jax import pretrained
    from datasetdm_jax.bench import programs

    pipe = pretrained.load_pipeline(folder, dtype=dtype)
    prog = programs.generation(pipe, batch, size, steps=steps, scheduler=scheduler, capture=capture, devices=1)
    t0 = time.perf_counter()
    lowered = prog.fn.lower(*prog.args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"trace_s": t1 - t0, "compile_s": t2 - t1, "process_s": t2 - _T0}


def run_twice(cache_dir: str, folder: str, batch: int, size: int, steps: int, scheduler: str,
              capture: str | None, dtype: str, timeout_s: float = 1800) -> dict:
    """{'cold': probe, 'warm': probe}: two fresh processes sharing `cache_dir`."""
    cmd = [sys.executable, "-m", "datasetdm_jax.bench.compile_probe", cache_dir, folder, str(batch), str(size),
           str(steps), scheduler, capture or "none", dtype]
    out = {}
    for name in ("cold", "warm"):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
        if r.returncode:
            raise RuntimeError(f"compile probe failed: {r.stderr.strip().splitlines()[-1:]}")
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    c, f, b, s, n, sch, cap, dt = sys.argv[1:9]
    print(json.dumps(probe(c, f, int(b), int(s), int(n), sch, None if cap == "none" else cap, dt)))
