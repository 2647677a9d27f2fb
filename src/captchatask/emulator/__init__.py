"""A CaptchaAI/2captcha-compatible solver emulator for tests, demos and benchmarks.

It implements the checklist of ``provider-api.md`` section 8 on loopback: ``in.php`` and
``res.php`` with every reply shape, solve-time distributions, a thread cap, rate limits,
result retention, pingback delivery with fault injection, and per-task accounting.

Modules: :mod:`~captchatask.emulator.config` (frozen configuration and fault knobs),
:mod:`~captchatask.emulator.state` (the emulated account), :mod:`~captchatask.emulator.pingback`
(delivery), :mod:`~captchatask.emulator.app` (HTTP handlers and admin API),
:mod:`~captchatask.emulator.server` (:func:`run_emulator` for in-process use) and
:mod:`~captchatask.emulator.cli` (``captchatask emulator``).
"""
