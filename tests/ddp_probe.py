"""``python -m train`` under torchrun, with a probe on each rank (for tests/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_probe.py PROBE_DIR \
        <python -m train arguments>

Runs ``train.__main__.main`` unchanged, recording on every rank:
- ``PROBE_DIR/rank<R>_writes.txt``: one line per call of the checkpoint writers
  (``save_checkpoint`` / ``export_final``) this rank made;
- ``PROBE_DIR/rank<R>_step<N>.pt``: this rank's network state dict after optimizer step N;
- ``PROBE_DIR/rank<R>_done``: written when ``main`` has returned.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train import __main__ as cli  # noqa: E402
from train import loop  # noqa: E402


def main() -> int:
    probe = Path(sys.argv[1])
    probe.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            with open(probe / f"rank{rank}_writes.txt", "a") as f:
                f.write(f"{name}\n")
            return fn(*args, **kwargs)
        return wrapper

    loop.save_checkpoint = recording("save_checkpoint", loop.save_checkpoint)
    loop.export_final = recording("export_final", loop.export_final)

    fit = loop.Trainer.fit

    def probed_fit(self):
        def dump(epoch, i):
            torch.save({k: v.detach().clone() for k, v in self.network.state_dict().items()},
                       probe / f"rank{rank}_step{self.step}.pt")
        self.after_step = dump
        return fit(self)

    loop.Trainer.fit = probed_fit
    rc = cli.main(sys.argv[2:])
    (probe / f"rank{rank}_done").write_text(str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main())
