"""What measures the loss: the ``bench``, ``memory``, ``profile``, ``roofline`` and
``check-precision`` subcommands, their shared harness and argument vocabulary (:mod:`.harness`),
the baselines the fast path is measured against (:mod:`.baselines`), the training-step
benchmark (:mod:`.train_bench`), the device helpers and card table (:mod:`.hardware`), FLOP
counting (:mod:`.flops`) and the convolution replay that times each convolution alone
(:mod:`.conv_replay`).

Only the command line imports this package; the loss never does.
"""
