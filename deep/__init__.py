"""The paper's deep benchmarks (CIFAR, Fashion-MNIST, ImageNet fine-tuning, enwik8) on top of the late-phase core."""
