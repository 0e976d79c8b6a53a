#!/usr/bin/env bash
# The version 0.5 bundled CIFAR-10 generator (issue 20) on one GPU in about eight minutes (configs/train-bundled.sh
# with this folder and its defaults, as session 13 ran it):
#   configs/cifar10-v0.5/train.sh DATA RUNS OUT [SCALE]
exec bash "$(dirname "$0")/../train-bundled.sh" "$(dirname "$0")" "$@"
