"""Pure mapping from a ``CaptchaTask`` spec to ``in.php`` form fields.

The operator stores a task as a Kubernetes object whose ``spec`` uses camelCase names
(``siteKey``, ``pageURL``, ``recaptcha.minScore``...). The solver API wants its own names
(``googlekey``, ``pageurl``, ``min_score``...), which also differ by captcha type and, for
GeeTest v4, by dialect. This module is the one place that knows both vocabularies. It never
adds the API key (the client does, so the key never passes through anything loggable), and it
has no I/O, so every branch is tested with plain dictionaries.

Decisions (``provider-api.md`` leaves them open):

* ``HCaptcha`` is mapped to the legacy ``method=hcaptcha`` with ``sitekey``/``pageurl``, the
  only form any source shows; current docs no longer list it, so a provider may answer
  ``ERROR_BAD_PARAMETERS`` or ``ERROR_NO_SUCH_METHOD``, which classify as *task failed*.
* ``GeeTestV4`` is ``method=geetest`` + ``gt=<captcha_id>`` + ``version=4`` on CaptchaAI (its
  blog) and ``method=geetest_v4`` + ``captcha_id`` on 2captcha (its SDK).
* ``RecaptchaEnterprise`` is v2 unless ``recaptcha.version`` is ``v3``.
* Image ``language`` goes to ``language`` when numeric (2captcha's 0/1/2 alphabet hint) and to
  ``lang`` otherwise (an ISO code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from captchatask.provider.codes import Dialect

__all__ = ["TASK_TYPES", "SpecError", "build_submit_params"]

TASK_TYPES: Final = frozenset(
    {
        "RecaptchaV2",
        "RecaptchaV3",
        "RecaptchaEnterprise",
        "Turnstile",
        "HCaptcha",
        "GeeTest",
        "GeeTestV4",
        "Image",
    }
)
_JSON_REPLIES: Final = "1"
_FLAG_ON: Final = "1"
_FLAG_OFF: Final = "0"
_DEFAULT_V3_ACTION: Final = "verify"  # 2captcha's documented default for v3


class SpecError(ValueError):
    """The spec cannot be submitted as it is (missing or invalid field)."""


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return _FLAG_ON if value else _FLAG_OFF
    return str(value)


def _require(spec: Mapping[str, Any], name: str) -> str:
    value = spec.get(name)
    if value is None or str(value).strip() == "":
        raise SpecError(f"spec.{name} is required for type {spec.get('type')!r}")
    return str(value)


def _section(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = spec.get(name) or {}
    if not isinstance(section, Mapping):
        raise SpecError(f"spec.{name} must be an object")
    return section


def _put(params: dict[str, str], key: str, value: Any) -> None:
    """Set ``key`` only when ``value`` carries information (not None and not blank)."""
    if value is None or (isinstance(value, str) and value == ""):
        return
    params[key] = _text(value)


def _recaptcha(spec: Mapping[str, Any], params: dict[str, str], task_type: str) -> None:
    options = _section(spec, "recaptcha")
    params["method"] = "userrecaptcha"
    params["googlekey"] = _require(spec, "siteKey")
    version = options.get("version", "v2")
    if version not in {"v2", "v3"}:
        raise SpecError("spec.recaptcha.version must be v2 or v3")
    is_v3 = task_type == "RecaptchaV3" or (task_type == "RecaptchaEnterprise" and version == "v3")
    if task_type == "RecaptchaEnterprise":
        params["enterprise"] = _FLAG_ON
    if is_v3:
        params["version"] = "v3"
        params["action"] = str(options.get("action") or _DEFAULT_V3_ACTION)
        _put(params, "min_score", options.get("minScore"))
    else:
        if options.get("invisible"):
            params["invisible"] = _FLAG_ON
        _put(params, "data-s", options.get("enterprisePayload"))
        # Enterprise v2 may carry the "sa" action too (CaptchaAI SDK sends it as `action`).
        _put(params, "action", options.get("action"))
    domain = options.get("domain")
    if domain is not None and domain not in {"google.com", "recaptcha.net"}:
        raise SpecError("spec.recaptcha.domain must be google.com or recaptcha.net")
    _put(params, "domain", domain)


def _image(spec: Mapping[str, Any], params: dict[str, str]) -> None:
    options = _section(spec, "image")
    params["method"] = "base64"
    body = options.get("body")
    if not body:
        raise SpecError("spec.image.body (base64) is required for type 'Image'")
    params["body"] = str(body)
    if options.get("phrase") is not None:
        params["phrase"] = _text(bool(options["phrase"]))
    if options.get("caseSensitive") is not None:
        params["regsense"] = _text(bool(options["caseSensitive"]))
    numeric = options.get("numeric")
    if numeric is not None:
        if not isinstance(numeric, int) or not 0 <= numeric <= 4:
            raise SpecError("spec.image.numeric must be an integer 0-4")
        params["numeric"] = str(numeric)
    _put(params, "min_len", options.get("minLength"))
    _put(params, "max_len", options.get("maxLength"))
    language = options.get("language")
    if language is not None and str(language) != "":
        params["language" if str(language).isdigit() else "lang"] = str(language)
    _put(params, "textinstructions", options.get("instructions"))


def build_submit_params(
    spec: Mapping[str, Any], *, dialect: Dialect, pingback_url: str | None
) -> dict[str, str]:
    """Map a ``CaptchaTask`` spec to ``in.php`` form fields (without the API key).

    Parameters
    ----------
    spec
        The ``spec`` of a ``CaptchaTask`` (camelCase keys, see the CRD).
    dialect
        The provider; only GeeTest v4 differs between dialects.
    pingback_url
        The per-task callback URL, or ``None`` to poll only.

    Returns
    -------
    dict[str, str]
        Form fields including ``method`` and ``json=1``; the caller adds ``key``.

    Raises
    ------
    SpecError
        If the type is unknown or a field it needs is missing or invalid.
    """
    task_type = spec.get("type")
    if task_type not in TASK_TYPES:
        raise SpecError(f"unsupported spec.type {task_type!r}")
    params: dict[str, str] = {}
    if task_type in {"RecaptchaV2", "RecaptchaV3", "RecaptchaEnterprise"}:
        _recaptcha(spec, params, task_type)
    elif task_type in {"Turnstile", "HCaptcha"}:
        params["method"] = "turnstile" if task_type == "Turnstile" else "hcaptcha"
        params["sitekey"] = _require(spec, "siteKey")
        if task_type == "Turnstile":
            options = _section(spec, "turnstile")
            _put(params, "action", options.get("action"))
            _put(params, "data", options.get("data"))
    elif task_type == "GeeTest":
        options = _section(spec, "geetest")
        params["method"] = "geetest"
        params["gt"] = _require(spec, "siteKey")
        challenge = options.get("challenge")
        if not challenge:
            raise SpecError("spec.geetest.challenge is required for type 'GeeTest'")
        params["challenge"] = str(challenge)
        _put(params, "api_server", options.get("apiServer"))
    elif task_type == "GeeTestV4":
        if dialect is Dialect.CAPTCHAAI:
            params["method"] = "geetest"
            params["gt"] = _require(spec, "siteKey")
            params["version"] = "4"
        else:
            params["method"] = "geetest_v4"
            params["captcha_id"] = _require(spec, "siteKey")
        _put(params, "api_server", _section(spec, "geetest").get("apiServer"))
    else:
        _image(spec, params)
    if task_type != "Image":
        params["pageurl"] = _require(spec, "pageURL")
        _put(params, "userAgent", spec.get("userAgent"))
        _put(params, "cookies", spec.get("cookies"))
    params["json"] = _JSON_REPLIES
    if pingback_url:
        params["pingback"] = pingback_url
    return params
