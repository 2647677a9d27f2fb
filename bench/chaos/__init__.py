"""The chaos suite: the whole system under every fault at once, checked against the solver.

``python -m bench.chaos --profile full`` (``make chaos``) starts the real control plane, the
solver emulator, the sidecar and the operator as separate processes (:mod:`captchatask.stack`),
creates N tasks of mixed types and, while they are in flight, drops, duplicates and delays
pingbacks, makes tasks unsolvable, bursts HTML 502 on ``res.php``, stops the kube-apiserver,
SIGKILLs the sidecar twice and the operator once. Then it compares the ledger (the CaptchaTask
objects) with the emulator's own accounting and prints a table; any lost, mixed-up, duplicated
or resubmitted result is a failure (exit status 1).

Modules: :mod:`.profiles` (sizes and timings), :mod:`.plan` (the seeded fault timeline and task
mix), :mod:`.run` (drives the stack), :mod:`.verdict` (pure checks and figures), :mod:`.scan`
(the secrets scan), :mod:`.report` (table and JSON).
"""
