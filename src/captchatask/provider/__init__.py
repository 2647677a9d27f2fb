"""The solver-API side of captchatask: codes, reply parsers, task mapping and the client.

Modules: :mod:`~captchatask.provider.codes` (what each reply code means and how long to wait),
:mod:`~captchatask.provider.replies` (pure parsers), :mod:`~captchatask.provider.tasks` (a
``CaptchaTask`` spec to ``in.php`` fields), :mod:`~captchatask.provider.errors` and
:mod:`~captchatask.provider.client` (the aiohttp client). Import the modules you need; this
package re-exports nothing so that importing it stays free of side effects and of aiohttp.
"""
