"""What measures the loss: the ``bench``, ``memory``, ``profile`` and ``roofline`` subcommands,
their shared harness and argument vocabulary (:mod:`.harness`), the device helpers
(:mod:`.hardware`), FLOP counting (:mod:`.flops`) and the convolution replay that times each
convolution alone (:mod:`.conv_replay`).

Only the command line imports this package; the loss never does.
"""
