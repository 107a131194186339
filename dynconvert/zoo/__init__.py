"""Small reference models used by the benchmarks and tests."""

from .cifar_resnet import CIFAR_MEAN, CIFAR_STD, CifarResNet, cifar_resnet20

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "CifarResNet", "cifar_resnet20"]
