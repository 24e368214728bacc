"""LeNet-5 on MNIST (LeCun et al. 1998 report 0.95% test error), from the IDX files beside the repo.

    python launch.py --config experiments/lenet5_mnist.py
    python launch.py --config experiments/lenet5_mnist.py:smoke

Expected: >= 99.0% test accuracy on the 10,000 MNIST test digits (28x28 resized to 32x32).
Measured: 99.16% test accuracy (99.22% validation), 20 epochs in about 8 minutes on a shared
2-core CPU, fp32, seed 0 (2026-11-22).
"""

from cnnjax.config import base_config, smoke


def get_config(arg: str | None = None):
    config = base_config()
    config.model.name = "lenet5"
    config.data.name = "idx"
    config.data.path = "../shared/datasets/mnist"
    config.data.val_fraction = 1 / 12  # 5k of the 60k training digits for validation
    config.batch_size = 128
    config.num_epochs = 20
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    return smoke(config) if arg == "smoke" else config
