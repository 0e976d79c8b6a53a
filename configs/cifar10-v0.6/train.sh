#!/usr/bin/env bash
# The version 0.6 bundled CIFAR-10 generator (issue 20) on one GPU in about nine minutes: configs/train-bundled.sh
# with this folder's configs and train.env.
#   configs/cifar10-v0.6/train.sh DATA RUNS OUT [SCALE]
# On a lent GPU (the device tool: one call, the data carried as its 20 MB archive in the git-ignored data/):
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.gz data/
#   run(command="mkdir -p /tmp/c && tar -xzf data/cifar10-jpeg.tar.gz -C /tmp/c && PYTHONPATH=src
#       bash configs/cifar10-v0.6/train.sh /tmp/c/train /tmp/runs $OUT", carry=["data"], timeout_s=600)
# Checked on a CPU (session 25) with 500 images, SCALE 0.12 and CHECK_FLAGS="--batch-size 16 --no-bf16": every
# stage ran and the six tar files came to 57 MB; again in session 27 with the flow-matching U-Net (its student a
# flow consistency student): the same six files, 57 MB, 190 s.
exec bash "$(dirname "$0")/../train-bundled.sh" "$(dirname "$0")" "$@"
