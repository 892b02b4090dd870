"""Training and evaluating restoration networks with DiffLoss: ``diffloss-fast train|eval``.

Modules: ``data`` (paired data sets on disk), ``synthetic`` (pairs generated on the fly),
``sources`` (which data a command uses), ``nets`` (the built-in baseline and ``--net``),
``metrics`` (PSNR/SSIM), ``sampling`` (seeds), ``distributed`` (torchrun), ``checkpoint``
(safetensors), ``report`` (output files), ``trainer`` and ``evaluate`` (the two commands),
``cli`` (their arguments).
"""
