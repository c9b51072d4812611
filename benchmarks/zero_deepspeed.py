"""DeepSpeed's own model-state estimators, run for peftlab's architectures: the record that
``peftlab.memory.zero_model_states(layout="deepspeed")`` is tested against (``tests/test_memory_zero.py``).

DeepSpeed's ``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs`` are plain
arithmetic on two parameter counts and run on a CPU. DeepSpeed is not one of peftlab's dependencies; install it
beside the project without building its CUDA ops, then run:

    DS_BUILD_OPS=0 pip install --no-build-isolation --target /tmp/deepspeed deepspeed hjson py-cpuinfo ninja msgpack
    rm -rf /tmp/deepspeed/torch* /tmp/deepspeed/nvidia* /tmp/deepspeed/triton*   # keep the venv's own torch
    PYTHONPATH=/tmp/deepspeed DS_ACCELERATOR=cpu python benchmarks/zero_deepspeed.py

The parameter counts come from the meta-device models (``peftlab.params.count_parameters`` and
``peftlab.memory.largest_layer_parameters``): DeepSpeed's own ``model_to_params`` keys tensors by ``data_ptr``,
which is 0 for every tensor on the meta device. Writes ``benchmarks/results/zero_deepspeed.json``.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab import env, memory, models
from peftlab.params import count_parameters

RESULTS = Path(__file__).resolve().parent / "results" / "zero_deepspeed.json"
GPU_COUNTS = (1, 2, 4, 8, 16, 64)


def main() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for architecture in models.ARCHITECTURES:
        model = models.meta_model(architecture)
        parameters, largest = count_parameters(model).total, memory.largest_layer_parameters(model)
        for num_gpus in GPU_COUNTS:
            _, stage2 = estimate_zero2_model_states_mem_needs(parameters, num_gpus, 1, cpu_offload=False)
            _, stage3, _ = estimate_zero3_model_states_mem_needs(parameters, largest, num_gpus, 1, cpu_offload=False)
            rows.append({"architecture": architecture, "parameters": parameters, "largest_layer_parameters": largest,
                         "num_gpus": num_gpus, "stage2_gpu_bytes": stage2, "stage3_gpu_bytes": stage3})  # fmt: skip
    versions = env.package_versions(("torch", "deepspeed"))
    record = {"benchmark": "zero_deepspeed", "device": "cpu (arithmetic only)", "profile": "full",
              "date": date.today().isoformat(), "versions": versions, "options": "cpu_offload=False, one node",
              "rows": rows}  # fmt: skip
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(rows)} rows ({len(models.ARCHITECTURES)} architectures × {len(GPU_COUNTS)} GPU counts) → {RESULTS}")


if __name__ == "__main__":
    main()
