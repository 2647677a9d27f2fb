"""The kopf operator for CaptchaTask, CaptchaProvider and CaptchaDeadLetter."""
