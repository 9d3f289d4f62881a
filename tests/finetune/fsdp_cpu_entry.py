"""Test entry: `safeprune finetune` with Accelerate's FSDP v1 code path on CPU ranks (gloo).

Accelerate 1.15 only turns GPU-type ranks into FSDP (state.py: MULTI_CPU never becomes FSDP), while torch's
FSDP v1 itself runs on CPU over gloo with `device_id=cpu` (what `prepare_model` passes). This entry keeps
Accelerate's own set-up and then switches its distributed type to FSDP with the plugin that
`accelerate launch --config_file src/safeprune/configs/accelerate/fsdp_4gpu.yaml` configured (the FSDP_* variables), so
`accelerator.prepare` runs its real FSDP v1 wrapping of the student and both optimisers. Test only: on GPUs
Accelerate takes this path by itself.

Usage: accelerate launch --config_file src/safeprune/configs/accelerate/fsdp_4gpu.yaml --num_processes 2 \\
           tests/finetune/fsdp_cpu_entry.py finetune ...
"""

import os
import sys

# sync_module_states asks for a GPU index in the plugin; every rank loads the same student anyway.
os.environ["FSDP_SYNC_MODULE_STATES"] = "false"

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.num_processes > 1 and self.distributed_type == DistributedType.MULTI_CPU:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        # Both shared states: every later AcceleratorState() copies PartialState's fields over its own. The
        # device: MULTI_CPU names it cpu:0, which FSDP compares unequal to the cpu its parameters are on.
        for state in (PartialState(), self.state):
            state.distributed_type, state.device = DistributedType.FSDP, torch.device("cpu")


Accelerator.__init__ = _init_with_fsdp

if __name__ == "__main__":
    from safeprune.cli import main

    sys.exit(main(sys.argv[1:]))
