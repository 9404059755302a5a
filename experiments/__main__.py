"""``python -m experiments [experiment=latency] [model=mixtral_8x7b] [profile=gpu|smoke] [overrides]``."""
import os

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.profile.device == "cpu":  # CPU profiles run the kernels through Triton's interpreter, GPU or not
        os.environ["TRITON_INTERPRET"] = "1"
    from .run import run
    run(cfg)


if __name__ == "__main__":
    main()
